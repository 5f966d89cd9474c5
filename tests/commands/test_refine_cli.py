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
