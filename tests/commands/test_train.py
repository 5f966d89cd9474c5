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
    for col in ("val_macro_f1", "val_map", "val_hamming_acc", "pruned_fraction", "train_loss", "train_l0",
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
