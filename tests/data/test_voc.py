"""The PASCAL VOC reader on a generated VOC-layout fixture: ids, images, index masks, labels, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weakseg.data import guess_dataset_kind, open_dataset
from weakseg.data.synthetic_voc import make_voc_fixture
from weakseg.data.voc import VOC_CLASSES, VOC_COLORS, VOCDataset, voc_palette
from weakseg.errors import DataError


@pytest.fixture()
def voc(tmp_path: Path) -> Path:
    make_voc_fixture(tmp_path / "data", num_images=8, size=32, seed=1)
    return tmp_path / "data"


def test_reads_the_split_with_index_masks_and_whole_image_labels(voc: Path) -> None:
    reader = open_dataset("voc", voc, "train")
    assert isinstance(reader, VOCDataset) and reader.root == voc / "VOC2012"
    assert reader.ids == (voc / "VOC2012/ImageSets/Segmentation/train.txt").read_text().split()
    assert reader.class_names == VOC_CLASSES and reader.background_index == 0 and not reader.labels_from_crop
    assert VOC_COLORS[:3] == ("#000000", "#800000", "#008000")  # the devkit colour map
    png = Image.open(reader.mask_path(0))
    assert png.mode == "P"  # a palette PNG, read as indices
    mask = reader.read_mask(0)
    np.testing.assert_array_equal(mask, np.asarray(png))
    assert 255 in mask and 0 in mask  # void outlines stay 255, never background
    sample = reader[0]
    assert sample["image"].shape == (3, 32, 32) and 0 <= float(sample["image"].min()) <= float(sample["image"].max()) <= 1
    present = sorted(set(np.unique(mask).tolist()) - {255})
    assert sample["label"].nonzero().flatten().tolist() == present  # any pixel of a class, background included


def test_cls_labels_file_gives_the_labels_with_background_set(tmp_path: Path) -> None:
    make_voc_fixture(tmp_path, num_images=6, size=32, seed=2, cls_labels=True)
    raw = np.load(tmp_path / "VOC2012" / "cls_labels.npy", allow_pickle=True).item()
    tile = next(iter(raw))
    raw[tile] = np.eye(20, dtype=np.float32)[5]  # claim "bus" (id 6) only, whatever the mask says
    np.save(tmp_path / "VOC2012" / "cls_labels.npy", raw)
    for split in ("train", "val"):
        reader = open_dataset("voc", tmp_path, split)
        if tile in reader.ids:
            assert reader[reader.ids.index(tile)]["label"].nonzero().flatten().tolist() == [0, 6]


def test_the_dataset_kind_is_guessed_from_the_layout(voc: Path) -> None:
    assert guess_dataset_kind(voc)[0] == "voc"
    assert guess_dataset_kind(voc / "VOC2012")[0] == "voc"


def test_palette_is_vocs() -> None:
    p = voc_palette(256)
    assert p[15].tolist() == [192, 128, 128] and p[20].tolist() == [0, 64, 128]


@pytest.mark.parametrize("problem", ["no_jpeg", "no_lists", "no_split", "missing_image", "bad_mask", "wrong_size",
                                     "short_cls", "no_masks"])
def test_bad_layouts_name_the_file(voc: Path, problem: str) -> None:
    root = voc / "VOC2012"
    split = "train"
    if problem == "no_jpeg":
        (root / "JPEGImages").rename(root / "images")
        message = "no JPEGImages/"
    elif problem == "no_lists":
        (root / "ImageSets").rename(root / "sets")
        message = "no ImageSets/Segmentation/ folder"
    elif problem == "no_split":
        split, message = "trainaug", r"split 'trainaug' not found: no .*trainaug.txt; available: \['train', 'val'\]"
    elif problem == "missing_image":
        lst = root / "ImageSets/Segmentation/train.txt"
        lst.write_text(lst.read_text() + "2012_999999\n")
        message = r"train.txt line \d+ names '2012_999999', but .*2012_999999.jpg does not exist"
    elif problem == "bad_mask":
        tile = (root / "ImageSets/Segmentation/train.txt").read_text().split()[0]
        Image.fromarray(np.full((32, 32), 77, np.uint8)).save(root / "SegmentationClass" / f"{tile}.png")
        message = r"holds values 77: a VOC mask holds class ids 0..20 and 255"
    elif problem == "wrong_size":
        tile = (root / "ImageSets/Segmentation/train.txt").read_text().split()[0]
        Image.fromarray(np.zeros((16, 32), np.uint8)).save(root / "SegmentationClass" / f"{tile}.png")
        message = r"is 16x32 but .*jpg is 32x32"
    elif problem == "short_cls":
        ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
        np.save(root / "cls_labels.npy", {t: np.zeros(21 if t == ids[0] else 20) for t in ids})
        message = r"cls_labels.npy: the entry of .* has 21 values, expected 20"
    else:
        for f in (root / "SegmentationClass").glob("*.png"):
            f.unlink()
        message = r"ids of .*train.txt have no mask .*; image labels need masks or .*cls_labels.npy"
    with pytest.raises(DataError, match=message):
        reader = open_dataset("voc", voc, split)
        reader[0]
        reader.read_mask(0)
