"""The memory-mapped tile store (weakseg.data.tile_store): what it stores, when it is used, resuming, workers."""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image

from weakseg.data import open_dataset
from weakseg.data.dfc2020 import DFC2020Dataset
from weakseg.data.synthetic import generate_synthetic_dfc2020
from weakseg.data.tile_store import (
    IMAGES_FILE,
    MASKS_FILE,
    META_FILE,
    PROGRESS_FILE,
    TileStore,
    default_store_path,
    prepare_store,
)
from weakseg.errors import DataError


@pytest.fixture()
def dfc(tmp_path: Path) -> Path:
    """12 training tiles (validation) and 4 test tiles of 32 x 32: fresh per test, since tests change files."""
    root = tmp_path / "dfc"
    generate_synthetic_dfc2020(root, num_tiles={"validation": 12, "test": 4}, tile_size=32, seed=0)
    _add_no_data(_s2_file(root, 2))
    return root


def _add_no_data(path: Path) -> None:
    """Rewrite an S2 file as float32 with NaN in its top-left 4 x 4 pixels (no data the store must keep)."""
    with rasterio.open(path) as src:
        arr, profile = src.read().astype(np.float32), src.profile  # (13, H, W)
    arr[:, :4, :4] = np.nan
    profile.update(dtype="float32")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(arr)


def _prepare(root: Path, split: str = "validation", dtype: str = "float16", path: Path | None = None, **kw):
    reader = open_dataset("dfc2020", root, split, store=False, modality=kw.pop("modality", "s2"))
    path = path or default_store_path("dfc2020", root, split, reader.modality)
    return prepare_store(reader, path, kind="dfc2020", root=root, dtype=dtype, **kw)


def _s2_file(root: Path, tile: int) -> Path:
    return root / "ROIs0000_validation" / "s2_validation" / f"ROIs0000_validation_s2_0_p{tile}.tif"


def _dfc_file(root: Path, tile: int) -> Path:
    return root / "ROIs0000_validation" / "dfc_validation" / f"ROIs0000_validation_dfc_0_p{tile}.tif"


def test_float32_store_is_bit_identical_to_the_files_and_masks_equal(dfc):
    result = _prepare(dfc, dtype="float32")
    assert (result.status, result.written, result.skipped) == ("built", 12, [])
    files = open_dataset("dfc2020", dfc, "validation", store=False)
    stored = open_dataset("dfc2020", dfc, "validation")
    assert isinstance(stored._store, TileStore) and files._store is None
    assert stored._store.images.dtype == np.float32 and stored._store.images.shape == (12, 13, 32, 32)
    assert result.meta["max_abs_rounding_error"] == 0.0
    for i in range(len(files)):
        a, b = files.read_image(i), stored.read_image(i)
        assert a.dtype == b.dtype == np.float32
        assert a.tobytes() == b.tobytes()  # bit-identical, NaN (no data) included
        assert np.array_equal(files.read_mask(i), stored.read_mask(i))
    assert np.isnan(stored.read_image(2)).sum() == 13 * 16  # tile 2's no-data corner (fixture)


def test_float16_store_is_within_the_recorded_error_and_keeps_no_data(dfc):
    result = _prepare(dfc, dtype="float16")
    files = open_dataset("dfc2020", dfc, "validation", store=False)
    stored = open_dataset("dfc2020", dfc, "validation")
    assert stored._store.images.dtype == np.float16
    bands = result.meta["band_stats"]
    recorded = np.array([b["max_abs_rounding_error"] for b in bands])  # (13,)
    assert (recorded > 0).all() and (recorded <= 2.0 ** -12).all()  # values in [0, 1]: half a float16 step below 1
    worst = np.zeros(13)
    for i in range(len(files)):
        a, b = files.read_image(i), stored.read_image(i)  # (13, 32, 32)
        assert b.dtype == np.float32
        assert np.array_equal(np.isnan(a), np.isnan(b))  # no-data pixels stay NaN
        worst = np.maximum(worst, np.nanmax(np.abs(a - b).reshape(13, -1), axis=1))
        assert np.array_equal(files.read_mask(i), stored.read_mask(i))
    assert np.isnan(stored.read_image(2)[:, :4, :4]).all() and not stored[2]["valid"][:4, :4].any()
    np.testing.assert_allclose(worst, recorded, rtol=1e-6)  # the recorded error is the one measured
    for b in bands:
        assert b["min"] <= b["mean"] <= b["max"] and b["valid_values"] > 0
    assert os.path.getsize(stored._store.path / IMAGES_FILE) < 12 * 13 * 32 * 32 * 4 * 0.6  # half of float32


