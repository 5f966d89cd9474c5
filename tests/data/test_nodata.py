"""No data (NaN/inf, GeoTIFF nodata tags): validity, statistics, fill values, targets, skipped tiles, crops.

Numbers are computed by hand in the comments; every dataset is built here, small enough to follow pixel by pixel.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from PIL import Image

from tests.data.test_dfc2020 import DFC_RAW, S2_RAW, make_mini_dfc
from weakseg.data import open_dataset
from weakseg.data.base import multi_hot_from_mask
from weakseg.data.datamodule import WeakSegDataModule, build_transform
from weakseg.data.dfc2020 import DFC2020Dataset
from weakseg.data.folder import FolderDataset
from weakseg.data.nodata import all_true, finite_entries, unlabel_invalid, valid_values
from weakseg.data.normalization import Normalize, compute_band_stats
from weakseg.data.targets import TargetTiles
from weakseg.data.transforms import CenterCrop, RandomAffine, RandomFlipRotate, Resize
from weakseg.errors import DataError

NAN = np.nan


def write_tif(path: Path, arr: np.ndarray, nodata: float | None = None) -> Path:
    """(C, H, W) ``arr`` as a GeoTIFF of its dtype, with a dataset-wide nodata tag (GTiff has one for all bands)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", height=arr.shape[1], width=arr.shape[2], count=arr.shape[0],
                       dtype=arr.dtype.name, nodata=nodata) as dst:
        dst.write(arr)
    return path


def folder(root: Path, images: dict[str, np.ndarray], nodata: float | None = None,
           masks: dict[str, np.ndarray] | None = None, labels: dict[str, str] | None = None,
           classes: str = "water\nforest\n") -> Path:
    """A folder dataset of the given images (and masks / labels.csv rows)."""
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text(classes)
    for tid, arr in images.items():
        write_tif(root / "images" / f"{tid}.tif", arr, nodata)
    if masks is not None:
        (root / "masks").mkdir()
        for tid, m in masks.items():
            Image.fromarray(m.astype(np.uint8)).save(root / "masks" / f"{tid}.png")
    if labels is not None:
        (root / "labels.csv").write_text("id,labels\n" + "".join(f"{t},{v}\n" for t, v in labels.items()))
    return root


# ---- which values are valid --------------------------------------------------------------------------------


def test_valid_values_per_band_tag_nan_and_inf():
    raw = np.array([[[1.0, -9999.0, NAN, np.inf]], [[-9999.0, 2.0, 2.0, -np.inf]]], np.float32)  # (2, 1, 4)
    valid = valid_values(raw, (-9999.0, None))  # band 1 has no tag: its -9999 is a value
    assert valid.tolist() == [[[True, False, False, False]], [[True, True, True, False]]]


def test_an_integer_band_ignores_impossible_tags_and_a_float32_band_matches_its_rounded_tag():
    raw = np.array([[[0.1, 0.2]]], np.float32)
    assert valid_values(raw, (0.1,)).tolist() == [[[False, True]]]  # float32(0.1) != 0.1 as a float64
    ints = np.array([[[0, 3, 65535]]], np.uint16)
    assert valid_values(ints, (0,)).tolist() == [[[False, True, True]]]
    assert valid_values(ints, (3.5,)).all() and valid_values(ints, (-9999,)).all()  # no uint16 equals them
    assert valid_values(ints, (NAN,)).all()  # a NaN tag: nothing in an integer band


# ---- the readers ---------------------------------------------------------------------------------------------


