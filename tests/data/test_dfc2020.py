import logging
import shutil

import numpy as np
import pytest
import rasterio
import torch

from weakseg.data import open_dataset
from weakseg.data.base import multi_hot_from_mask
from weakseg.data.dfc2020 import DFC2020Dataset, remap_dfc
from weakseg.errors import DataError


def test_real_patch_reads_to_the_right_shapes_and_classes(real_dfc):
    ds = DFC2020Dataset(real_dfc, "validation", "s1s2")
    assert len(ds) == 1 and ds.ids == ["ROIs0000_validation_p0"]
    sample = ds[0]
    assert sample["image"].shape == (15, 256, 256) and sample["image"].dtype == torch.float32
    assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
    assert sample["mask"].shape == (256, 256) and sample["mask"].dtype == torch.int64
    # DFC ids {1, 2, 5, 6, 7, 9} -> 8-class ids {0, 1, 3, 4, 5, 6} (datasets.md 5: Minerva validation p0).
    assert set(sample["mask"].unique().tolist()) == {0, 1, 3, 4, 5, 6}
    # >= 10 % rule: Forest (19.5 %) and Barren (78.4 %) only.
    assert sample["label"].tolist() == [1, 0, 0, 0, 0, 0, 1, 0]
    assert DFC2020Dataset(real_dfc, "validation", "s2")[0]["image"].shape == (13, 256, 256)


def test_remap_lut_sends_nodata_savanna_and_snow_to_ignore():
    dfc = np.arange(11)
    assert remap_dfc(dfc).tolist() == [255, 0, 1, 255, 2, 3, 4, 5, 255, 6, 7]
    assert remap_dfc(np.array([11, -1])).tolist() == [255, 255]


def test_label_rule_keeps_ignored_pixels_in_the_denominator():
    mask = torch.full((10, 10), 255)
    mask[:1] = 2  # exactly 10 % -> present
    mask[1, :9] = 4  # 9 % -> absent
    mask[2:, :] = 255
    assert multi_hot_from_mask(mask, 8).tolist() == [0, 0, 1, 0, 0, 0, 0, 0]


def test_scene_id_spelling_and_wrapping_folders_are_accepted(real_dfc, tmp_path):
    root = tmp_path / "download" / "unzipped"
    shutil.copytree(real_dfc / "ROIs0000_validation", root / "ROIs0000_validation")
    (tmp_path / "download" / "__MACOSX").mkdir()
    for sensor in ("s1", "s2", "dfc"):
        (root / "ROIs0000_validation" / f"{sensor}_validation").rename(root / "ROIs0000_validation" / f"{sensor}_0")
    ds = open_dataset("dfc2020", tmp_path / "download", "validation", modality="s1s2")
    assert ds[0]["image"].shape == (15, 256, 256)
    with pytest.raises(DataError, match="no DFC2020 'test' split"):
        DFC2020Dataset(tmp_path / "download", "test")


def _copy(real_dfc, tmp_path):
    shutil.copytree(real_dfc, tmp_path / "d")
    return tmp_path / "d", tmp_path / "d" / "ROIs0000_validation"


def _rewrite(path, arr, dtype):
    profile = dict(driver="GTiff", height=arr.shape[1], width=arr.shape[2], count=arr.shape[0], dtype=dtype)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(arr.astype(dtype))