def test_a_part_reads_the_same_tiles_through_the_store_and_the_cache_stays_empty(dfc):
    _prepare(dfc, dtype="float32")
    files = open_dataset("dfc2020", dfc, "validation:train", store=False)
    stored = open_dataset("dfc2020", dfc, "validation:train", cache=True)
    assert stored._store is not None and stored.ids == files.ids and len(files) == 9
    for i in range(len(files)):
        a, b = files[i], stored[i]
        assert a["id"] == b["id"]
        for key in ("image", "mask", "valid", "label"):
            assert torch.equal(a[key], b[key]), key
    assert not stored._cache and stored._cache is None  # the memory map is the cache: no dict to copy into


def test_a_touched_or_rewritten_source_makes_the_store_stale_and_the_reader_reads_the_files(dfc, caplog):
    store = _prepare(dfc, dtype="float32").path
    st = os.stat(_s2_file(dfc, 3))
    os.utime(_s2_file(dfc, 3), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
    with caplog.at_level(logging.WARNING, logger="weakseg"):
        reader = open_dataset("dfc2020", dfc, "validation:train")
        open_dataset("dfc2020", dfc, "validation")  # the same store again: no second warning
    assert reader._store is None
    warnings = [r.getMessage() for r in caplog.records if "out of date" in r.getMessage()]
    assert len(warnings) == 1
    assert str(store) in warnings[0] and _s2_file(dfc, 3).name in warnings[0] and "rerun weakseg prepare" in warnings[0]

    _prepare(dfc, dtype="float32")  # up to date again
    assert open_dataset("dfc2020", dfc, "validation")._store is not None
    shutil.copyfile(_dfc_file(dfc, 1), _dfc_file(dfc, 0))  # rewrite tile 0's mask with tile 1's
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="weakseg"):
        reader = open_dataset("dfc2020", dfc, "validation")
    assert reader._store is None and any(_dfc_file(dfc, 0).name in r.getMessage() for r in caplog.records)
    assert np.array_equal(reader.read_mask(0), reader.read_mask(1))  # the new file, not the stored copy


def test_a_killed_prepare_resumes_and_ends_identical_to_an_uninterrupted_one(dfc, tmp_path, monkeypatch):
    whole = _prepare(dfc, path=tmp_path / "whole", flush_every=3)
    original = DFC2020Dataset._read_image
    calls = []

    def dies_at_tile_7(self, i):
        calls.append(i)
        if i == 7:
            raise KeyboardInterrupt  # a kill: nothing after the last checkpoint is trusted
        return original(self, i)

    monkeypatch.setattr(DFC2020Dataset, "_read_image", dies_at_tile_7)
    with pytest.raises(KeyboardInterrupt):
        _prepare(dfc, path=tmp_path / "resumed", flush_every=3)
    monkeypatch.setattr(DFC2020Dataset, "_read_image", original)
    progress = json.loads((tmp_path / "resumed" / PROGRESS_FILE).read_text())
    assert progress["done"] == 6 and not TileStore.exists(tmp_path / "resumed")  # incomplete: no reader uses it

    result = _prepare(dfc, path=tmp_path / "resumed", flush_every=3)
    assert (result.status, result.reused, result.written) == ("resumed", 6, 6)
    for name in (IMAGES_FILE, MASKS_FILE):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    meta = json.loads((tmp_path / "resumed" / META_FILE).read_text())
    assert meta == json.loads((tmp_path / "whole" / META_FILE).read_text())
    assert not (tmp_path / "resumed" / PROGRESS_FILE).exists() and whole.written == 12