def test_folder_nodata_tag_marks_pixels_in_every_band_targets_and_the_label_rule(tmp_path):
    img = np.stack([np.full((4, 4), 1000), np.full((4, 4), 2000)]).astype(np.uint16)  # scaled 0.1 and 0.2
    img[0, 0, 0] = 0  # nodata in band 0 only -> pixel (0, 0) has no data
    img[1, 3, 3] = 0  # nodata in band 1 only -> pixel (3, 3)
    mask = np.zeros((4, 4), np.uint8)
    mask[0, :] = 1  # forest: row 0 = 4 pixels, 3 of them with data
    root = folder(tmp_path / "d", {"a": img}, nodata=0, masks={"a": mask})
    ds = FolderDataset(root)
    image = ds.read_image(0)
    expected = np.stack([np.full((4, 4), 0.1), np.full((4, 4), 0.2)]).astype(np.float32)
    expected[:, 0, 0] = expected[:, 3, 3] = NAN
    np.testing.assert_allclose(image, expected, rtol=1e-6)  # NaN in both bands, not 0
    sample = ds[0]
    assert sample["mask"][0, 0] == 255 and sample["mask"][3, 3] == 255 and sample["mask"][0, 1] == 1
    assert int(sample["valid"].sum()) == 14
    # Forest covers 3 of the 14 pixels with data: 21.4 % >= 20 %; of all 16 pixels it would be 18.75 % < 20 %.
    assert FolderDataset(root, label_threshold=0.2)[0]["label"].tolist() == [1, 1]
    assert ds.read_target(0)[0, 0] == 255 and ds.read_target(0)[0, 1] == 1 and ds.read_mask(0)[0, 0] == 1


def test_read_target_reads_no_pixels_of_images_that_cannot_hold_no_data(tmp_path, monkeypatch):
    img = np.full((2, 4, 4), 1000, np.uint16)  # uint16, no tag: valid everywhere
    root = folder(tmp_path / "d", {"a": img}, masks={"a": np.ones((4, 4))})

    def no_pixels(self, i):
        raise AssertionError("the image was read")

    monkeypatch.setattr(FolderDataset, "_read_image", no_pixels)
    assert (FolderDataset(root).read_target(0) == 1).all()


def test_s1_and_s2_validity_combine_and_disjoint_data_is_an_error(tmp_path):
    s1 = np.array([[[NAN, -10.0, -10.0, -10.0]], [[-10.0, -10.0, -10.0, -10.0]]], np.float32)
    root = make_mini_dfc(tmp_path / "a", S2_RAW, s1, DFC_RAW)
    ds = DFC2020Dataset(root, "validation", "s1s2")
    assert np.isnan(ds.read_image(0)[:, 0, 0]).all()  # S2 has data there, S1 does not: the pixel has none
    assert ds[0]["mask"].tolist() == [[255, 1, 7, 255]]  # DFC 1 -> 0 becomes 255; p3 was 255 already
    s2 = S2_RAW.astype(np.float32)
    s2[:, 0, 1:] = NAN  # S2 has data only at pixel 0, S1 everywhere but there
    root = make_mini_dfc(tmp_path / "b", s2, s1, DFC_RAW)
    with pytest.raises(DataError, match="have no pixel valid in both") as e:
        DFC2020Dataset(root, "validation", "s1s2").read_image(0)
    assert "s2_0_p0.tif" in str(e.value) and "s1_0_p0.tif" in str(e.value)


def test_an_all_nodata_image_is_an_error_naming_the_file_and_the_tag(tmp_path):
    root = folder(tmp_path / "d", {"a": np.zeros((2, 3, 3), np.uint16)}, nodata=0, labels={"a": "water"})
    with pytest.raises(DataError, match=r"a\.tif has no valid pixel.*nodata value \(0\.0\)"):
        FolderDataset(root).read_image(0)


# ---- the label rule, normalisation and statistics ------------------------------------------------------------


def test_label_rule_divides_by_the_valid_pixels():
    mask = torch.zeros(10, 10, dtype=torch.long)
    mask[0, :9] = 2  # 9 pixels of class 2
    valid = torch.ones(10, 10, dtype=torch.bool)
    valid[8:] = False  # 80 pixels with data
    assert multi_hot_from_mask(mask, 3).tolist() == [1, 0, 0]  # 9 / 100 < 10 %
    assert multi_hot_from_mask(mask, 3, valid=valid).tolist() == [1, 0, 1]  # 9 / 80 = 11.25 %
    assert multi_hot_from_mask(mask, 3, valid=torch.zeros(10, 10, dtype=torch.bool)).tolist() == [0, 0, 0]


def test_label_rule_threshold_is_inclusive_and_ignores_255_and_ids_past_the_classes():
    mask = torch.full((10, 10), 255, dtype=torch.long)  # 255 stays in the area, never a label
    mask[0] = 1  # 10 / 100 = exactly 10 %: a label (>=)
    mask[1, :9] = 0  # 9 %: not a label
    mask[2:5] = 7  # 30 % of an id >= num_classes: dropped, not counted for class 2
    assert multi_hot_from_mask(mask, 3).tolist() == [0, 1, 0]
    assert multi_hot_from_mask(mask, 3).dtype == torch.float32
    assert multi_hot_from_mask(mask.to(torch.uint8), 3, threshold=0.09).tolist() == [1, 1, 0]


