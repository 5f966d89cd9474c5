import json
from pathlib import Path

import numpy as np
import pytest

from weakseg.errors import WeaksegError
from weakseg.io import atomic_path, atomic_write_json


def test_atomic_write_json(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "scores.json"
    atomic_write_json(path, {"x": float("nan"), "n": np.int64(3), "a": np.arange(2), "p": tmp_path})
    assert json.loads(path.read_text()) == {"x": None, "n": 3, "a": [0, 1], "p": str(tmp_path)}
    assert not list((tmp_path / "sub").glob("*.tmp"))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(WeaksegError, match=r"cannot write .*blocker"):
        atomic_write_json(blocker / "scores.json", {})


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]
