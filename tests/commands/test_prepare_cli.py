"""``weakseg prepare`` end to end: build, reuse, errors, and ``train`` reading through the store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import TINY_VIT_FLAGS
from weakseg.cli import main
from weakseg.data.dfc2020 import DFC2020Dataset
from weakseg.data.synthetic import generate_synthetic_dfc2020


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    generate_synthetic_dfc2020(root, num_tiles={"validation": 12, "test": 4}, tile_size=32, seed=0)
    return root


def test_prepare_builds_reuses_and_train_reads_through_the_store(data, tmp_path, capsys, monkeypatch):
    assert main(["prepare", "--datadir", str(data)]) == 0
    out = capsys.readouterr().out
    store = data / ".weakseg_store" / "dfc2020-validation-s2"
    assert "built: 12 tiles written, 0 skipped, 0 reused" in out and "on disk" in out and "tiles/s" in out
    assert "float16 rounding: max abs error" in out
    meta = json.loads((store / "meta.json").read_text())
    assert (meta["kind"], meta["split"], meta["modality"], meta["dtype"], meta["shape"]) == (
        "dfc2020", "validation", "s2", "float16", [12, 13, 32, 32])
    assert len(meta["tiles"]) == 12 and all(len(t["files"]) == 2 for t in meta["tiles"])  # S2 + label file

    written = os.stat(store / "images.npy").st_mtime_ns
    assert main(["prepare", "--datadir", str(data), "--split", "validation:train"]) == 0
    out = capsys.readouterr().out
    assert "up to date: 12 tiles" in out and "nothing rewritten" in out
    assert os.stat(store / "images.npy").st_mtime_ns == written

    def no_file_reads(self, i):  # every tile train reads (validation:train, validation:holdout) is in the store
        raise AssertionError(f"train decoded {self.source_path(i)} instead of reading the tile store")

    monkeypatch.setattr(DFC2020Dataset, "_read_image", no_file_reads)
    monkeypatch.setattr(DFC2020Dataset, "_read_mask", no_file_reads)
    run = tmp_path / "run"
    code = main(["train", "--datadir", str(data), "--output_dir", str(run), *TINY_VIT_FLAGS])
    assert code == 0 and (run / "checkpoints" / "last.ckpt").is_file()
    assert f"split 'validation' read from the tile store {store}" in capsys.readouterr().err  # the CLI's log line


def test_prepare_s1s2_and_float32_into_a_given_folder(data, tmp_path, capsys):
    store = tmp_path / "elsewhere"
    assert main(["prepare", "--datadir", str(data), "--modality", "s1s2", "--dtype", "float32",
                 "--store", str(store)]) == 0
    meta = json.loads((store / "meta.json").read_text())
    assert meta["shape"] == [12, 15, 32, 32] and meta["dtype"] == "float32" and meta["max_abs_rounding_error"] == 0
    assert all(len(t["files"]) == 3 for t in meta["tiles"])  # S2, S1 and the label file are fingerprinted
    assert "float16 rounding" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--datadir", "{tmp}/nowhere"], "does not exist"),
    (["--datadir", "{data}", "--split", "validation", "test", "--store", "{tmp}/s"], "one store folder"),
    (["--datadir", "{data}", "--split", "nosuch"], "no DFC2020 'nosuch' split"),
    (["--datadir", "{data}", "--dataset", "folder", "--modality", "s1s2"], "applies to DFC2020"),
    (["--datadir", "{data}", "--flush_every", "0"], "--flush_every"),
])
def test_user_mistakes_are_errors_with_exit_status_2(data, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, data=data) for a in argv]
    assert main(["prepare", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


# ---- --store on train and pseudomasks ---------------------------------------------------------------------------
def forbid_file_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_file_reads(self, i):
        raise AssertionError(f"decoded {self.source_path(i)} instead of reading the tile store")

    monkeypatch.setattr(DFC2020Dataset, "_read_image", no_file_reads)
    monkeypatch.setattr(DFC2020Dataset, "_read_mask", no_file_reads)


def test_train_reads_a_store_given_by_folder_and_none_reads_the_files(data, tmp_path, capsys, monkeypatch):
    store = tmp_path / "stores" / "train"
    assert main(["prepare", "--datadir", str(data), "--store", str(store)]) == 0
    capsys.readouterr()
    with monkeypatch.context() as m:
        forbid_file_reads(m)
        assert main(["train", "--datadir", str(data), "--output_dir", str(tmp_path / "run"), "--store", str(store),
                     *TINY_VIT_FLAGS]) == 0
    assert f"read from the tile store {store}" in capsys.readouterr().err
    assert main(["prepare", "--datadir", str(data)]) == 0  # a store at the default location too
    capsys.readouterr()
    assert main(["train", "--datadir", str(data), "--output_dir", str(tmp_path / "run2"), "--store", "none",
                 *TINY_VIT_FLAGS]) == 0
    assert "read from the tile store" not in capsys.readouterr().err


def test_pseudomasks_from_a_float32_store_equal_those_from_the_files(tiny_dfc, tiny_checkpoint, tmp_path,
                                                                     capsys, monkeypatch):
    import numpy as np
    import rasterio

    store = tmp_path / "store"  # elsewhere: the shared tiny data keeps no store at its default location
    assert main(["prepare", "--datadir", str(tiny_dfc), "--dtype", "float32", "--store", str(store)]) == 0
    common = ["pseudomasks", "--model_checkpoint", str(tiny_checkpoint), "--datadir", str(tiny_dfc),
              "--method", "gradcam", "--no-figures"]
    assert main([*common, "--output", str(tmp_path / "files"), "--store", "none"]) == 0
    with monkeypatch.context() as m:
        forbid_file_reads(m)
        assert main([*common, "--output", str(tmp_path / "stored"), "--store", str(store)]) == 0
    names = sorted(p.name for p in (tmp_path / "files").glob("*.tif"))
    assert names and names == sorted(p.name for p in (tmp_path / "stored").glob("*.tif"))
    for name in names:
        with rasterio.open(tmp_path / "files" / name) as a, rasterio.open(tmp_path / "stored" / name) as b:
            np.testing.assert_array_equal(a.read(1), b.read(1))


@pytest.mark.parametrize("command", ["train", "pseudomasks"])
def test_a_store_folder_without_a_store_is_an_error(data, tmp_path, capsys, request, command):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    if command == "train":
        argv = ["train", "--datadir", str(data), "--output_dir", str(tmp_path / "run"), *TINY_VIT_FLAGS]
    else:
        checkpoint = request.getfixturevalue("tiny_checkpoint")
        argv = ["pseudomasks", "--model_checkpoint", str(checkpoint), "--datadir", str(data),
                "--output", str(tmp_path / "pm")]
    assert main([*argv, "--store", str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"--store {empty}: no complete tile store there" in err and "weakseg prepare --store" in err


def test_pseudomasks_refuse_a_store_of_another_split(tiny_dfc, tiny_checkpoint, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["prepare", "--datadir", str(tiny_dfc), "--store", str(store)]) == 0
    capsys.readouterr()
    assert main(["pseudomasks", "--model_checkpoint", str(tiny_checkpoint), "--datadir", str(tiny_dfc),
                 "--split", "test", "--output", str(tmp_path / "pm"), "--store", str(store)]) == 2
    assert "holds the split 'validation', but 'test' is read" in capsys.readouterr().err
