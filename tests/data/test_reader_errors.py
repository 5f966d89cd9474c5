"""Every reader rejects bad input with a DataError naming the file: one damaged dataset per case.

Every case starts from a valid dataset, damages one thing, then opens the dataset and reads every tile (some
problems can only show when a file is read). The expected path is given relative to the dataset root and must
appear in full in the message, so "the file" is never left for the user to guess.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from tests.data.test_dfc2020 import DFC_RAW, S1_RAW, S2_RAW, make_mini_dfc
from tests.data.test_folder import make_folder
from weakseg.data.dfc2020 import DFC2020Dataset
from weakseg.data.folder import FolderDataset
from weakseg.errors import DataError


def _tif(path: Path, arr: np.ndarray) -> None:
    """Write (C, H, W) ``arr`` as a GeoTIFF of its dtype."""
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=arr.shape[1],
        width=arr.shape[2],
        count=arr.shape[0],
        dtype=arr.dtype.name,
    ) as dst:
        dst.write(arr)


def _write(name: str, text: str, encoding: str = "utf-8") -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode(encoding))

    return damage


def _unlink(name: str) -> Callable[[Path], None]:
    return lambda root: (root / name).unlink()


def _rmtree(name: str) -> Callable[[Path], None]:
    return lambda root: shutil.rmtree(root / name)


def _both(*damages: Callable[[Path], None]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        for d in damages:
            d(root)

    return damage


ROWS4 = "".join(f"tile_{i:03d},water\n" for i in range(4))
#: (case id, damage, split, path named in the message (relative to root), message regex)
FOLDER_CASES = [
    ("missing root", _rmtree("."), "all", "", "does not exist"),
    ("missing images folder", _rmtree("images"), "all", "images", "does not exist"),
    (
        "no image at all",
        lambda r: [p.unlink() for p in (r / "images").iterdir()],
        "all",
        "images",
        "is empty: .* holds no image",
    ),
    (
        "two images for one id",
        lambda r: Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(r / "images" / "tile_001.png"),
        "all",
        "images",
        "two files for id 'tile_001'",
    ),
    ("missing classes.txt", _unlink("classes.txt"), "all", "classes.txt", "does not exist"),
    ("empty classes.txt", _write("classes.txt", "\n \n"), "all", "classes.txt", "lists no class"),
    (
        "duplicate class",
        _write("classes.txt", "water\nforest\nurban\nForest\n"),
        "all",
        "classes.txt",
        "line 4: class 'Forest' is listed twice",
    ),
    (
        "latin-1 classes.txt",
        _write("classes.txt", "water\nforest\nurbain\nforêt\n", "latin-1"),
        "all",
        "classes.txt",
        "line 4 is not UTF-8",
    ),
    (
        "utf-16 classes.txt",
        _write("classes.txt", "water\nforest\nurban\n", "utf-16"),
        "all",
        "classes.txt",
        "UTF-16",
    ),
    (
        "class name with a separator",
        _write("classes.txt", "water\nforest\nurban;built\n"),
        "all",
        "classes.txt",
        "line 3: class 'urban;built' contains",
    ),
    (
        "latin-1 labels.csv",
        _write("labels.csv", "id,labels\n" + ROWS4 + "tile_009,forêt\n", "latin-1"),
        "all",
        "labels.csv",
        "line 6 is not UTF-8",
    ),
    (
        "';'-separated labels.csv",
        _write("labels.csv", "id;labels\n" + ROWS4.replace(",", ";")),
        "all",
        "labels.csv",
        "separates columns with ';'; use ','",
    ),
    ("empty labels.csv", _write("labels.csv", ""), "all", "labels.csv", "is empty"),
    (
        "bad header",
        _write("labels.csv", "name,classes\n" + ROWS4),
        "all",
        "labels.csv",
        "must have a header with columns 'id' and 'labels'",
    ),
    (
        "duplicate header column",
        _write("labels.csv", "id,labels,labels\n"),
        "all",
        "labels.csv",
        r"line 1: the header names column\(s\) \['labels'\] twice",
    ),
    (
        "unquoted commas",
        _write("labels.csv", "id,labels\n" + ROWS4 + "tile_003,water,forest\n"),
        "all",
        "labels.csv",
        r"line 6: 3 field\(s\)",
    ),
    (
        "row without labels",
        _write("labels.csv", "id,labels\ntile_000\n" + ROWS4[15:]),
        "all",
        "labels.csv",
        r"line 2: 1 field\(s\)",
    ),
    (
        "broken quotes",
        _write("labels.csv", 'id,labels\ntile_000,"water"forest\n'),
        "all",
        "labels.csv",
        "line 2",
    ),
    (
        "unknown class",
        _write("labels.csv", "id,labels\n" + ROWS4.replace("tile_002,water", "tile_002,lava")),
        "all",
        "labels.csv",
        "line 4: unknown class 'lava'",
    ),
    (
        "duplicate id",
        _write("labels.csv", "id,labels\n" + ROWS4 + "tile_001,forest\n"),
        "all",
        "labels.csv",
        r"line 6: id 'tile_001' appears twice \(first on line 3\)",
    ),
    (
        "empty id",
        _write("labels.csv", "id,labels\n" + ROWS4 + " ,forest\n"),
        "all",
        "labels.csv",
        "line 6: empty id",
    ),
    (
        "every labels field empty",
        _write("labels.csv", "id,labels\n" + ROWS4.replace("water", "")),
        "all",
        "labels.csv",
        "every labels field .* is empty",
    ),
    (
        "image without a row",
        _write("labels.csv", "id,labels\n" + ROWS4[:30]),
        "all",
        "labels.csv",
        r"2 image\(s\) have no row",
    ),
    (
        "row without an image",
        _write("labels.csv", "id,labels\n" + ROWS4 + "tile_777,water\n"),
        "all",
        "labels.csv",
        "rows for 1 id",
    ),
    (
        "neither labels.csv nor masks",
        _both(_unlink("labels.csv"), _rmtree("masks")),
        "all",
        "",
        "neither labels.csv nor masks/",
    ),
    ("image without a mask", _unlink("masks/tile_002.png"), "all", "masks", r"1 image\(s\) have no mask"),
    (
        "JPEG mask",
        _both(
            _unlink("masks/tile_002.png"),
            lambda r: Image.fromarray(np.zeros((16, 16), np.uint8)).save(r / "masks" / "tile_002.jpg"),
        ),
        "all",
        "masks/tile_002.jpg",
        "masks must be lossless",
    ),
    (
        "missing split list",
        _unlink("splits/train.txt"),
        "train",
        "splits/train.txt",
        r"split 'train' not found.*available: \['all'\]",
    ),
    (
        "empty split",
        _write("splits/train.txt", "\n\n"),
        "train",
        "splits/train.txt",
        "is empty: .* lists no id",
    ),
    (
        "duplicate id in a split",
        _write("splits/train.txt", "tile_000\ntile_001\ntile_000\n"),
        "train",
        "splits/train.txt",
        r"line 3: id 'tile_000' is listed twice \(first on line 1\)",
    ),
    (
        "split id without an image",
        _write("splits/train.txt", "tile_000\ntile_009\n"),
        "train",
        "splits/train.txt",
        r"lists 1 id\(s\) with no image .*'tile_009' \(.*line 2\)",
    ),
    (
        "latin-1 split",
        _write("splits/train.txt", "tile_000\ntile_é\n", "latin-1"),
        "train",
        "splits/train.txt",
        "line 2 is not UTF-8",
    ),
    (
        "wrong band count",
        lambda r: _tif(r / "images" / "tile_002.tif", np.zeros((3, 16, 16), np.uint16)),
        "all",
        "images/tile_002.tif",
        "has 3 bands, expected 5 like tile_000.tif",
    ),
    (
        "unreadable image",
        lambda r: (r / "images" / "tile_001.tif").write_bytes(b"not a tiff"),
        "all",
        "images/tile_001.tif",
        "cannot read",
    ),
    (
        "all-NaN image",
        lambda r: _tif(r / "images" / "tile_001.tif", np.full((5, 16, 16), np.nan, np.float32)),
        "all",
        "images/tile_001.tif",
        "no finite pixel",
    ),
    (
        "mask of another size",
        lambda r: Image.fromarray(np.zeros((8, 16), np.uint8)).save(r / "masks" / "tile_003.png"),
        "all",
        "masks/tile_003.png",
        "is 8x16 but .*tile_003.tif is 16x16",
    ),
    (
        "mask id >= K",
        lambda r: Image.fromarray(np.full((16, 16), 3, np.uint8)).save(r / "masks" / "tile_001.png"),
        "all",
        "masks/tile_001.png",
        "holds class id 3 but classes.txt lists 3 classes",
    ),
    (
        "negative mask ids",
        _both(
            _unlink("masks/tile_001.png"),
            lambda r: _tif(r / "masks" / "tile_001.tif", np.full((1, 16, 16), -1, np.int16)),
        ),
        "all",
        "masks/tile_001.tif",
        "holds class id -1 but",
    ),
    (
        "float mask",
        _both(
            _unlink("masks/tile_001.png"),
            lambda r: _tif(r / "masks" / "tile_001.tif", np.ones((1, 16, 16), np.float32)),
        ),
        "all",
        "masks/tile_001.tif",
        "holds float32 values",
    ),
    (
        "RGB mask",
        lambda r: Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(r / "masks" / "tile_001.png"),
        "all",
        "masks/tile_001.png",
        "has 3 bands, expected 1",
    ),
]


def _open_and_read_all(reader: Callable[[], object]) -> None:
    ds = reader()
    for i in range(len(ds)):  # type: ignore[arg-type]
        ds[i]  # type: ignore[index]


@pytest.mark.parametrize(
    "damage,split,named,pattern", [c[1:] for c in FOLDER_CASES], ids=[c[0] for c in FOLDER_CASES]
)
def test_folder_reader_bad_inputs_name_the_file(tmp_path, damage, split, named, pattern):
    root = make_folder(tmp_path / "d", n=4)
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("tile_000\ntile_001\n")
    _open_and_read_all(lambda: FolderDataset(root, split))  # the dataset is valid before the damage
    damage(root)
    with pytest.raises(DataError, match=pattern) as err:
        _open_and_read_all(lambda: FolderDataset(root, split))
    assert str(root / named if named else root) in str(err.value)


S2_NAME = "ROIs0000_validation/s2_validation/ROIs0000_validation_s2_0_p1.tif"
S1_NAME = "ROIs0000_validation/s1_validation/ROIs0000_validation_s1_0_p1.tif"
DFC_NAME = "ROIs0000_validation/dfc_validation/ROIs0000_validation_dfc_0_p1.tif"
#: (case id, damage, path named in the message (relative to root), message regex); read with modality s1s2.
DFC_CASES = [
    ("missing root", _rmtree("."), "", "does not exist"),
    ("no split folder", _rmtree("ROIs0000_validation"), "", "no DFC2020 'validation' split below"),
    ("no s1 folder", _rmtree("ROIs0000_validation/s1_validation"), "ROIs0000_validation", "has no s1 folder"),
    (
        "no dfc folder",
        _rmtree("ROIs0000_validation/dfc_validation"),
        "ROIs0000_validation",
        "has no dfc folder",
    ),
    (
        "empty split",
        lambda r: [p.unlink() for p in (r / S2_NAME).parent.iterdir()],
        "ROIs0000_validation/s2_validation",
        "holds no S2 tiles",
    ),
    (
        "badly named tile",
        lambda r: (r / S2_NAME).rename((r / S2_NAME).with_name("tile.tif")),
        "ROIs0000_validation/s2_validation/tile.tif",
        "does not follow the DFC2020 naming",
    ),
    ("missing s1 file", _unlink(S1_NAME), S1_NAME, "is missing"),
    ("missing dfc file", _unlink(DFC_NAME), DFC_NAME, "is missing"),
    ("s2 band count", lambda r: _tif(r / S2_NAME, S2_RAW[:4]), S2_NAME, "has 4 bands, expected 13"),
    ("s1 band count", lambda r: _tif(r / S1_NAME, S1_RAW[:1]), S1_NAME, "has 1 bands, expected 2"),
    (
        "dfc band count",
        lambda r: _tif(r / DFC_NAME, np.concatenate([DFC_RAW, DFC_RAW])),
        DFC_NAME,
        "has 2 bands, expected 1",
    ),
    (
        "s1 of another size",
        lambda r: _tif(r / S1_NAME, S1_RAW[:, :, :2]),
        S1_NAME,
        "is 1x2 but .*s2_0_p1.tif is 1x4",
    ),
    ("mask of another size", lambda r: _tif(r / DFC_NAME, DFC_RAW[:, :, :3]), DFC_NAME, "is 1x3 but"),
    ("unreadable s2", lambda r: (r / S2_NAME).write_bytes(b"garbage"), S2_NAME, "cannot read"),
    ("all-NaN s1", lambda r: _tif(r / S1_NAME, np.full_like(S1_RAW, np.nan)), S1_NAME, "no finite pixel"),
]


@pytest.mark.parametrize("damage,named,pattern", [c[1:] for c in DFC_CASES], ids=[c[0] for c in DFC_CASES])
def test_dfc2020_reader_bad_inputs_name_the_file(tmp_path, damage, named, pattern):
    root = make_mini_dfc(tmp_path / "d", S2_RAW, S1_RAW, DFC_RAW, n=2)
    _open_and_read_all(lambda: DFC2020Dataset(root, "validation", "s1s2"))  # valid before the damage
    damage(root)
    with pytest.raises(DataError, match=pattern) as err:
        _open_and_read_all(lambda: DFC2020Dataset(root, "validation", "s1s2"))
    assert str(root / named if named else root) in str(err.value)
