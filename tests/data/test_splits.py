"""Tests of the holdout carved from a training split (``<split>:train`` / ``<split>:holdout``)."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import numpy as np
import pytest

from tests.data.test_folder import make_folder
from weakseg.data import open_dataset
from weakseg.data.base import shared_tiles
from weakseg.data.splits import HOLDOUT_SEED, holdout_ids, parse_split, part_indices
from weakseg.errors import DataError


def expected_holdout(ids: list[str]) -> set[str]:
    """The documented rule, written out: the ceil(0.2 N) ids (1..N-1) with the smallest sha256 of the tag."""
    key = {t: hashlib.sha256(f"weakseg-holdout:{HOLDOUT_SEED}:{t}".encode()).hexdigest() for t in ids}
    count = min(len(ids) - 1, max(1, math.ceil(len(ids) / 5)))
    return set(sorted(ids, key=key.__getitem__)[:count])


def tile_ids(n: int, start: int = 0) -> list[str]:
    return [f"ROIs0000_validation_p{i}" for i in range(start, start + n)]


# ---- the rule on id lists ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "size"), [(2, 1), (3, 1), (5, 1), (6, 2), (10, 2), (11, 3), (24, 5), (100, 20)]
)
def test_holdout_size_is_ceil_of_a_fifth_within_one_and_n_minus_one(n: int, size: int) -> None:
    ids = tile_ids(n)
    held = holdout_ids(ids)
    assert len(held) == size and held <= set(ids)
    assert held == expected_holdout(ids)


def test_parts_are_disjoint_cover_the_split_and_keep_its_order() -> None:
    ids = tile_ids(24)
    train, holdout = part_indices(ids, "train"), part_indices(ids, "holdout")
    assert train == sorted(train) and holdout == sorted(holdout)  # split order is kept
    assert not set(train) & set(holdout)
    assert sorted(train + holdout) == list(range(24))
    assert {ids[i] for i in holdout} == expected_holdout(ids)
    assert part_indices(ids, None) == list(range(24))


def test_holdout_does_not_depend_on_the_order_of_the_ids() -> None:
    ids = tile_ids(40)
    shuffled = ids.copy()
    random.Random(0).shuffle(shuffled)
    assert shuffled != ids
    assert holdout_ids(shuffled) == holdout_ids(ids) == holdout_ids(list(reversed(ids)))
    assert holdout_ids(ids) == holdout_ids(tuple(ids))  # repeated calls and any sequence type agree


def test_adding_tiles_moves_few_existing_tiles_between_the_parts() -> None:
    old = tile_ids(100)
    new = old + tile_ids(10, start=100)
    before, after = holdout_ids(old), holdout_ids(new)
    moved = {t for t in old if (t in before) != (t in after)}
    assert len(after) == 22
    assert len(moved) <= 10  # at most one existing tile per added tile changes part
    assert len(moved) < len(before)  # most of the old holdout is still held out


def test_a_different_seed_gives_a_different_but_fixed_holdout() -> None:
    ids = tile_ids(50)
    assert holdout_ids(ids, seed=1) == holdout_ids(ids, seed=1)
    assert holdout_ids(ids, seed=1) != holdout_ids(ids)


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_tiles_cannot_be_divided(n: int) -> None:
    with pytest.raises(DataError, match=f"a split of {n} tile\\(s\\) cannot be divided"):
        holdout_ids(tile_ids(n))
    with pytest.raises(DataError, match="cannot be divided"):
        part_indices(tile_ids(n), "holdout")
    assert part_indices(tile_ids(n), None) == list(range(n))


def test_parse_split_names() -> None:
    assert parse_split("validation") == ("validation", None)
    assert parse_split("validation:train") == ("validation", "train")
    assert parse_split("validation:holdout") == ("validation", "holdout")
    with pytest.raises(DataError, match=r"split 'validation:val'.*must be one of \['train', 'holdout'\]"):
        parse_split("validation:val")
    with pytest.raises(DataError, match="'validation:'"):
        parse_split("validation:")
    with pytest.raises(DataError, match="no name before ':'"):
        parse_split(":holdout")


# ---- readers -----------------------------------------------------------------------------------------------
def test_dfc_parts_through_open_dataset(tiny_dfc) -> None:
    full = open_dataset("dfc2020", tiny_dfc, "validation")
    train = open_dataset("dfc2020", tiny_dfc, "validation:train")
    holdout = open_dataset("dfc2020", tiny_dfc, "validation:holdout")
    assert len(full) == 24 and len(holdout) == 5 and len(train) == 19
    assert set(holdout.ids) == expected_holdout(full.ids)
    assert not set(train.ids) & set(holdout.ids) and set(train.ids) | set(holdout.ids) == set(full.ids)
    assert train.ids == [t for t in full.ids if t in set(train.ids)]  # split order
    assert holdout.split == "validation:holdout" and train.split == "validation:train"
    test_holdout = open_dataset("dfc2020", tiny_dfc, "test:holdout")
    assert len(test_holdout) == 2 and all("_test_" in t for t in test_holdout.ids)


def test_bad_part_name_is_a_data_error_naming_it(tiny_dfc) -> None:
    with pytest.raises(DataError, match="'validation:heldout'"):
        open_dataset("dfc2020", tiny_dfc, "validation:heldout")


@pytest.mark.parametrize("part", ["train", "holdout"])
def test_restricted_dfc_reader_keeps_images_and_masks_with_their_ids(tiny_dfc, part: str) -> None:
    full = open_dataset("dfc2020", tiny_dfc, "validation")
    restricted = open_dataset("dfc2020", tiny_dfc, f"validation:{part}")
    for i, tid in enumerate(restricted.ids):
        j = full.ids.index(tid)
        assert restricted.source_path(i) == full.source_path(j)
        assert restricted.mask_path(i) == full.mask_path(j)
        np.testing.assert_array_equal(restricted.read_image(i), full.read_image(j))
        np.testing.assert_array_equal(restricted.read_mask(i), full.read_mask(j))
        sample = restricted[i]
        assert sample["id"] == tid and sample["index"] == i
        np.testing.assert_array_equal(sample["mask"].numpy(), full.read_mask(j))


def test_restrict_after_reading_into_the_cache_is_refused(tiny_dfc) -> None:
    from weakseg.data.dfc2020 import DFC2020Dataset

    reader = DFC2020Dataset(tiny_dfc, "validation", cache=True)
    reader.restrict([0, 2])  # before any read: fine
    assert reader.ids == ["ROIs0000_validation_p0", "ROIs0000_validation_p2"]
    reader.read_image(1)
    with pytest.raises(RuntimeError, match="before tiles are read into the cache"):
        reader.restrict([0])


def test_folder_dataset_parts_keep_images_masks_and_csv_labels_aligned(tmp_path) -> None:
    root = make_folder(tmp_path / "d", n=6)
    full = open_dataset("folder", root, "all", modality="s2")
    holdout = open_dataset("folder", root, "all:holdout", modality="s2")
    train = open_dataset("folder", root, "all:train", modality="s2")
    assert len(holdout) == 2 and len(train) == 4
    assert set(holdout.ids) == expected_holdout(full.ids)
    assert set(train.ids) == set(full.ids) - set(holdout.ids)
    for reader in (holdout, train):
        for i, tid in enumerate(reader.ids):
            j = full.ids.index(tid)
            np.testing.assert_array_equal(reader.read_image(i), full.read_image(j))
            np.testing.assert_array_equal(reader.read_mask(i), full.read_mask(j))
            assert reader[i]["label"].tolist() == full[j]["label"].tolist()  # labels.csv row of the same id
    with pytest.raises(DataError, match="'all:test'"):
        open_dataset("folder", root, "all:test")


def test_a_one_tile_folder_split_cannot_be_divided(tmp_path) -> None:
    root = make_folder(tmp_path / "d", n=3)
    (root / "splits").mkdir()
    (root / "splits" / "one.txt").write_text("tile_001\n")
    assert open_dataset("folder", root, "one").ids == ["tile_001"]
    with pytest.raises(DataError, match="1 tile\\(s\\) cannot be divided"):
        open_dataset("folder", root, "one:holdout")


# ---- tiles shared by two readers -----------------------------------------------------------------------------
def test_shared_tiles_compares_files_not_ids(tiny_dfc: Path) -> None:
    train = open_dataset("dfc2020", tiny_dfc, "validation")
    test = open_dataset("dfc2020", tiny_dfc, "test")
    holdout = open_dataset("dfc2020", tiny_dfc, "validation:holdout")

    class Renamed:  # the test files under the training split's ids
        ids = train.ids[: len(test.ids)]

        def source_path(self, i: int) -> Path:
            return test.source_path(i)

    assert shared_tiles(train, Renamed()) == []
    assert shared_tiles(train, test) == []
    assert shared_tiles(train, train) == train.ids
    assert len(shared_tiles(train, train)) == len(train.ids)
    assert shared_tiles(train, holdout) == holdout.ids  # a part of the split: its own ids, in its order
    assert shared_tiles(open_dataset("dfc2020", tiny_dfc, "validation:train"), holdout) == []