def test_a_resume_redoes_everything_when_a_done_tile_changed(dfc, tmp_path):
    partial = _prepare(dfc, path=tmp_path / "s", flush_every=2, limit=5)
    assert partial.status == "incomplete" and not TileStore.exists(tmp_path / "s")
    again = _prepare(dfc, path=tmp_path / "s", flush_every=2, limit=3)  # continues after the 5 done
    assert (again.status, again.reused, again.written) == ("incomplete", 5, 3)
    st = os.stat(_s2_file(dfc, 1))
    os.utime(_s2_file(dfc, 1), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a tile already written changed
    result = _prepare(dfc, path=tmp_path / "s")
    assert (result.status, result.reused, result.written) == ("built", 0, 12)


def test_an_up_to_date_store_is_reused_without_rewriting(dfc):
    path = _prepare(dfc).path
    before = os.stat(path / IMAGES_FILE).st_mtime_ns
    again = _prepare(dfc)
    assert (again.status, again.written, again.reused) == ("up to date", 0, 12)
    assert os.stat(path / IMAGES_FILE).st_mtime_ns == before
    assert _prepare(dfc, overwrite=True).status == "built"


def test_a_dataloader_with_two_workers_reads_through_the_store_and_pickling_skips_the_arrays(dfc, monkeypatch):
    _prepare(dfc, dtype="float32")
    reader = open_dataset("dfc2020", dfc, "validation:train")
    expected = {reader.ids[i]: reader.read_image(i) for i in range(len(reader))}
    assert reader._store._arrays is not None  # opened in this process
    blob = pickle.dumps(reader)
    assert len(blob) < 20_000  # path and ids, not the 12 x 13 x 32 x 32 float32 array (640 kB)
    clone = pickle.loads(blob)  # what a spawned worker or a DDP rank gets
    assert clone._store._arrays is None  # reopened lazily where it is used

    def no_file_reads(self, i):
        raise AssertionError("a worker decoded a GeoTIFF instead of reading the store")

    monkeypatch.setattr(DFC2020Dataset, "_read_image", no_file_reads)
    monkeypatch.setattr(DFC2020Dataset, "_read_mask", no_file_reads)
    loader = torch.utils.data.DataLoader(clone, batch_size=3, num_workers=2)
    seen = {}
    for batch in loader:
        for tile, image in zip(batch["id"], batch["image"], strict=True):
            seen[tile] = image.numpy()
    assert set(seen) == set(expected)
    assert clone._store._arrays is None  # each worker opened its own memory map; this process never did
    assert np.array_equal(clone.read_image(2), expected[clone.ids[2]], equal_nan=True)
    for tile, image in seen.items():
        finite = np.isfinite(expected[tile])  # the sample fills no-data pixels; the rest is the store's values
        assert np.array_equal(image[finite], expected[tile][finite])


def _write_folder(root: Path, sizes: list[int], dtype: str = "uint16", scale: float = 10000.0) -> Path:
    """A folder dataset: 2 classes, 3-band GeoTIFFs of the given sizes, PNG masks."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("water\nforest\n")
    rng = np.random.default_rng(0)
    for i, size in enumerate(sizes):
        arr = (rng.random((3, size, size)) * scale).astype(dtype)  # (3, size, size)
        with rasterio.open(root / "images" / f"t{i}.tif", "w", driver="GTiff", height=size, width=size, count=3,
                           dtype=dtype) as dst:
            dst.write(arr)
        mask = np.zeros((size, size), np.uint8)
        mask[:, size // 2:] = 1
        Image.fromarray(mask).save(root / "masks" / f"t{i}.png")
    return root


def test_mixed_tile_sizes_stop_prepare_naming_the_tile_and_both_sizes_but_the_files_still_read(tmp_path):
    root = _write_folder(tmp_path / "mixed", [16, 16, 24, 16])
    reader = open_dataset("folder", root, "all", store=False)
    with pytest.raises(DataError, match=r"tile t2 .*24x24 but the first tile t0 is 16x16"):
        prepare_store(reader, default_store_path("folder", root, "all"), kind="folder", root=root)
    reader = open_dataset("folder", root, "all")
    assert reader._store is None and reader.read_image(2).shape == (3, 24, 24)


def test_float16_overflow_is_refused_and_float32_stores_it(tmp_path):
    root = _write_folder(tmp_path / "big", [8, 8], dtype="float32", scale=1e6)  # floats are kept as they are
    reader = open_dataset("folder", root, "all", store=False)
    with pytest.raises(DataError, match="float16's range.*--dtype float32"):
        prepare_store(reader, default_store_path("folder", root, "all"), kind="folder", root=root)
    prepare_store(reader, default_store_path("folder", root, "all"), kind="folder", root=root, dtype="float32")
    stored = open_dataset("folder", root, "all")
    assert stored._store is not None and np.array_equal(stored.read_image(1), reader.read_image(1))


def test_an_unreadable_tile_is_listed_as_skipped_and_the_rest_is_stored(dfc):
    _s2_file(dfc, 4).write_bytes(b"not a GeoTIFF")
    result = _prepare(dfc, dtype="float32")
    assert [s.id for s in result.skipped] == ["ROIs0000_validation_p4"]
    assert "cannot read" in result.skipped[0].reason and result.written == 11
    with (result.path / "skipped_tiles.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["split"], r["id"]) for r in rows] == [("validation", "ROIs0000_validation_p4")]
    assert np.load(result.path / IMAGES_FILE, mmap_mode="r").shape == (11, 13, 32, 32)  # skipped rows cut off
    assert np.load(result.path / MASKS_FILE, mmap_mode="r").shape == (11, 32, 32)
    reader = open_dataset("dfc2020", dfc, "validation")
    assert reader._store is not None and reader._store.index_of("ROIs0000_validation_p4") is None
    with pytest.raises(DataError, match="cannot read"):  # not stored, read from its file: the same error as before
        reader.read_image(4)
    files = open_dataset("dfc2020", dfc, "validation", store=False)
    assert np.array_equal(reader.read_image(5), files.read_image(5), equal_nan=True)


def test_stores_are_per_modality_and_an_explicit_store_must_exist(dfc, tmp_path):
    _prepare(dfc, modality="s1s2")
    assert open_dataset("dfc2020", dfc, "validation", modality="s1s2")._store.shape[1] == 15
    assert open_dataset("dfc2020", dfc, "validation")._store is None  # no s2 store yet
    with pytest.raises(DataError, match="no complete tile store"):
        open_dataset("dfc2020", dfc, "validation", store=tmp_path / "nowhere")


# ---- training crops read as windows -----------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["train", "val"])
def test_a_crop_read_as_a_window_of_the_store_is_the_sample_of_the_whole_tile(dfc, stage):
    """Same seed -> the same samples (image, mask, no-data, labels, crop offsets) from the files and the store."""
    from weakseg.data.datamodule import build_transform

    _prepare(dfc, dtype="float32")
    data_config = {"normalization": "none", "augmentations": ["fliprot"], "train_view": "crop"}
    readers = {}
    for name, store in (("files", False), ("store", None)):
        readers[name] = open_dataset("dfc2020", dfc, "validation", store=store)
        readers[name].transform = build_transform(stage, (28, 30), data_config)
    assert readers["store"]._store is not None and readers["files"]._store is None
    samples = {}
    for name, reader in readers.items():
        torch.manual_seed(7)
        samples[name] = [reader[i] for i in range(len(reader))]
    for a, b in zip(samples["files"], samples["store"], strict=True):
        assert a["crop"] == b["crop"] and a["id"] == b["id"]
        assert a["image"].shape == (13, 28, 30)
        assert torch.equal(a["image"].nan_to_num(-7), b["image"].nan_to_num(-7))
        assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["valid"], b["valid"])
        assert torch.equal(a["label"], b["label"])
    crops = {s["crop"] for s in samples["store"]}
    assert len(crops) > 1 if stage == "train" else crops == {(2, 1)}  # random offsets / the centre
    assert not samples["store"][2]["valid"].all()  # tile 2's no-data corner is in its crop


def test_a_stored_tile_under_a_crop_reads_only_the_window(dfc, monkeypatch):
    from weakseg.data.datamodule import build_transform

    _prepare(dfc)
    reader = open_dataset("dfc2020", dfc, "validation")
    reader.transform = build_transform("train", (16, 16), {"normalization": "none", "augmentations": []})
    windows = []
    image = TileStore.image

    def spy(self, k, window=None):
        windows.append(window)
        return image(self, k, window)

    monkeypatch.setattr(TileStore, "image", spy)
    sample = reader[3]
    assert sample["image"].shape == (13, 16, 16)
    assert len(windows) == 1 and windows[0] is not None and windows[0][2:] == (16, 16)
    assert sample["crop"] == windows[0][:2]
    reader.transform = build_transform("predict", (16, 16), {"normalization": "none"})  # a resize: whole tile
    reader[3]
    assert windows[-1] is None


def test_a_window_crop_of_a_tile_smaller_than_the_input_names_the_tile(dfc):
    from weakseg.data.datamodule import build_transform

    _prepare(dfc)
    reader = open_dataset("dfc2020", dfc, "validation")
    reader.transform = build_transform("train", (40, 40), {"normalization": "none", "augmentations": []})
    with pytest.raises(DataError, match=f"tile {reader.ids[0]} is 32x32, smaller than the model input 40x40"):
        reader[0]


def test_float16_narrowing_through_torch_rounds_exactly_as_numpy():
    from weakseg.data.tile_store import _narrow, _widen

    rng = np.random.default_rng(0)
    image = np.concatenate([rng.uniform(-2, 2, 5000), rng.uniform(0, 1e-5, 1000),  # normal and subnormal
                            [np.nan, np.inf, -np.inf, 65504.0, 65519.0, 65520.0, 1e6, 2.0**-25, 0.0, -0.0]]
                           ).astype(np.float32).reshape(1, 1, -1)
    with np.errstate(over="ignore"):
        expected = image.astype(np.float16)
    narrowed = _narrow(image, "float16")
    assert narrowed.dtype == np.float16 and narrowed.tobytes() == expected.tobytes()
    assert _widen(narrowed).tobytes() == expected.astype(np.float32).tobytes()
    assert _narrow(image, "float32").tobytes() == image.tobytes()


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this system")
def test_a_window_read_asks_the_kernel_for_exactly_the_rows_of_the_window(dfc, monkeypatch):
    """The read-ahead request starts at the window's first row of band 0 and ends after its last row of the
    last band (checked against the bytes of images.npy)."""
    _prepare(dfc)
    store = TileStore.open(default_store_path("dfc2020", dfc, "validation", "s2"))
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: calls.append((offset, length, advice)))
    k, top, h = 5, 7, 9
    window = store.image(k, (top, 3, h, 10))  # (13, 9, 10)
    assert len(calls) == 1 and calls[0][2] == os.POSIX_FADV_WILLNEED
    offset, length, _ = calls[0]
    raw = (store.path / "images.npy").read_bytes()
    span = np.frombuffer(raw[offset : offset + length], dtype=np.float16)
    C, H, W = store.images.shape[1:]
    assert length == ((C - 1) * H * W + h * W) * 2
    np.testing.assert_array_equal(span[: W], store.images[k, 0, top])  # first: band 0, row top
    np.testing.assert_array_equal(span[-W:], store.images[k, C - 1, top + h - 1])  # last: last band, last row
    np.testing.assert_array_equal(window, store.images[k, :, top : top + h, 3:13].astype(np.float32))


def test_an_open_store_keeps_a_digest_per_tile_and_still_names_the_changed_file(dfc):
    """Issue 12: the recorded fingerprints (~0.8 kB a tile as lists) are kept as 16-byte digests; the lists are
    read again from meta.json only to say what changed."""
    path = _prepare(dfc, dtype="float32").path
    store = TileStore.open(path)
    digests = store._fingerprints()
    assert len(digests) == 12 and all(isinstance(d, bytes) and len(d) == 16 for d in digests.values())
    reader = open_dataset("dfc2020", dfc, "validation", store=False)
    assert store.is_fresh(reader) == (True, "")
    size = _s2_file(dfc, 5).stat().st_size
    with _s2_file(dfc, 5).open("ab") as f:
        f.write(b"\0")
    name = _s2_file(dfc, 5).relative_to(dfc).as_posix()
    assert store.is_fresh(reader) == (False, f"{name} changed size ({size} -> {size + 1} bytes)")
