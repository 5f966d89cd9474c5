"""``weakseg make-data`` through the CLI: the DFC2020 layout with the requested counts, size and seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from weakseg.cli import main
from weakseg.data import open_dataset
from weakseg.data.synthetic import METADATA_FILE, tile_path

SMALL = ["--train_tiles", "3", "--test_tiles", "2", "--tile_size", "16"]


def make(out: Path, *extra: str) -> int:
    return main(["make-data", str(out), *SMALL, *extra])


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


@pytest.fixture(scope="module")
def seed7(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("make_data") / "seed7"
    assert make(out, "--seed", "7") == 0
    return out


def test_writes_the_dfc2020_layout_with_the_requested_counts_and_size(seed7: Path, capsys) -> None:
    expected = {METADATA_FILE}
    for sensor in ("s1", "s2", "dfc"):
        expected |= {f"ROIs0000_validation/{sensor}_validation/ROIs0000_validation_{sensor}_0_p{n}.tif"
                     for n in range(3)}
        expected |= {f"ROIs0000_test/{sensor}_0/ROIs0000_test_{sensor}_0_p{n}.tif" for n in range(2)}
    assert set(files(seed7)) == expected  # nothing else: no *.tmp, no extra tile
    for split, count in (("validation", 3), ("test", 2)):
        for n in range(count):
            assert read(tile_path(seed7, split, "s2", n)).shape == (13, 16, 16)
            assert read(tile_path(seed7, split, "s1", n)).shape == (2, 16, 16)
            assert read(tile_path(seed7, split, "dfc", n)).shape == (1, 16, 16)
    meta = json.loads((seed7 / METADATA_FILE).read_text())
    assert (meta["seed"], meta["tile_size"], meta["num_tiles"], meta["complete"]) == (
        7, 16, {"validation": 3, "test": 2}, True)
    # the reader the rest of weakseg uses opens it: 3 training tiles with masks, 2 test tiles, S1+S2 stacked
    train = open_dataset("dfc2020", seed7, "validation", modality="s1s2")
    assert len(train.ids) == 3 and train.has_masks and train.read_image(0).shape == (15, 16, 16)
    assert len(open_dataset("dfc2020", seed7, "test").ids) == 2


def test_summary_is_printed(tmp_path: Path, capsys) -> None:
    assert make(tmp_path / "d", "--seed", "2") == 0
    out = capsys.readouterr().out
    assert f"synthetic DFC2020 data in {tmp_path / 'd'}" in out
    assert "num_tiles: {'validation': 3, 'test': 2}" in out and "tile_size: 16" in out and "seed: 2" in out


def test_same_seed_is_byte_identical_and_another_seed_differs(seed7: Path, tmp_path: Path) -> None:
    assert make(tmp_path / "again", "--seed", "7") == 0
    assert files(tmp_path / "again") == files(seed7)
    assert make(tmp_path / "other", "--seed", "8") == 0
    other = files(tmp_path / "other")
    assert set(other) == set(files(seed7))
    for sensor in ("s1", "s2", "dfc"):
        for n in range(3):
            a = read(tile_path(seed7, "validation", sensor, n))
            b = read(tile_path(tmp_path / "other", "validation", sensor, n))
            assert not np.array_equal(a, b), (sensor, n)


def test_default_seed_is_zero_and_test_tiles_may_be_zero(tmp_path: Path) -> None:
    out = tmp_path / "d"
    assert main(["make-data", str(out), "--train_tiles", "1", "--test_tiles", "0", "--tile_size", "16"]) == 0
    assert json.loads((out / METADATA_FILE).read_text())["seed"] == 0
    assert not (out / "ROIs0000_test").exists()
    assert tile_path(out, "validation", "s2", 0).is_file()


def test_rerun_with_the_same_settings_rewrites_nothing(seed7: Path, tmp_path: Path) -> None:
    out = tmp_path / "d"
    assert make(out, "--seed", "7") == 0
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert make(out, "--seed", "7") == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def test_other_settings_in_an_existing_dataset_need_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "d"
    assert make(out, "--seed", "1") == 0
    before = files(out)
    assert make(out, "--seed", "2") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(out) in err and "seed: 1 there, 2 requested" in err
    assert "Traceback" not in err
    assert files(out) == before  # nothing was touched
    assert main(["make-data", str(out), "--train_tiles", "1", "--test_tiles", "1", "--tile_size", "16",
                 "--seed", "2", "--overwrite"]) == 0
    assert json.loads((out / METADATA_FILE).read_text())["num_tiles"] == {"validation": 1, "test": 1}
    assert sorted(p.name for p in tile_path(out, "validation", "s2", 0).parent.iterdir()) == [
        "ROIs0000_validation_s2_0_p0.tif"]  # the old dataset's extra tiles are gone


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--tile_size", "8"], "tile_size must be an integer >= 16, got 8"),
        (["--train_tiles", "-1"], "num_tiles['validation'] must be a non-negative integer, got -1"),
        (["--test_tiles", "-2"], "num_tiles['test'] must be a non-negative integer, got -2"),
        (["--train_tiles", "0", "--test_tiles", "0"], "num_tiles asks for no tiles at all"),
        (["--seed", "-1"], "seed must be a non-negative integer, got -1"),
    ],
)
def test_bad_arguments_are_errors_with_exit_status_2(tmp_path: Path, capsys, argv: list[str],
                                                     message: str) -> None:
    out = tmp_path / "d"
    assert main(["make-data", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists() or not any(out.rglob("*.tif"))  # nothing written


@pytest.mark.parametrize("argv", [["--train_tiles", "many"], ["--tile_size", "1.5"], []])
def test_unparsable_or_missing_arguments_exit_2(tmp_path: Path, capsys, argv: list[str]) -> None:
    full = ["make-data", *argv] if not argv else ["make-data", str(tmp_path / "d"), *argv]
    with pytest.raises(SystemExit) as e:
        main(full)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_a_folder_with_real_dfc2020_files_is_refused(tmp_path: Path, capsys) -> None:
    foreign = tmp_path / "real" / "ROIs0000_validation" / "s2_validation" / "ROIs0000_validation_s2_0_p0.tif"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"a real tile")
    assert make(tmp_path / "real", "--overwrite") == 2
    assert "not written by the synthetic generator" in capsys.readouterr().err
    assert foreign.read_bytes() == b"a real tile"


def test_an_output_path_that_is_a_file_is_a_user_error(tmp_path: Path, capsys) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("not a folder")
    assert make(target) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(target) in err
    assert target.read_text() == "not a folder"


def test_console_command_exit_status_and_message(tmp_path: Path) -> None:
    """The installed entry point (python -m weakseg.cli is what `weakseg` runs) reports errors as status 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "weakseg.cli", "make-data", str(tmp_path / "d"), "--tile_size", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "error: tile_size must be an integer >= 16, got 4" in proc.stderr
    assert "Traceback" not in proc.stderr
