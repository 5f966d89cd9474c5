"""Train and refine hold a lock on their output folder: a second run into the same folder is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY_VIT_FLAGS
from weakseg.cli import main
from weakseg.io import LOCK_NAME, folder_lock


@pytest.mark.parametrize("command", ["train", "refine"])
def test_a_run_into_a_locked_output_folder_is_refused_and_writes_nothing(tiny_dfc: Path, tmp_path: Path,
                                                                         command: str, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    argv = {
        "train": ["train", "--datadir", str(tiny_dfc), "--output_dir", str(out), *TINY_VIT_FLAGS],
        "refine": ["refine", "--datadir", str(tiny_dfc), "--supervised", "--split", "validation", "--output",
                   str(out), "--epochs", "1", "--widths", "4", "8"],
    }[command]
    with folder_lock(out, "another run"):  # a live holder: this very process
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "error:" in err and LOCK_NAME in err and "another run" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written beside the lock
    assert not (out / LOCK_NAME).exists()


def test_the_lock_is_released_after_a_run(tiny_dfc: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--datadir", str(tiny_dfc), "--output_dir", str(out), *TINY_VIT_FLAGS]) == 0
    assert (out / "checkpoints" / "last.ckpt").is_file() and not (out / LOCK_NAME).exists()
