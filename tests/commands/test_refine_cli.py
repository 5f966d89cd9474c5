"""``weakseg refine`` settings: every flag and YAML value is type- and range-checked before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

import weakseg.commands.refine as command
from weakseg.cli import build_parser, main
from weakseg.commands.refine import resolve_refine_config


@pytest.fixture()
def no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reaching the refinement or reading the classifier checkpoint fails the test: settings come first."""
    def refuse(*args, **kwargs):
        pytest.fail("the run started although its settings are invalid")

    monkeypatch.setattr(command, "refine", refuse)
    monkeypatch.setattr(command, "checkpoint_data_settings", refuse)


def base_args(tmp_path: Path) -> list[str]:
    return ["refine", "--datadir", str(tmp_path / "data"), "--pseudomasks", str(tmp_path / "pm"), "--output",
            str(tmp_path / "out"), "--model_checkpoint", str(tmp_path / "c.ckpt")]


@pytest.mark.parametrize("extra, setting", [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "-2"], "--epochs"),
    (["--batch_size", "0"], "--batch_size"),
    (["--batch_size", "-8"], "--batch_size"),
    (["--learning_rate", "0"], "--learning_rate"),
    (["--learning_rate", "-0.001"], "--learning_rate"),
    (["--iterations", "-1"], "--iterations"),
    (["--min_confidence", "1.5"], "--min_confidence"),
    (["--min_confidence", "-0.1"], "--min_confidence"),
    (["--num_devices", "0"], "--num_devices"),
    (["--num_nodes", "0"], "--num_nodes"),
    (["--num_workers", "-1"], "--num_workers"),
    (["--widths", "0", "8"], "--widths"),
    (["--seed", "-3"], "--seed"),
    (["--split", "validation:all"], "--split"),
    (["--eval_split", ":holdout"], "--eval_split"),
    (["--accelerator", "quantum"], "--accelerator"),
    (["--output", ""], "--output"),
])
def test_bad_flags_are_refused_before_anything_runs(tmp_path, capsys, no_run, extra, setting):
    code = main([*base_args(tmp_path), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: {setting}: " in err and "Traceback" not in err


@pytest.mark.parametrize("yaml_text, setting", [
    ("epochs: three\n", "epochs"),
    ("epochs: 0\n", "epochs"),
    ("batch_size: 0\n", "batch_size"),
    ("lr: fast\n", "lr"),
    ("lr: -1e-3\n", "lr"),
    ("iterations: 1.5\n", "iterations"),
    ("min_confidence: 2\n", "min_confidence"),
    ("lr_schedule: step\n", "lr_schedule"),
    ("widths: [16, wide]\n", "widths"),
    ("widths: []\n", "widths"),
    ("augment: maybe\n", "augment"),
    ("supervised: 1\n", "supervised"),
    ("modality: s1\n", "modality"),
    ("normalization: minmax\n", "normalization"),
    ("dataset: imagenet\n", "dataset"),
    ("band_stats: [[1, 2]]\n", "band_stats"),
    ("eval_split: no\n", "eval_split"),  # YAML reads no as false
    ("num_devices: 0\n", "num_devices"),
    ("epoch: 3\n", "['epoch']"),  # unknown key
])
def test_bad_yaml_values_are_refused_before_anything_runs(tmp_path, capsys, no_run, yaml_text, setting):
    config = tmp_path / "refine.yaml"
    config.write_text(yaml_text)
    code = main([*base_args(tmp_path), "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error: " in err and setting in err and f"config file {config}" in err and "Traceback" not in err


def test_unambiguous_yaml_spellings_are_coerced_and_none_means_no_eval_split(tmp_path):
    config = tmp_path / "refine.yaml"
    config.write_text("lr: 1e-3\nwidths: 8\nepochs: 2.0\neval_split: none\naugment: 'off'\n")
    args = build_parser().parse_args(["refine", "--datadir", "d", "--output", "o", "--config", str(config)])
    cfg = resolve_refine_config(args)
    assert cfg.lr == 0.001 and cfg.widths == [8] and cfg.epochs == 2 and isinstance(cfg.epochs, int)
    assert cfg.eval_split is None and cfg.augment is False


def test_model_recipe_sits_under_yaml_and_flags(tmp_path):
    def cfg_of(*extra: str):
        return resolve_refine_config(build_parser().parse_args(["refine", "--datadir", "d", "--output", "o", *extra]))

    unet = cfg_of()
    assert (unet.model, unet.optimizer, unet.lr, unet.lr_schedule) == ("unet", "adamw", 3e-3, "cosine")
    seg = cfg_of("--model", "segmenter")
    assert (seg.optimizer, seg.lr, seg.lr_schedule, seg.encoder_lr_scale) == ("adamw", 3e-3, "cosine", 1.0)
    weaktr = cfg_of("--model", "segmenter", "--optimizer", "sgd", "--lr_schedule", "poly", "--encoder_lr_scale", "0.1")
    assert (weaktr.optimizer, weaktr.lr_schedule, weaktr.encoder_lr_scale) == ("sgd", "poly", 0.1)
    config = tmp_path / "refine.yaml"
    config.write_text("model: segmenter\nencoder_lr_scale: 0.5\n")
    from_yaml = cfg_of("--config", str(config))
    assert from_yaml.model == "segmenter" and from_yaml.encoder_lr_scale == 0.5


def test_encoder_checkpoint_fixes_the_encoder_shape(tmp_path, tiny_checkpoint, capsys):
    from weakseg.tasks.classification import load_classifier

    shape = load_classifier(tiny_checkpoint).model_config
    args = ["--datadir", "d", "--output", "o", "--model", "segmenter", "--encoder_checkpoint", str(tiny_checkpoint)]
    cfg = resolve_refine_config(build_parser().parse_args(["refine", *args]))
    assert (cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads) == (
        shape.patch_size, shape.embed_dim, shape.depth, shape.num_heads)
    code = main(["refine", *args, "--embed_dim", str(shape.embed_dim * 2)])
    err = capsys.readouterr().err
    assert code != 0 and f"--embed_dim is {shape.embed_dim * 2}" in err and str(tiny_checkpoint) in err
    code = main(["refine", "--datadir", "d", "--output", "o", "--model", "segmenter", "--encoder_checkpoint",
                 str(tmp_path / "missing.ckpt")])
    assert code != 0 and "missing.ckpt does not exist" in capsys.readouterr().err