def test_finite_entries_equals_torch_isfinite_on_views_and_dtypes():
    image = torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(2, 4, 5)
    image[0, 1, 2], image[1, 3, 4], image[1, 0, 0] = NAN, float("inf"), float("-inf")
    for x in (image, image[:, 1:3, ::2], image.transpose(1, 2), image.half(), image.double(), image.bfloat16()):
        got = finite_entries(x)
        assert got.dtype == torch.bool and got.shape == x.shape
        assert torch.equal(got, torch.isfinite(x)), x.dtype
    assert all_true(finite_entries(image[:, 2:, :2])) and not all_true(finite_entries(image))


def test_standardize_fills_no_data_with_zero_the_band_mean():
    image = torch.tensor([[[1.0, NAN], [7.0, 5.0]]])  # (1, 2, 2); 7 is marked without data by `valid`
    valid = torch.tensor([[True, True], [False, True]])
    out = Normalize("standardize", [3.0], [2.0])({"image": image, "valid": valid})["image"]
    assert out.tolist() == [[[-1.0, 0.0], [0.0, 1.0]]]


def test_per_image_max_ignores_no_data_and_fills_with_the_image_band_mean():
    image = torch.tensor([[[1.0, 8.0], [4.0, 100.0]]])  # 100 has no data (valid False): not the maximum
    valid = torch.tensor([[True, True], [True, False]])
    out = Normalize("per_image_max")({"image": image, "valid": valid})["image"]
    m = 8 + 1e-5
    expected = torch.tensor([[[1 / m, 8 / m], [4 / m, (1 + 8 + 4) / 3 / m]]])
    torch.testing.assert_close(out, expected)


def test_none_fills_no_data_with_the_image_band_mean_not_zero():
    image = torch.tensor([[[-20.0, NAN], [-10.0, -15.0]], [[NAN, NAN], [NAN, NAN]]])  # dB; band 1 has no data
    out = Normalize("none")({"image": image})["image"]
    assert out.tolist() == [[[-20.0, -15.0], [-10.0, -15.0]], [[0.0, 0.0], [0.0, 0.0]]]


def test_band_stats_count_valid_pixels_only():
    class Reader:
        images = [np.array([[[1.0, NAN], [3.0, 5.0]]]), np.array([[[NAN, 7.0]]])]

        def __len__(self):
            return 2

        def read_image(self, i):
            return self.images[i].astype(np.float32)

    mean, std = compute_band_stats(Reader())
    # values 1, 3, 5, 7: mean 4, variance (9 + 1 + 1 + 9) / 4 = 5
    assert mean == pytest.approx([4.0]) and std == pytest.approx([np.sqrt(5.0)])


# ---- transforms move the validity with the mask --------------------------------------------------------------


def coded_sample(h: int = 12, w: int = 12) -> dict:
    """Mask 1 where valid, 0 where not: any misalignment between them shows."""
    valid = torch.rand(h, w) > 0.3
    image = torch.where(valid, torch.ones(h, w), torch.full((h, w), NAN))[None].repeat(3, 1, 1)
    return {"image": image, "mask": valid.long(), "valid": valid, "id": "t"}


def test_crop_flip_and_resize_move_valid_with_the_mask():
    torch.manual_seed(0)
    for _ in range(10):
        out = RandomFlipRotate()(coded_sample())
        assert torch.equal(out["mask"], out["valid"].long())
    out = CenterCrop((6, 8))(coded_sample())
    assert out["valid"].shape == (6, 8) and torch.equal(out["mask"], out["valid"].long())
    out = Resize((5, 5), targets=True)(coded_sample())
    assert out["image"].shape[-2:] == out["mask"].shape == out["valid"].shape == (5, 5)
    assert torch.equal(out["mask"], out["valid"].long())
    assert Resize((5, 5))(coded_sample())["valid"].shape == (12, 12)  # prediction: targets stay at tile size


