"""Tests of the synthetic DFC2020 generator: layout, formats, determinism, class structure, idempotence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from weakseg.data.classes import DFC_CLASS_NAMES, DFC_TO_TRAIN_ID, S1_BANDS, S2_BANDS
from weakseg.data.synthetic import (
    BARREN,
    CROPLANDS,
    FOREST,
    GRASSLAND,
    METADATA_FILE,
    MIN_CLASS_FRACTION,
    SHRUBLAND,
    URBAN,
    WATER,
    class_frequencies,
    generate_synthetic_dfc2020,
    synthesize_tile,
    tile_path,
)
from weakseg.errors import ConfigError, DataError

TILE = 32
COUNTS = {"validation": 6, "test": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthetic") / "dfc"
    summary = generate_synthetic_dfc2020(root, COUNTS, tile_size=TILE, seed=3)
    return root, summary


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def many_tiles() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """120 tiles drawn in memory (no files): enough pixels for per-class statistics."""
    return [synthesize_tile(np.random.default_rng([11, 0, i]), TILE) for i in range(120)]


def test_official_layout_and_names(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    expected = {root / METADATA_FILE}
    for sensor in ("s1", "s2", "dfc"):
        for n in range(6):
            name = f"ROIs0000_validation_{sensor}_0_p{n}.tif"
            expected.add(root / "ROIs0000_validation" / f"{sensor}_validation" / name)
        for n in range(2):
            expected.add(root / "ROIs0000_test" / f"{sensor}_0" / f"ROIs0000_test_{sensor}_0_p{n}.tif")
    assert set(_all_files(root)) == expected  # nothing else, in particular no leftover *.tmp
    assert tile_path(root, "test", "s2", 1) == root / "ROIs0000_test/s2_0/ROIs0000_test_s2_0_p1.tif"


def test_dtypes_bands_and_georeference(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    origins = set()
    for split, count in COUNTS.items():
        for n in range(count):
            for sensor, dtype, bands in (
                ("s1", "float64", S1_BANDS),
                ("s2", "uint16", S2_BANDS),
                ("dfc", "int32", None),
            ):
                with rasterio.open(tile_path(root, split, sensor, n)) as src:
                    array = src.read()
                    assert array.dtype == np.dtype(dtype)
                    assert array.shape == (len(bands) if bands else 1, TILE, TILE)
                    assert src.crs.to_epsg() == 32632
                    assert (src.transform.a, src.transform.e) == (10.0, -10.0)
                    if bands:
                        assert src.descriptions == bands
                    transform = src.transform
                if sensor == "s2":
                    origins.add((transform.c, transform.f))
                    assert 300 < np.median(array[S2_BANDS.index("B01")]) < 4000  # L1C-like path radiance
                if sensor == "s1":
                    assert np.isfinite(array).all()
                    assert -60 < array.min() and array.max() < 30
    assert len(origins) == sum(COUNTS.values())  # every tile at its own place


def test_labels_are_dfc_ids_with_one_to_four_visible_classes(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    for split, count in COUNTS.items():
        for n in range(count):
            dfc = _read(tile_path(root, split, "dfc", n))[0]
            assert set(np.unique(dfc)) <= {0, 1, 2, 4, 5, 6, 7, 9, 10}
            labelled = dfc[dfc > 0]
            ids, pixels = np.unique(labelled, return_counts=True)
            assert 1 <= len(ids) <= 4
            assert pixels.min() >= MIN_CLASS_FRACTION * labelled.size


def test_class_structure_over_many_tiles(many_tiles: list) -> None:
    labels = [DFC_TO_TRAIN_ID[dfc] for _, _, dfc in many_tiles]
    counts = np.bincount(np.concatenate([m[m != 255] for m in labels]), minlength=8)
    assert (counts > 0).all()  # all 8 classes occur
    assert counts.max() > 2 * counts.min()  # and not uniformly
    classes_per_tile = [len(set(np.unique(m)) - {255}) for m in labels]
    assert min(classes_per_tile) == 1 and max(classes_per_tile) == 4
    nodata = [(dfc == 0).mean() for _, _, dfc in many_tiles]
    assert 0 < sum(f > 0 for f in nodata) < len(nodata) / 4  # a few tiles exercise the ignore path
    assert max(nodata) <= 0.1


def _class_means(many_tiles: list, sensor: int) -> np.ndarray:
    sums = np.zeros((8, 13 if sensor == 1 else 2))
    pixels = np.zeros(8)
    for tile in many_tiles:
        image, mask = tile[sensor].astype(np.float64), DFC_TO_TRAIN_ID[tile[2]]
        for c in np.unique(mask[mask != 255]):
            sums[c] += image[:, mask == c].sum(1)
            pixels[c] += (mask == c).sum()
    return sums / pixels[:, None]


def test_lookalike_classes_are_spectrally_close(many_tiles: list) -> None:
    s2_means = _class_means(many_tiles, sensor=1)  # (8, 13)

    def dist(a: int, b: int) -> float:
        return float(np.linalg.norm(s2_means[a] - s2_means[b]))

    lookalikes = (SHRUBLAND, GRASSLAND, CROPLANDS)
    within = max(dist(a, b) for a in lookalikes for b in lookalikes if a < b)
    assert within < min(dist(a, WATER) for a in lookalikes)
    assert within < min(dist(a, FOREST) for a in lookalikes)


def test_physical_orderings(many_tiles: list) -> None:
    s2 = _class_means(many_tiles, sensor=1)
    s1 = _class_means(many_tiles, sensor=0)
    nir, red, swir = S2_BANDS.index("B08"), S2_BANDS.index("B04"), S2_BANDS.index("B11")
    assert s2[WATER, nir] < 0.3 * s2[:, nir].mean()  # water absorbs NIR
    assert s2[FOREST, nir] > 2 * s2[FOREST, red]  # vegetation red edge
    assert s2[BARREN, swir] > s2[FOREST, swir]  # soil bright in SWIR
    vv = s1[:, 0]
    assert vv[URBAN] > vv[FOREST] > vv[GRASSLAND] > vv[BARREN] > vv[WATER]  # double bounce ... specular
    assert (s1[:, 1] < s1[:, 0]).all()  # cross-pol below co-pol everywhere


def test_speckle_is_multiplicative(many_tiles: list) -> None:
    # On single-class tiles the per-pixel dB spread is mostly speckle (Gamma with 4.4 looks: about 2.2 dB),
    # the same for dark and bright classes; urban point scatterers add texture on top.
    spread: dict[bool, list[float]] = {True: [], False: []}
    for s1, _, dfc in many_tiles:
        present = set(np.unique(dfc).tolist()) - {0}
        if len(present) == 1:
            spread[present == {7}].append(float(s1[0].std()))
    assert len(spread[False]) >= 5 and all(1.8 < s < 3.5 for s in spread[False])
    assert spread[True] and all(s > max(spread[False]) for s in spread[True])


def test_haze_on_a_few_tiles_shows_in_the_cirrus_band(many_tiles: list) -> None:
    cirrus = np.array([np.median(s2[S2_BANDS.index("B10")]) for _, s2, _ in many_tiles])
    assert np.median(cirrus) < 40  # B10 is absorbed by water vapour: real DFC2020 tiles read about 10-20
    assert 0 < (cirrus > 150).sum() < len(cirrus) / 4


def test_same_seed_gives_identical_files_other_seed_differs(
    dataset: tuple[Path, dict], tmp_path: Path
) -> None:
    root, summary = dataset
    again = generate_synthetic_dfc2020(tmp_path / "again", COUNTS, tile_size=TILE, seed=3)
    assert again == summary
    for path in _all_files(root):
        assert (tmp_path / "again" / path.relative_to(root)).read_bytes() == path.read_bytes(), path
    generate_synthetic_dfc2020(tmp_path / "other", {"validation": 2, "test": 0}, tile_size=TILE, seed=4)
    for sensor in ("s1", "s2", "dfc"):
        first = _read(tile_path(root, "validation", sensor, 0))
        other = _read(tile_path(tmp_path / "other", "validation", sensor, 0))
        assert not np.array_equal(first, other)


def test_tiles_do_not_depend_on_the_tile_count(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = dataset
    generate_synthetic_dfc2020(tmp_path / "fewer", {"validation": 2, "test": 1}, tile_size=TILE, seed=3)
    assert (tmp_path / "fewer" / "ROIs0000_test/s1_0/ROIs0000_test_s1_0_p0.tif").read_bytes() == (
        root / "ROIs0000_test/s1_0/ROIs0000_test_s1_0_p0.tif"
    ).read_bytes()


def test_summary_matches_files(dataset: tuple[Path, dict]) -> None:
    root, summary = dataset
    assert json.loads((root / METADATA_FILE).read_text()) == summary
    assert summary["seed"] == 3 and summary["tile_size"] == TILE and summary["num_tiles"] == COUNTS
    for split, count in COUNTS.items():
        labels = np.stack([_read(tile_path(root, split, "dfc", n))[0] for n in range(count)])
        stats = summary["splits"][split]
        assert stats["nodata_pixels"] == int((labels == 0).sum())
        for name, dfc_id in zip(DFC_CLASS_NAMES, summary["dfc_ids"], strict=True):
            assert stats["class_pixel_counts"][name] == int((labels == dfc_id).sum())
        assert stats["class_frequencies"] == class_frequencies(root, split)
        assert sum(stats["class_frequencies"].values()) == pytest.approx(1.0, abs=1e-5)


def test_rerun_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "dfc"
    first = generate_synthetic_dfc2020(root, {"validation": 2, "test": 1}, tile_size=TILE, seed=0)
    stamps = {p: p.stat().st_mtime_ns for p in _all_files(root)}
    assert generate_synthetic_dfc2020(root, {"validation": 2, "test": 1}, tile_size=TILE, seed=0) == first
    assert {p: p.stat().st_mtime_ns for p in _all_files(root)} == stamps  # nothing rewritten

    missing = tile_path(root, "validation", "s2", 1)
    content = missing.read_bytes()
    missing.unlink()  # an incomplete dataset with the same parameters is regenerated
    generate_synthetic_dfc2020(root, {"validation": 2, "test": 1}, tile_size=TILE, seed=0)
    assert missing.read_bytes() == content


def test_parameter_mismatch_raises_unless_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "dfc"
    generate_synthetic_dfc2020(root, {"validation": 3, "test": 1}, tile_size=TILE, seed=0)
    with pytest.raises(DataError, match=rf"{root}.*seed: 0 there, 1 requested"):
        generate_synthetic_dfc2020(root, {"validation": 3, "test": 1}, tile_size=TILE, seed=1)
    with pytest.raises(DataError, match="tile_size"):
        generate_synthetic_dfc2020(root, {"validation": 3, "test": 1}, tile_size=16, seed=0)

    summary = generate_synthetic_dfc2020(
        root, {"validation": 1, "test": 1}, tile_size=16, seed=1, overwrite=True
    )
    assert summary["seed"] == 1
    assert sorted(p.name for p in (root / "ROIs0000_validation" / "s2_validation").iterdir()) == [
        "ROIs0000_validation_s2_0_p0.tif"  # tiles of the larger old dataset are gone
    ]
    assert _read(tile_path(root, "validation", "s2", 0)).shape == (13, 16, 16)


def test_refuses_folder_with_foreign_dfc_files(tmp_path: Path) -> None:
    foreign = tmp_path / "real" / "ROIs0000_validation" / "s2_validation" / "ROIs0000_validation_s2_0_p0.tif"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"not ours")
    with pytest.raises(DataError, match=r"real.*not written by the synthetic generator"):
        generate_synthetic_dfc2020(
            tmp_path / "real", {"validation": 1, "test": 0}, tile_size=TILE, overwrite=True
        )
    assert foreign.read_bytes() == b"not ours"


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="num_tiles keys"):
        generate_synthetic_dfc2020(tmp_path, {"train": 3}, tile_size=TILE)
    with pytest.raises(ConfigError, match=r"num_tiles\['test'\]"):
        generate_synthetic_dfc2020(tmp_path, {"validation": 1, "test": -1}, tile_size=TILE)
    with pytest.raises(ConfigError, match="tile_size"):
        generate_synthetic_dfc2020(tmp_path, {"validation": 1}, tile_size=8)
    with pytest.raises(DataError, match="no DFC2020 label folder"):
        class_frequencies(tmp_path, "validation")
