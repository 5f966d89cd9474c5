"""Every command answers a user mistake with one `error:` line naming what is wrong, exit status 2, no traceback.

One table of mistakes across the commands (settings mistakes have their own tables in test_train.py and
test_refine_cli.py; reader faults in tests/data/test_reader_errors.py). Each case builds its own broken input
from the shared tiny dataset and checkpoint, runs the real CLI in-process and checks the message.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from weakseg.cli import main

Case = Callable[[Path, Path, Path], tuple[list[str], str]]


def _checkpoint_is_a_folder(data: Path, ckpt: Path, tmp: Path) -> tuple[list[str], str]:
    folder = tmp / "ckpts"
    folder.mkdir()
    return (["pseudomasks", "--model_checkpoint", str(folder), "--datadir", str(data), "--output", str(tmp / "o")],
            "is a folder")


def _checkpoint_is_text(data: Path, ckpt: Path, tmp: Path) -> tuple[list[str], str]:
    bad = tmp / "model.ckpt"
    bad.write_text("not a checkpoint\n")
    return (["pseudomasks", "--model_checkpoint", str(bad), "--datadir", str(data), "--output", str(tmp / "o")],
            "model.ckpt")


def _checkpoint_is_truncated(data: Path, ckpt: Path, tmp: Path) -> tuple[list[str], str]:
    bad = tmp / "cut.ckpt"
    bad.write_bytes(ckpt.read_bytes()[:5000])
    return (["pseudomasks", "--model_checkpoint", str(bad), "--datadir", str(data), "--output", str(tmp / "o")],
            "cut.ckpt")


CASES: dict[str, Case] = {
    "train: missing data folder": lambda d, c, t: (
        ["train", "--datadir", str(t / "nowhere"), "--output_dir", str(t / "o")], "nowhere"),
    "train: unknown split part": lambda d, c, t: (
        ["train", "--datadir", str(d), "--train_split", "validation:all", "--output_dir", str(t / "o")],
        "validation:all"),
    "train: resume without a checkpoint": lambda d, c, t: (
        ["train", "--datadir", str(d), "--resume", "--output_dir", str(t / "o")], "last.ckpt"),
    "train: missing pretrained file": lambda d, c, t: (
        ["train", "--datadir", str(d), "--pretrained", str(t / "deit.pth"), "--imgsize", "32", "--output_dir",
         str(t / "o")], "deit.pth"),
    "pseudomasks: missing checkpoint": lambda d, c, t: (
        ["pseudomasks", "--model_checkpoint", str(t / "none.ckpt"), "--datadir", str(d), "--output",
         str(t / "o")], "none.ckpt"),
    "pseudomasks: checkpoint is a folder": _checkpoint_is_a_folder,
    "pseudomasks: checkpoint is a text file": _checkpoint_is_text,
    "pseudomasks: truncated checkpoint": _checkpoint_is_truncated,
    "pseudomasks: class attention on a 1-CLS classifier": lambda d, c, t: (
        ["pseudomasks", "--model_checkpoint", str(c), "--datadir", str(d), "--method", "class_attention",
         "--output", str(t / "o")], "--arch class_tokens"),
    "pseudomasks: option of another method": lambda d, c, t: (
        ["pseudomasks", "--model_checkpoint", str(c), "--datadir", str(d), "--method", "gradcam", "--assign",
         "rank", "--output", str(t / "o")], "--assign"),
    "pseudomasks: bad --blocks": lambda d, c, t: (
        ["pseudomasks", "--model_checkpoint", str(c), "--datadir", str(d), "--method", "attention", "--blocks",
         "7", "--output", str(t / "o")], "--blocks"),
    "pseudomasks: unknown split": lambda d, c, t: (
        ["pseudomasks", "--model_checkpoint", str(c), "--datadir", str(d), "--split", "training", "--output",
         str(t / "o")], "training"),
    "pseudomasks: output inside the dataset": lambda d, c, t: (
        ["pseudomasks", "--model_checkpoint", str(c), "--datadir", str(d), "--output", str(d / "masks_out")],
        str(d)),
    "evaluate: missing prediction folder": lambda d, c, t: (
        ["evaluate", "--predictions", str(t / "preds"), "--datadir", str(d), "--split", "validation"], "preds"),
    "evaluate: names do not match folders": lambda d, c, t: (
        ["evaluate", "--predictions", str(t), "--names", "a", "b", "--datadir", str(d), "--split", "validation"],
        "--names"),
    "refine: missing pseudomask folder": lambda d, c, t: (
        ["refine", "--datadir", str(d), "--pseudomasks", str(t / "pm"), "--output", str(t / "o")], "pm"),
    "refine: missing classifier checkpoint": lambda d, c, t: (
        ["refine", "--datadir", str(d), "--pseudomasks", str(t), "--output", str(t / "o"), "--model_checkpoint",
         str(t / "gone.ckpt")], "gone.ckpt"),
    "make-data: negative tile count": lambda d, c, t: (
        ["make-data", str(t / "data"), "--train_tiles", "-3"], "must be a non-negative integer, got -3"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_mistakes_get_one_error_line_and_exit_2(case: str, tiny_dfc: Path, tiny_checkpoint: Path,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, fragment = CASES[case](tiny_dfc, tiny_checkpoint, tmp_path)
    assert main(argv) == 2, case
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-2000:]
    assert fragment in errors[0], (fragment, errors[0])


@pytest.mark.parametrize("flags, fragment", [
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--num_workers", "-1"], "--num_workers must be at least 0, got -1"),
    (["--num_devices", "0"], "--num_devices must be at least 1, got 0"),
    (["--num_nodes", "0"], "--num_nodes must be at least 1, got 0"),
    (["--threshold", "1.5"], "--threshold must be in [0, 1)"),
])
def test_pseudomask_run_settings_are_checked_before_anything_is_written(flags: list[str], fragment: str,
                                                                         tiny_dfc: Path, tiny_checkpoint: Path,
                                                                         tmp_path: Path, capsys) -> None:
    out = tmp_path / "pm"
    assert main(["pseudomasks", "--model_checkpoint", str(tiny_checkpoint), "--datadir", str(tiny_dfc),
                 "--output", str(out), *flags]) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()  # a refused run leaves no run.json that would block the corrected one


def test_demo_refuses_bad_arguments_and_an_output_that_is_a_file(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["demo", "--fast", "--output_dir", str(afile)]) == 2
    assert "afile" in capsys.readouterr().err and afile.read_text() == "x"
    assert main(["demo", "--train_tiles", "3", "--output_dir", str(tmp_path / "d")]) == 2
    assert "--train_tiles must be at least 10, got 3" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_a_data_path_that_is_a_file_says_so(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    afile = tmp_path / "data.tif"
    afile.write_text("x")
    assert main(["pseudomasks", "--model_checkpoint", str(tiny_checkpoint), "--datadir", str(afile), "--output",
                 str(tmp_path / "o")]) == 2
    assert "is a file, not a folder (--datadir)" in capsys.readouterr().err