def test_affine_marks_every_pixel_drawn_from_no_data():
    torch.manual_seed(1)
    image = torch.ones(2, 32, 32)
    image[:, 10:20, 10:20] = NAN
    sample = {"image": image, "mask": torch.zeros(32, 32, dtype=torch.long), "id": "t"}
    out = RandomAffine(degrees=20, translate_px=3, p=1.0)(sample)
    assert torch.isfinite(out["image"]).all()
    invalid = ~out["valid"]
    assert 80 <= int(invalid.sum()) <= 160  # the 10 x 10 block, rotated, with its interpolation rim
    # Pixels with data well inside the tile are exactly 1: nothing of the block leaked into them.
    inside = F.max_pool2d((out["mask"] == 255).float()[None, None], 5, 1, 2)[0, 0] == 0  # away from the zero fill
    inside[:3], inside[-3:], inside[:, :3], inside[:, -3:] = False, False, False, False  # and from the padding
    kept = out["image"][0][out["valid"] & inside]
    torch.testing.assert_close(kept, torch.ones_like(kept))


# ---- refinement targets and written masks --------------------------------------------------------------------


def test_refinement_targets_ignore_no_data_pixels(tmp_path):
    img = np.full((1, 4, 4), 0.5, np.float32)
    img[0, 1, 2] = NAN
    root = folder(tmp_path / "d", {"a": img}, labels={"a": "water"})
    tiles = TargetTiles(FolderDataset(root), [np.ones((4, 4), np.uint8)], lambda s: s, (4, 4))
    sample = tiles[0]
    assert sample["mask"][1, 2] == 255 and int((sample["mask"] == 255).sum()) == 1
    assert torch.isfinite(sample["image"]).all()


def test_written_masks_are_unlabelled_with_confidence_zero_without_data():
    mask, conf = unlabel_invalid(np.ones((2, 2)), np.full((2, 2), 0.8, np.float32),
                                 torch.tensor([[True, False], [True, True]]))
    assert mask.tolist() == [[1, 255], [1, 1]] and conf.ravel().tolist() == pytest.approx([0.8, 0.0, 0.8, 0.8])


# ---- the data module: skipped tiles, statistics, crops -------------------------------------------------------


def stats_folder(root: Path, val: bool = False) -> Path:
    """Three 2x2 tiles of two uint16 bands with nodata 0 (values / 10000 in the comments); tile c has no data."""
    a = np.array([[[1000, 0], [3000, 5000]], [[7000, 7000], [0, 7000]]], np.uint16)  # valid: (0,0), (1,1)
    b = np.array([[[2000, 2000], [0, 0]], [[4000, 6000], [1, 1]]], np.uint16)  # valid: (0,0), (0,1)
    c = np.zeros((2, 2, 2), np.uint16)
    root = folder(root, {"a": a, "b": b, "c": c}, nodata=0, labels={"a": "water", "b": "forest", "c": "water"})
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\nb\nc\n")
    (root / "splits" / "val.txt").write_text("c\n" if val else "a\n")
    return root


def test_unusable_tile_is_skipped_with_its_reason_and_stats_use_valid_pixels_only(tmp_path, caplog):
    root = stats_folder(tmp_path / "d")
    dm = WeakSegDataModule(root, dataset="folder", img_size=(2, 2), train_split="train", val_split="val",
                           normalization="standardize", augmentations=())
    dm.check_tiles()
    with caplog.at_level(logging.WARNING):
        dm.prepare_stats()
    # band 0: 0.1, 0.5 (a) and 0.2, 0.2 (b): mean 0.25, E[x^2] = 0.34 / 4 = 0.085, var 0.0225, std 0.15
    # band 1: 0.7, 0.7 (a) and 0.4, 0.6 (b): mean 0.6,  E[x^2] = 1.5 / 4 = 0.375, var 0.015
    mean, std = dm.data_config["band_stats"]
    assert mean == pytest.approx([0.25, 0.6], abs=1e-6) and std == pytest.approx([0.15, np.sqrt(0.015)], abs=1e-6)
    assert [(t.split, t.id) for t in dm.skipped] == [("train", "c")]
    assert "c.tif has no valid pixel" in dm.skipped[0].reason and dm.skipped[0].file.endswith("c.tif")
    assert "tile c of split 'train' is skipped" in caplog.text and "c.tif" in caplog.text
    train = dm.open("train", "train")
    assert train.ids == ["a", "b"]
    image = train[0]["image"]  # tile a, standardised: (0.1 - 0.25) / 0.15 = -1 at (0, 0); no data -> 0
    assert image[0, 0, 0].item() == pytest.approx(-1.0, abs=1e-5) and image[:, 0, 1].tolist() == [0.0, 0.0]
    assert image[:, 1, 0].tolist() == [0.0, 0.0]
    path = dm.write_skipped_tiles(tmp_path / "out")
    rows = list(csv.DictReader(path.open()))
    assert [(r["split"], r["id"]) for r in rows] == [("train", "c")] and "no valid pixel" in rows[0]["reason"]
    assert dm.skipped_summary()["count"] == 1 and dm.skipped_summary()["per_split"] == {"train": 1, "val": 0}


