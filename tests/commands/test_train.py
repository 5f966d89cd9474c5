import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import TINY_VIT_FLAGS
from weakseg.cli import build_parser, main
from weakseg.commands.train import resolve_config
from weakseg.tasks.classification import load_classifier, warmup_cosine


def test_reference_readme_command_parses_as_written():
    # The sparse-vit-wsss README command (sparse_vit.md): every flag must be accepted unchanged.
    argv = ("train --prune --train_batch_size 2 --accumulate_grad 4 --optimizer adamw --lr_scheduler "
            "--learning_rate 0.001 --depth 12 --patch_size 14 --imgsize 224 224").split()
    cfg = resolve_config(build_parser().parse_args(argv))
    assert (cfg.prune, cfg.train_batch_size, cfg.accumulate_grad, cfg.optimizer, cfg.lr_scheduler) == (
        True, 2, 4, "adamw", True)
    assert (cfg.learning_rate, cfg.depth, cfg.patch_size, cfg.imgsize) == (0.001, 12, 14, [224, 224])
    more = build_parser().parse_args(["train", "--multimodal", "--num_devices", "2", "--pr_rate", "0.1",
                                      "--num_heads", "8", "--num_epochs", "3", "--seed", "7", "--datadir", "x"])
    cfg = resolve_config(more)
    assert (cfg.multimodal, cfg.num_devices, cfg.pr_rate, cfg.num_heads, cfg.num_epochs, cfg.seed) == (
        True, 2, 0.1, 8, 3, 7)


def test_config_layers_defaults_preset_yaml_flags(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("preset: paper\nnum_epochs: 3\npr_rate: 0.05\n")
    cfg = resolve_config(build_parser().parse_args(["train", "--config", str(cfg_file), "--pr_rate", "0.5"]))
    assert cfg.embed_dim == 1024 and cfg.patch_size == 14  # preset
    assert cfg.num_epochs == 3  # YAML over preset
    assert cfg.pr_rate == 0.5  # flag over YAML


def test_train_cli_writes_checkpoints_metrics_and_config(tiny_dfc, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--datadir", str(tiny_dfc), "--prune", "--output_dir", str(out), *TINY_VIT_FLAGS,
                 "--num_epochs", "2", "--seed", "1"])
    assert code == 0
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    header = rows[0].keys()
    for col in ("val_macro_f1", "val_map", "val_hamming_acc", "pruned_fraction", "train_loss", "train_target_pruned",
                "val_f1_forest", "pruned_heads_layer0"):
        assert col in header, col
    epochs = {r["epoch"] for r in rows if r["val_macro_f1"]}
    assert epochs == {"0", "1"}
    lrs = [float(r["lr-AdamW/pg1"]) for r in rows if r.get("lr-AdamW/pg1")]
    assert len(set(lrs)) > 2  # the schedule really changes the learning rate
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["config"]["prune"] is True and saved["model"]["depth"] == 2
    printed = capsys.readouterr().out
    assert "heads pruned" in printed and "val_macro_f1" in printed
    task = load_classifier(out / "checkpoints" / "best.ckpt")
    assert task.model_config.gated and task.hparams["data_config"]["modality"] == "s2"