def test_missing_and_misnamed_folders(real_dfc, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        DFC2020Dataset(tmp_path / "nope")
    root, split = _copy(real_dfc, tmp_path)
    (split / "s1_validation").rename(split / "S1-validation")
    DFC2020Dataset(root, "validation", "s2")  # S1 not needed for S2 only
    with pytest.raises(DataError, match="has no s1 folder"):
        DFC2020Dataset(root, "validation", "s1s2")
    (split / "s2_validation").rename(split / "sentinel2")
    with pytest.raises(DataError, match="no DFC2020 'validation' split"):
        DFC2020Dataset(root, "validation")


def test_wrong_band_count_size_and_unreadable_files_name_the_file(real_dfc, tmp_path):
    root, split = _copy(real_dfc, tmp_path)
    s2 = split / "s2_validation" / "ROIs0000_validation_s2_0_p0.tif"
    s1 = split / "s1_validation" / "ROIs0000_validation_s1_0_p0.tif"
    ds = DFC2020Dataset(root, "validation", "s1s2")
    _rewrite(s2, np.zeros((4, 256, 256)), "uint16")
    with pytest.raises(DataError, match=r"ROIs0000_validation_s2_0_p0.tif has 4 bands, expected 13"):
        ds[0]
    _rewrite(s2, np.ones((13, 256, 256)), "uint16")
    _rewrite(s1, -np.ones((2, 128, 256)), "float64")
    with pytest.raises(DataError, match=r"s1_0_p0.tif is 128x256 but .*s2_0_p0.tif is 256x256"):
        ds[0]
    s1.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read .*s1_0_p0.tif"):
        ds[0]
    s1.unlink()
    with pytest.raises(DataError, match=r"s1_0_p0.tif is missing"):
        ds[0]


def test_nan_pixels_are_no_data_with_a_warning_and_all_nan_is_an_error(real_dfc, tmp_path, caplog):
    root, split = _copy(real_dfc, tmp_path)
    s1 = split / "s1_validation" / "ROIs0000_validation_s1_0_p0.tif"
    with rasterio.open(s1) as src:
        arr = src.read()
    arr[:, :10] = np.nan
    _rewrite(s1, arr, "float64")
    ds = DFC2020Dataset(root, "validation", "s1s2")
    with caplog.at_level(logging.WARNING):
        sample = ds[0]
    raw = ds.read_image(0)  # S1 NaN rows are no data in all 15 bands (S2 included), never 0
    assert np.isnan(raw[:, :10]).all() and np.isfinite(raw[:, 10:]).all()
    assert not sample["valid"][:10].any() and sample["valid"][10:].all()
    assert (sample["mask"][:10] == 255).all()
    assert (sample["mask"][10:] == torch.from_numpy(ds.read_mask(0)[10:])).all()
    # No transform: the sample is filled with each band's mean over the valid pixels (as Normalize('none')).
    image = sample["image"]
    assert torch.isfinite(image).all()
    band_means = torch.from_numpy(raw[:, 10:].reshape(15, -1).mean(1))
    torch.testing.assert_close(image[:, :10], band_means[:, None, None].expand(15, 10, 256))
    assert "s1_0_p0.tif" in caplog.text and "NaN" in caplog.text
    _rewrite(s1, np.full_like(arr, np.nan), "float64")
    with pytest.raises(DataError, match="no finite pixel"):
        ds[0]


def test_empty_split_and_bad_names(real_dfc, tmp_path):
    root, split = _copy(real_dfc, tmp_path)
    s2_dir = split / "s2_validation"
    (s2_dir / "ROIs0000_validation_s2_0_p0.tif").rename(s2_dir / "tile.tif")
    with pytest.raises(DataError, match="does not follow the DFC2020 naming"):
        DFC2020Dataset(root)
    (s2_dir / "tile.tif").unlink()
    with pytest.raises(DataError, match="holds no S2 tiles.*empty"):
        DFC2020Dataset(root)


def test_synthetic_data_is_read_by_the_same_reader(tiny_dfc):
    train = DFC2020Dataset(tiny_dfc, "validation", "s1s2")
    test = DFC2020Dataset(tiny_dfc, "test", "s2")
    assert (len(train), len(test)) == (24, 8)
    sample = train[0]
    assert sample["image"].shape == (15, 32, 32)
    assert 1 <= sample["label"].sum() <= 4


def test_plot_draws_true_colour_mask_and_prediction(real_dfc, tmp_path):
    from PIL import Image

    ds = DFC2020Dataset(real_dfc, "validation", "s2")
    sample = ds[0]
    sample["prediction"] = np.zeros((256, 256), np.uint8)
    path = ds.plot(sample, tmp_path / "p0.png")
    with Image.open(path) as im:
        assert im.size[0] > im.size[1] > 100  # one row: true colour | ground truth | prediction


# ---- input scaling with hand-computed values ------------------------------------------------------------


def make_mini_dfc(root, s2, s1, dfc, n=1):
    """A DFC2020-layout validation split of ``n`` tiles with the given (C, H, W) arrays (no georeference)."""
    split = root / "ROIs0000_validation"
    for sensor, arr in (("s2", s2), ("s1", s1), ("dfc", dfc)):
        (split / f"{sensor}_validation").mkdir(parents=True)
        for i in range(n):
            name = f"ROIs0000_validation_{sensor}_0_p{i}.tif"
            _rewrite(split / f"{sensor}_validation" / name, arr, arr.dtype.name)
    return root


# S2: band b (0..12) holds [0, 250 (b + 1), 10000, 12000] -> [0, 0.025 (b + 1), 1, 1] (clip at 10000, /10000).
S2_RAW = np.stack([np.array([[0, 250 * (b + 1), 10000, 12000]]) for b in range(13)]).astype(np.uint16)
S2_SCALED = np.stack([np.array([[0.0, 0.025 * (b + 1), 1.0, 1.0]]) for b in range(13)])
# S1 (dB): clip to [-25, 0], then (x + 25) / 25.
#   VV: -30 -> 0, -25 -> 0, -12.5 -> 0.5, +3 -> 1;   VH: -20 -> 0.2, -5 -> 0.8, 0 -> 1, -24 -> 0.04
S1_RAW = np.array([[[-30.0, -25.0, -12.5, 3.0]], [[-20.0, -5.0, 0.0, -24.0]]], np.float32)
S1_SCALED = np.array([[[0.0, 0.0, 0.5, 1.0]], [[0.2, 0.8, 1.0, 0.04]]])
DFC_RAW = np.array([[[1, 2, 10, 0]]], np.uint8)


def test_s2_then_s1_scaling_and_channel_order(tmp_path):
    root = make_mini_dfc(tmp_path, S2_RAW, S1_RAW, DFC_RAW)
    image = DFC2020Dataset(root, "validation", "s1s2").read_image(0)
    assert image.shape == (15, 1, 4) and image.dtype == np.float32
    np.testing.assert_allclose(image[:13], S2_SCALED, rtol=1e-6, atol=1e-7)  # S2 first ...
    np.testing.assert_allclose(image[13:], S1_SCALED, rtol=1e-6, atol=1e-7)  # ... then S1 (VV, VH)
    np.testing.assert_allclose(DFC2020Dataset(root, "validation", "s2").read_image(0), S2_SCALED, rtol=1e-6)
    assert DFC2020Dataset(root, "validation", "s2").read_mask(0).tolist() == [[0, 1, 7, 255]]


def test_nonfinite_values_are_no_data_whatever_their_sign(tmp_path, caplog):
    # Decided on the raw values: clipping first would turn +inf into 1.0 (S1 and S2) and -inf S1 into 0.
    s1 = np.array([[[np.nan, np.inf, -np.inf, -12.5]], [[0.0, -25.0, np.nan, -5.0]]], np.float32)
    s2 = np.full((13, 1, 4), 5000.0, np.float32)
    s2[:, 0, :3] = [np.nan, np.inf, -np.inf]
    root = make_mini_dfc(tmp_path, s2, s1, DFC_RAW)
    with caplog.at_level(logging.WARNING):
        image = DFC2020Dataset(root, "validation", "s1s2").read_image(0)
    assert np.isnan(image[:, 0, :3]).all()  # a pixel with one non-finite band has no data in every band
    np.testing.assert_allclose(image[:, 0, 3], [0.5] * 13 + [0.5, 0.8], rtol=1e-6)
    assert "s1_0_p0.tif: 50.0% of the values are NaN/inf" in caplog.text
    assert "s2_0_p0.tif: 75.0% of the values are NaN/inf" in caplog.text


def test_plain_geotiffs_are_read_without_not_georeferenced_warning(tmp_path):
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    root = make_mini_dfc(tmp_path, S2_RAW, S1_RAW, DFC_RAW)
    s2 = root / "ROIs0000_validation" / "s2_validation" / "ROIs0000_validation_s2_0_p0.tif"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # overrides pyproject's ignore filter: a leak would be recorded
        with rasterio.open(s2) as src:
            src.read()  # the fixture really is non-georeferenced: rasterio itself warns
        assert any(issubclass(w.category, NotGeoreferencedWarning) for w in caught)
        caught.clear()
        DFC2020Dataset(root, "validation", "s1s2")[0]
    assert not [w for w in caught if issubclass(w.category, NotGeoreferencedWarning)]