def test_strict_data_makes_an_unusable_tile_fatal_and_an_empty_split_always_is(tmp_path):
    root = stats_folder(tmp_path / "d")
    dm = WeakSegDataModule(root, dataset="folder", img_size=(2, 2), train_split="train", val_split="val",
                           strict_data=True)
    with pytest.raises(DataError, match=r"1 tile\(s\) cannot be used and --strict_data is set") as e:
        dm.screen_tiles()
    assert "c.tif has no valid pixel" in str(e.value)
    root = stats_folder(tmp_path / "e", val=True)
    dm = WeakSegDataModule(root, dataset="folder", img_size=(2, 2), train_split="train", val_split="val")
    with pytest.raises(DataError, match=r"no tile of split 'val' can be used"):
        dm.screen_tiles()


def test_whole_image_labels_train_on_the_whole_tile_resized_not_a_crop(tmp_path):
    rng = np.random.default_rng(0)
    images = {t: rng.integers(1, 10000, (2, 8, 8)).astype(np.uint16) for t in ("a", "b")}
    root = folder(tmp_path / "d", images, labels={"a": "water", "b": "forest"})
    dm = WeakSegDataModule(root, dataset="folder", img_size=(4, 4), train_split="all", val_split=None,
                           augmentations=())
    sample = dm.open("all", "train")[0]
    assert dm.data_config["train_view"] == "resize" and "crop" not in sample
    whole = torch.from_numpy(images["a"].astype(np.float32) / 10000)
    expected = F.interpolate(whole[None], size=(4, 4), mode="bilinear", align_corners=False, antialias=True)[0]
    torch.testing.assert_close(sample["image"], expected)
    assert sample["mask"].shape == (4, 4) and sample["label"].tolist() == [1, 0]
    val = build_transform("val", (4, 4), dm.data_config)({"image": whole, "mask": torch.zeros(8, 8).long()})
    torch.testing.assert_close(val["image"], expected)  # validation sees what prediction sees


def test_labels_from_masks_are_the_labels_of_the_training_crop(tmp_path):
    torch.manual_seed(0)
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :3] = 1  # forest in the 3 left columns: present in some 8x8 crops, absent from others
    root = folder(tmp_path / "d", {"a": np.full((2, 16, 16), 500, np.uint16)}, masks={"a": mask})
    dm = WeakSegDataModule(root, dataset="folder", img_size=(8, 8), train_split="all", val_split=None,
                           augmentations=())
    reader = dm.open("all", "train")
    seen = set()
    for _ in range(20):
        sample = reader[0]
        top, left = sample["crop"]
        crop = torch.from_numpy(mask[top : top + 8, left : left + 8].astype(np.int64))
        assert sample["label"].tolist() == multi_hot_from_mask(crop, 2).tolist()
        seen.add(tuple(sample["label"].tolist()))
    assert dm.data_config["train_view"] == "crop" and seen == {(1.0, 0.0), (1.0, 1.0)}


def test_open_dataset_read_image_keeps_nan_but_samples_are_finite(tmp_path):
    img = np.full((1, 3, 3), 2.0, np.float32)
    img[0, 0, 0] = NAN
    root = folder(tmp_path / "d", {"a": img}, labels={"a": "water"})
    reader = open_dataset("folder", root, "all")
    assert np.isnan(reader.read_image(0)[0, 0, 0]) and torch.isfinite(reader[0]["image"]).all()