def test_training_is_reproducible_with_a_seed(tiny_dfc, tmp_path):
    outs = []
    for name in ("a", "b"):
        assert main(["train", "--datadir", str(tiny_dfc), "--prune", "--output_dir", str(tmp_path / name),
                     *TINY_VIT_FLAGS, "--seed", "5", "--val_split", "none"]) == 0
        outs.append(torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"])
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k


def test_multimodal_training_both_fusions(tiny_dfc, tmp_path):
    for fusion in ("sum", "concat"):
        out = tmp_path / fusion
        assert main(["train", "--datadir", str(tiny_dfc), "--multimodal", "--fusion", fusion, "--prune",
                     "--output_dir", str(out), *TINY_VIT_FLAGS, "--val_split", "none"]) == 0
        task = load_classifier(out / "checkpoints" / "last.ckpt")
        assert task.model_config.in_chans == 15 and task.model_config.fusion == fusion
        assert (task.model.patch_embed_s1 is not None) == (fusion == "sum")


def test_warmup_cosine_schedule_values():
    assert warmup_cosine(0, 4, 20) == pytest.approx(0.2)
    assert warmup_cosine(3, 4, 20) == pytest.approx(0.8)
    assert warmup_cosine(4, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.5)
    assert warmup_cosine(20, 4, 20) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--imgsize", "30"], "30x30 is not divisible by patch size 8"),
        (["--imgsize", "64"], "smaller than the model input 64x64"),
        (["--optimizer", "lamb"], "invalid choice: 'lamb'"),
        (["--train_split", "train"], "no DFC2020 'train' split"),
    ],
)
def test_bad_settings_exit_non_zero_with_a_message(tiny_dfc, tmp_path, capsys, extra, message):
    argv = ["train", "--datadir", str(tiny_dfc), "--output_dir", str(tmp_path / "x"), *TINY_VIT_FLAGS, *extra]
    if "lamb" in extra:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    else:
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_datadir_and_bad_yaml(tmp_path, capsys):
    assert main(["train", "--datadir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist (--datadir)" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_epochs: 2\nnum_epoch: 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown setting(s) ['num_epoch']" in capsys.readouterr().err


def test_ddp_on_two_cpu_processes(tiny_dfc, tmp_path):
    """Two gloo processes on CPU through the real console command (Lightning re-launches it per rank)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "weakseg.cli", "train", "--datadir", str(tiny_dfc), "--prune", "--accelerator",
           "cpu", "--num_devices", "2", "--output_dir", str(out), *TINY_VIT_FLAGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    # 24 tiles, batch 8 per device, 2 devices -> 1 step per epoch with drop_last
    assert ckpt["global_step"] == 1
    assert "heads pruned" in proc.stdout


def test_checkpoint_from_another_configuration_is_refused(tiny_checkpoint, tiny_dfc, tmp_path, capsys):
    # A multimodal model's checkpoint on S2-only data is caught before any work.
    out = tmp_path / "mm"
    assert main(["train", "--datadir", str(tiny_dfc), "--multimodal", "--output_dir", str(out), *TINY_VIT_FLAGS,
                 "--val_split", "none"]) == 0
    code = main(["pseudomasks", "--model_checkpoint", str(out / "checkpoints" / "last.ckpt"), "--datadir",
                 str(tiny_dfc), "--output", str(tmp_path / "pm"), "--dataset", "dfc2020"])
    # the checkpoint carries its modality, so the reader is opened multimodal: this one must work
    assert code == 0
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"\x00" * 10)
    assert main(["pseudomasks", "--model_checkpoint", str(broken), "--datadir", str(tiny_dfc), "--output",
                 str(tmp_path / "pm2")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "epoch": 1}, foreign)
    assert main(["pseudomasks", "--model_checkpoint", str(foreign), "--datadir", str(tiny_dfc), "--output",
                 str(tmp_path / "pm3")]) == 2
    assert "is not a weakseg classifier checkpoint" in capsys.readouterr().err
    assert Path(tiny_checkpoint).is_file()


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_demo_config_file_is_the_demo_recipe():
    """configs/cpu_demo.yaml says it is the demo's pruned classifier: it must hold the recipe the demo runs."""
    from weakseg.pipeline.comparison import DEMO_PRUNING

    cfg = resolve_config(build_parser().parse_args(["train", "--config", str(CONFIGS / "cpu_demo.yaml")]))
    assert cfg.prune and {k: getattr(cfg, k) for k in DEMO_PRUNING} == DEMO_PRUNING


def test_released_class_token_config_is_the_released_setup():
    cfg = resolve_config(build_parser().parse_args(["train", "--config", str(CONFIGS / "class_tokens_paper.yaml")]))
    assert (cfg.arch, cfg.class_token_head, cfg.token_mask_rate, cfg.num_register_tokens) == (
        "class_tokens", "flatten", 0.5, 1)
    assert cfg.prune and cfg.pr_rate == 0.01


def test_class_token_run_trains_on_the_training_part_and_records_its_checkpoint(tiny_dfc, tmp_path):
    """--arch class_tokens through the real CLI: splits default to train part / holdout, summary describes best."""
    import json

    out = tmp_path / "ct"
    assert main(["train", "--datadir", str(tiny_dfc), "--arch", "class_tokens", "--prune", "--output_dir", str(out),
                 *TINY_VIT_FLAGS]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["arch"], summary["train_split"], summary["val_split"]) == (
        "class_tokens", "validation:train", "validation:holdout")
    best = summary["best"]
    assert best["path"].endswith("best.ckpt") and best["epoch"] == 0 and best["arch"] == "class_tokens"
    assert best["num_heads_total"] == 2 * 4 and 0 <= best["pruned_heads"] <= 8
    task = load_classifier(out / "checkpoints" / "best.ckpt")
    assert task.model.has_class_tokens and task.model_config.num_register_tokens == 1
    assert task.hparams.token_mask_rate == 0.0  # per-class head: no masking by default
    assert task.model.pruned_heads_per_layer() == best["pruned_heads_per_layer"]


def test_validation_split_overlapping_training_is_refused(tiny_dfc, tmp_path, capsys):
    code = main(["train", "--datadir", str(tiny_dfc), "--train_split", "validation", "--val_split",
                 "validation:holdout", "--output_dir", str(tmp_path / "x"), *TINY_VIT_FLAGS])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "shares" in err and "validation:holdout" in err


def test_token_masking_on_a_one_cls_model_is_refused(tiny_dfc, tmp_path, capsys):
    code = main(["train", "--datadir", str(tiny_dfc), "--token_mask_rate", "0.5", "--output_dir",
                 str(tmp_path / "x"), *TINY_VIT_FLAGS])
    assert code == 2 and "--arch class_tokens" in capsys.readouterr().err


# ---- settings are checked before anything runs (issue 7) ----------------------------------------------------
def _forbid_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad settings must be refused while resolving them: reaching the run (data, model) fails the test."""
    import weakseg.commands.train as command
    import weakseg.pipeline.train as pipeline

    def refuse(*args, **kwargs):
        pytest.fail("the run started although its settings are invalid")

    monkeypatch.setattr(command, "train", refuse)
    monkeypatch.setattr(pipeline, "ensure_data", refuse)


@pytest.mark.parametrize("extra, setting", [
    (["--train_batch_size", "0"], "--train_batch_size"),
    (["--train_batch_size", "-4"], "--train_batch_size"),
    (["--num_epochs", "-2"], "--num_epochs"),
    (["--num_epochs", "0"], "--num_epochs"),
    (["--learning_rate", "0"], "--learning_rate"),
    (["--learning_rate", "-0.001"], "--learning_rate"),
    (["--accumulate_grad", "0"], "--accumulate_grad"),
    (["--num_devices", "0"], "--num_devices"),
    (["--token_mask_rate", "1.5"], "--token_mask_rate"),
    (["--token_mask_rate", "-0.5"], "--token_mask_rate"),
    (["--pr_rate", "-0.1"], "--pr_rate"),
    (["--pr_rate", "high"], "--pr_rate"),
    (["--prune", "--pr_rate", "0.3"], "--pr_rate"),  # the L0 weight with a target (the default): ignored otherwise
    (["--prune", "--l0_normalize"], "--l0_normalize"),
    (["--prune", "--l0_warmup_steps", "50"], "--l0_warmup_steps"),
    (["--target_pruned_fraction", "1"], "--target_pruned_fraction"),
    (["--target_pruned_fraction", "-0.2"], "--target_pruned_fraction"),
    (["--target_warmup", "1.5"], "--target_warmup"),
    (["--gate_lr_scale", "0"], "--gate_lr_scale"),
    (["--l0_warmup_steps", "-1"], "--l0_warmup_steps"),
    (["--max_steps", "0"], "--max_steps"),
    (["--val_split", "validation:test"], "--val_split"),
    (["--train_split", "validation:"], "--train_split"),
    (["--imgsize", "32", "32", "32"], "--imgsize"),
    (["--imgsize", "0"], "--imgsize"),
    (["--seed", "-1"], "--seed"),
    (["--num_workers", "-1"], "--num_workers"),
    (["--precision", "fp8"], "--precision"),
    (["--accelerator", "quantum"], "--accelerator"),
    (["--weight_decay", "-0.1"], "--weight_decay"),
    (["--warmup_epochs", "-1"], "--warmup_epochs"),
    (["--depth", "0"], "--depth"),
    (["--mlp_ratio", "0"], "--mlp_ratio"),
    (["--num_register_tokens", "-1"], "--num_register_tokens"),
    (["--augmentations", "rotate"], "--augmentations"),
    (["--output_dir", ""], "--output_dir"),
])
def test_bad_flags_are_refused_before_anything_runs(tmp_path, capsys, monkeypatch, extra, setting):
    _forbid_training(monkeypatch)
    code = main(["train", "--datadir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "x"), *TINY_VIT_FLAGS,
                 *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: {setting}: " in err and "Traceback" not in err


@pytest.mark.parametrize("yaml_text, setting", [
    ("num_epochs: three\n", "num_epochs"),
    ("num_epochs: 0\n", "num_epochs"),
    ("num_epochs: 2.5\n", "num_epochs"),
    ("learning_rate: fast\n", "learning_rate"),
    ("learning_rate: -1e-3\n", "learning_rate"),
    ("imgsize: [32, big]\n", "imgsize"),
    ("imgsize: [32, 32, 32]\n", "imgsize"),
    ("train_batch_size: 0\n", "train_batch_size"),
    ("eval_batch_size: 0\n", "eval_batch_size"),
    ("optimizer: lamb\n", "optimizer"),
    ("arch: resnet\n", "arch"),
    ("dataset: imagenet\n", "dataset"),
    ("normalization: minmax\n", "normalization"),
    ("prune: maybe\n", "prune"),
    ("val_split: no\n", "val_split"),  # YAML reads no as false
    ("label_threshold: 1.5\n", "label_threshold"),
    ("label_threshold: 0\n", "label_threshold"),
    ("token_mask_rate: 2\n", "token_mask_rate"),
    ("augmentations: {fliprot: 1}\n", "augmentations"),
    ("synthetic_tiles: [10]\n", "synthetic_tiles"),
    ("gate_init: .nan\n", "gate_init"),
    ("preset: huge\n", "preset"),
])
def test_bad_yaml_values_are_refused_before_anything_runs(tmp_path, capsys, monkeypatch, yaml_text, setting):
    _forbid_training(monkeypatch)
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    code = main(["train", "--config", str(config), "--datadir", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: {setting} in config file {config}: " in err and "Traceback" not in err


def test_unambiguous_yaml_spellings_are_coerced(tmp_path):
    config = tmp_path / "run.yaml"
    # PyYAML reads 1e-3 (no dot) as a string and 32 as a scalar where a list is expected.
    config.write_text("learning_rate: 1e-3\nimgsize: 32\nnum_epochs: 3.0\naugmentations: affine\n"
                      "num_register_tokens: none\nprecision: 32\n")
    cfg = resolve_config(build_parser().parse_args(["train", "--config", str(config)]))
    assert cfg.learning_rate == 0.001 and isinstance(cfg.learning_rate, float)
    assert cfg.imgsize == [32, 32] and cfg.num_epochs == 3 and isinstance(cfg.num_epochs, int)
    assert cfg.augmentations == ["affine"] and cfg.num_register_tokens is None and cfg.precision == "32"


def test_preset_flag_wins_over_the_yaml_preset(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("preset: paper\nnum_epochs: 3\n")
    cfg = resolve_config(build_parser().parse_args(["train", "--config", str(config), "--preset", "cpu"]))
    assert (cfg.embed_dim, cfg.num_epochs) == (96, 3)
    assert resolve_config(build_parser().parse_args(["train", "--config", str(config)])).embed_dim == 1024


def test_settings_built_in_code_are_checked_before_data(tmp_path, monkeypatch):
    """The demo and the benchmarks call train() with a TrainConfig: the same checks apply, before any data."""
    from weakseg.errors import ConfigError
    from weakseg.pipeline.train import TrainConfig, train

    _forbid_training(monkeypatch)
    with pytest.raises(ConfigError, match=r"^num_epochs in TrainConfig: must be at least 1, got 0"):
        train(TrainConfig(output_dir=str(tmp_path / "x"), num_epochs=0))
    with pytest.raises(ConfigError, match=r"^learning_rate in TrainConfig: expected a number"):
        train(TrainConfig(output_dir=str(tmp_path / "x"), learning_rate="fast"))  # type: ignore[arg-type]


# ---- last.ckpt, --resume and metrics.csv ------------------------------------------------------------------
def _metric_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open(newline="")))


def test_resume_after_a_kill_continues_from_the_last_epoch_and_keeps_every_metrics_row(tiny_dfc, tmp_path,
                                                                                       monkeypatch):
    """Train 3 epochs, killed in the third; --resume continues from epoch 2's end and metrics.csv stays whole."""
    from weakseg.tasks.classification import ClassificationTask

    out = tmp_path / "run"
    # The paper's L0 (no target ramp) and macro F1: this seed's best epoch is then the first, not the last.
    argv = ["train", "--datadir", str(tiny_dfc), "--prune", "--output_dir", str(out), *TINY_VIT_FLAGS,
            "--num_epochs", "3", "--seed", "1", "--target_pruned_fraction", "none", "--checkpoint_metric", "macro_f1"]
    step = ClassificationTask.training_step

    def killed_in_epoch_3(self, batch, batch_idx):
        if self.current_epoch == 2 and batch_idx == 1:
            raise RuntimeError("simulated kill")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(ClassificationTask, "training_step", killed_in_epoch_3)
    with pytest.raises(RuntimeError, match="simulated kill"):
        main(argv)
    monkeypatch.setattr(ClassificationTask, "training_step", step)
    # 19 training tiles, batch 8, drop_last: 2 steps per epoch. last.ckpt is the end of epoch 2 (index 1), not
    # the best epoch.
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    best = torch.load(out / "checkpoints" / "best.ckpt", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (1, 4)
    assert best["epoch"] == 0  # this seed's best is the first epoch: the old last.ckpt was this one
    before = _metric_rows(out / "metrics.csv")
    assert any(r["epoch"] == "2" for r in before)  # the interrupted epoch logged a step before the kill

    assert main([*argv, "--resume"]) == 0
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, 6)
    rows = _metric_rows(out / "metrics.csv")
    assert [r["epoch"] for r in rows if r["val_macro_f1"]] == ["0", "1", "2"]
    assert [r["epoch"] for r in rows if r["train_macro_f1"]] == ["0", "1", "2"]
    assert sorted(int(r["step"]) for r in rows if r["train_loss"]) == list(range(6))
    assert sorted(int(r["step"]) for r in rows if r["lr-AdamW/pg1"]) == list(range(6))
    # The rows of the first two epochs are the ones logged before the kill, unchanged.
    def finished(rs):
        return [{k: v for k, v in r.items() if v} for r in rs if r["epoch"] in ("0", "1") or
                (not r["epoch"] and int(r["step"]) < 4)]
    assert finished(rows) == finished(before)


def test_resume_from_a_broken_checkpoint_is_refused_before_data(tmp_path, capsys, monkeypatch):
    _forbid_training(monkeypatch)
    import weakseg.commands.train as command
    from weakseg.pipeline.train import train

    monkeypatch.setattr(command, "train", train)  # the real run, but no data may be read
    ckpt = tmp_path / "x" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    code = main(["train", "--output_dir", str(tmp_path / "x"), "--resume", *TINY_VIT_FLAGS])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot read checkpoint {ckpt} (--resume)" in err
    assert "not a complete PyTorch checkpoint" in err


def test_demo_training_options_reach_the_optimizer_and_the_gates(tiny_dfc, tmp_path):
    """configs/cpu_demo.yaml through the real CLI: gate lr x5, gates start at log alpha 1, L0 options recorded."""
    out = tmp_path / "demo"
    assert main(["train", "--config", str(CONFIGS / "cpu_demo.yaml"), "--datadir", str(tiny_dfc),
                 "--output_dir", str(out), *TINY_VIT_FLAGS, "--learning_rate", "0.001", "--val_split", "none"]) == 0
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    hp = ckpt["hyper_parameters"]
    assert (hp["gate_lr_scale"], hp["l0_normalize"], hp["l0_warmup_steps"], hp["pr_rate"]) == (5.0, True, 100, 0.35)
    assert hp["model"]["gate_init"] == 1.0
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert sorted(g["initial_lr"] for g in groups) == pytest.approx([0.001, 0.001, 0.005])
    gates = torch.cat([v.flatten() for k, v in ckpt["state_dict"].items() if k.endswith("log_alpha")])
    # 2 Adam steps of at most ~lr x 5 each from 1.0 (Xavier-uniform would spread them over about [-1, 1])
    assert gates.numel() == 8 and ((gates - 1.0).abs() < 0.05).all()


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_num_nodes_below_one_is_refused_before_anything_runs(command: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main([command, "--output_dir", str(out), "--num_nodes", "0"]) == 2
    assert "--num_nodes: must be at least 1, got 0" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()
