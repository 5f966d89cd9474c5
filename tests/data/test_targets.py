"""Tests of weakseg.data.targets: training targets from a mask folder, filtered by confidence."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from weakseg.data import open_dataset
from weakseg.data.targets import TargetMasks, TargetTiles, drop_low_confidence, has_confidence_maps, load_targets
from weakseg.errors import DataError
from weakseg.data.mask_files import confidence_path, write_confidence_geotiff, write_mask_geotiff

TILE = 32
# Hand-made targets of every tile: rows 0-3 unlabelled, rows 2-9 of low confidence (0.2), the rest 0.9.
UNLABELLED_ROWS, LOW_ROWS = slice(0, 4), slice(2, 10)
LOW, HIGH, THRESHOLD = 0.2, 0.9, 0.5
# Ignored with the threshold: rows 0-9 of 32; of those, rows 4-9 were labelled and dropped for confidence.
EXPECTED_IGNORED, EXPECTED_LOW = 10 / 32, 6 / 32


def write_banded_folder(reader, folder: Path, with_confidence: bool = True) -> Path:
    """Masks of class (i % 8) with UNLABELLED_ROWS = 255, and confidence LOW on LOW_ROWS, HIGH elsewhere."""
    for i, tile_id in enumerate(reader.ids):
        mask = np.full((TILE, TILE), i % 8, np.uint8)
        mask[UNLABELLED_ROWS] = 255
        write_mask_geotiff(folder / f"{tile_id}.tif", mask, reader.source_path(i))
        if with_confidence:
            confidence = np.full((TILE, TILE), HIGH, np.float32)
            confidence[LOW_ROWS] = LOW
            write_confidence_geotiff(confidence_path(folder, tile_id), confidence, reader.source_path(i))
    return folder


@pytest.fixture()
def reader(tiny_dfc: Path):
    return open_dataset("dfc2020", tiny_dfc, "validation")


def test_pixel_below_min_confidence_is_ignored_and_one_at_or_above_stays(reader, tmp_path: Path) -> None:
    masks = [np.full((TILE, TILE), 2, np.uint8) for _ in reader.ids]
    for i, tile_id in enumerate(reader.ids):
        write_mask_geotiff(tmp_path / f"{tile_id}.tif", masks[i], None)
        confidence = np.ones((TILE, TILE), np.float32)
        confidence[0, 0] = 127 / 255  # just below the threshold
        confidence[0, 1] = 128 / 255  # exactly the threshold: kept
        confidence[0, 2] = 0.9
        write_confidence_geotiff(confidence_path(tmp_path, tile_id), confidence, None)
    targets = load_targets(tmp_path, reader, "validation", (TILE, TILE), min_confidence=128 / 255)
    assert targets.has_confidence
    for mask in targets.masks:
        assert mask.dtype == np.uint8 and mask.shape == (TILE, TILE)
        assert mask[0, 0] == 255
        assert mask[0, 1] == 2 and mask[0, 2] == 2 and mask[1, 0] == 2
        assert np.count_nonzero(mask == 255) == 1
    assert targets.ignored_fraction == pytest.approx(1 / TILE**2)
    assert targets.low_confidence_fraction == pytest.approx(1 / TILE**2)


def test_drop_low_confidence_keeps_unlabelled_pixels_unlabelled() -> None:
    mask = np.array([[0, 255], [3, 4]], np.uint8)
    confidence = np.array([[0.1, 0.9], [0.5, 0.49]], np.float32)
    assert drop_low_confidence(mask, confidence, 0.5).tolist() == [[255, 255], [3, 255]]
    assert drop_low_confidence(mask, confidence, 0.0).tolist() == mask.tolist()
    assert mask.tolist() == [[0, 255], [3, 4]]  # the input is not modified


def test_ignored_fraction_matches_a_hand_count(reader, tmp_path: Path) -> None:
    folder = write_banded_folder(reader, tmp_path)
    targets = load_targets(folder, reader, "validation", (TILE, TILE), min_confidence=THRESHOLD)
    assert targets.ignored_fraction == pytest.approx(EXPECTED_IGNORED)
    assert targets.low_confidence_fraction == pytest.approx(EXPECTED_LOW)
    for i, mask in enumerate(targets.masks):
        assert (mask[:10] == 255).all() and (mask[10:] == i % 8).all()
    # Without a threshold only the unlabelled rows are ignored.
    unfiltered = load_targets(folder, reader, "validation", (TILE, TILE), min_confidence=0.0)
    assert unfiltered.ignored_fraction == pytest.approx(4 / 32) and unfiltered.low_confidence_fraction == 0.0


def test_missing_confidence_folder_keeps_every_pixel_and_says_so(reader, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    folder = write_banded_folder(reader, tmp_path, with_confidence=False)
    with caplog.at_level(logging.INFO, logger="weakseg"):
        targets = load_targets(folder, reader, "validation", (TILE, TILE), min_confidence=0.99)
    assert not targets.has_confidence and targets.low_confidence_fraction == 0.0
    assert targets.ignored_fraction == pytest.approx(4 / 32)  # only the unlabelled rows
    assert all((mask[4:] == i % 8).all() for i, mask in enumerate(targets.masks))
    messages = [r.getMessage() for r in caplog.records]
    assert any("no confidence/ folder" in m and "every pixel counts as confident" in m for m in messages)


def test_partial_confidence_folder_is_a_data_error_naming_the_folder_and_ids(reader, tmp_path: Path) -> None:
    folder = write_banded_folder(reader, tmp_path)
    for tile_id in ("ROIs0000_validation_p3", "ROIs0000_validation_p7"):
        confidence_path(folder, tile_id).unlink()
    message = (rf"mask folder {tmp_path} has confidence maps \(.*confidence\) for only 22 of the 24 tiles of "
               r"split 'validation'; missing: 'ROIs0000_validation_p3', 'ROIs0000_validation_p7'")
    with pytest.raises(DataError, match=message):
        load_targets(folder, reader, "validation", (TILE, TILE), min_confidence=0.5)
    # Even without a threshold: the folder is inconsistent, and a later threshold would silently skip tiles.
    with pytest.raises(DataError, match=message):
        has_confidence_maps(folder, reader.ids, "validation")


def test_empty_confidence_folder_is_partial_not_absent(reader, tmp_path: Path) -> None:
    folder = write_banded_folder(reader, tmp_path)
    shutil.rmtree(folder / "confidence")
    (folder / "confidence").mkdir()
    with pytest.raises(DataError, match=r"for only 0 of the 24 tiles"):
        load_targets(folder, reader, "validation", (TILE, TILE), min_confidence=0.5)


def test_confidence_maps_of_other_tiles_are_ignored(reader, tmp_path: Path) -> None:
    folder = write_banded_folder(reader, tmp_path)
    write_confidence_geotiff(confidence_path(folder, "ROIs0000_test_p0"), np.zeros((TILE, TILE)), None)
    assert has_confidence_maps(folder, reader.ids, "validation")


def test_confidence_map_of_another_size(reader, tmp_path: Path) -> None:
    folder = write_banded_folder(reader, tmp_path)
    write_confidence_geotiff(confidence_path(folder, "ROIs0000_validation_p5"), np.ones((16, 16)), None)
    message = r"confidence map .*ROIs0000_validation_p5.tif is 16x16 but its mask is 32x32"
    with pytest.raises(DataError, match=message):
        load_targets(folder, reader, "validation", (TILE, TILE), min_confidence=0.5)


def test_ground_truth_targets_count_only_their_own_no_data() -> None:
    masks = [np.array([[1, 255], [2, 3]], np.uint8), np.array([[255, 255], [0, 0]], np.uint8)]
    targets = TargetMasks.from_masks(masks)
    assert targets.ignored_fraction == pytest.approx(3 / 8)
    assert targets.low_confidence_fraction == 0.0 and not targets.has_confidence
    assert all(np.array_equal(a, b) for a, b in zip(targets.masks, masks, strict=True))


# ---- masks read per tile, never held for the split (issue 12) -----------------------------------------------
def held_arrays(masks: object) -> list[str]:
    """Attributes of ``masks`` (or ``masks`` itself, a list) that hold numpy arrays, directly or in a container."""
    items = {"<the sequence>": masks} if isinstance(masks, (list, tuple)) else vars(masks)
    found = []
    for name, value in items.items():
        values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, np.ndarray) for v in values):
            found.append(name)
    return found


def test_targets_keep_file_names_and_read_a_mask_changed_on_disk_as_changed(reader, tmp_path: Path) -> None:
    folder = write_banded_folder(reader, tmp_path)
    targets = load_targets(folder, reader, "validation", (TILE, TILE), min_confidence=THRESHOLD)
    assert held_arrays(targets.masks) == []
    tiles = TargetTiles(reader, targets.masks, lambda s: s, (TILE, TILE))
    assert (tiles[0]["mask"][:10] == 255).all() and (tiles[0]["mask"][10:] == 0).all()
    # After the check: class 5 everywhere, then every pixel confident. Each read sees the files as they are now.
    tile_id = reader.ids[0]
    write_mask_geotiff(folder / f"{tile_id}.tif", np.full((TILE, TILE), 5, np.uint8), reader.source_path(0))
    mask = tiles[0]["mask"]  # (H, W) int64
    assert (mask[:2] == 5).all() and (mask[LOW_ROWS] == 255).all() and (mask[10:] == 5).all()
    write_confidence_geotiff(confidence_path(folder, tile_id), np.full((TILE, TILE), HIGH), reader.source_path(0))
    assert (tiles[0]["mask"] == 5).all() and np.array_equal(targets.masks[0], np.full((TILE, TILE), 5, np.uint8))


def test_a_mask_spoilt_after_the_check_fails_naming_the_file(reader, tmp_path: Path) -> None:
    folder = write_banded_folder(reader, tmp_path)
    targets = load_targets(folder, reader, "validation", (TILE, TILE), min_confidence=0.0)
    path = folder / f"{reader.ids[3]}.tif"
    write_mask_geotiff(path, np.full((TILE, TILE), 200, np.uint8), None)
    with pytest.raises(DataError, match=rf"pseudomask {path} holds values \[200\] that are neither a class id"):
        targets.masks[3]
    write_mask_geotiff(path, np.zeros((16, 16), np.uint8), None)
    with pytest.raises(DataError, match=rf"pseudomask {path} is 16x16 but tile '{reader.ids[3]}'"):
        targets.masks[3]


def test_ground_truth_targets_from_the_reader_are_read_per_tile(reader) -> None:
    targets = TargetMasks.from_reader(reader)
    held = TargetMasks.from_masks([reader.read_mask(i) for i in range(len(reader.ids))])
    assert held_arrays(targets.masks) == [] and len(targets.masks) == len(reader.ids)
    assert targets.ignored_fraction == held.ignored_fraction
    assert all(a.dtype == np.uint8 and np.array_equal(a, b) for a, b in zip(targets.masks, held.masks, strict=True))
