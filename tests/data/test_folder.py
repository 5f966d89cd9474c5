import logging
import warnings

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning

from weakseg.data import open_dataset
from weakseg.data.base import multi_hot_from_mask
from weakseg.data.folder import FolderDataset
from weakseg.errors import DataError

# The fixture's labels.csv and masks DISAGREE on purpose, so a reader that takes labels from the wrong source
# fails the tests (a planted "labels from masks instead of labels.csv" bug passed when they agreed):
#   even tiles: mask = left half water, right half forest  -> >= 10 % rule [1, 1, 0]; labels.csv water;forest
#   odd tiles:  mask = water, urban in the last column only -> urban covers 1/size (6.25 % at 16) < 10 %,
#               so the rule gives [1, 0, 0]; labels.csv says water;Urban [1, 0, 1]
CSV_LABELS = {0: [1, 1, 0], 1: [1, 0, 1]}  # by tile parity
MASK_RULE_LABELS = {0: [1, 1, 0], 1: [1, 0, 0]}


def make_folder(root, n=4, masks=True, labels=True, rgb=False, bands=5, size=16):
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("water\nforest\nurban\n")
    rng = np.random.default_rng(0)
    rows = ["id,labels"]
    if masks:
        (root / "masks").mkdir()
    for i in range(n):
        tid = f"tile_{i:03d}"
        mask = np.zeros((size, size), np.uint8)
        if i % 2 == 0:
            mask[:, size // 2 :] = 1
        else:
            mask[:, -1] = 2  # below the 10 % threshold: the rule drops urban, labels.csv keeps it
        if rgb:
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"{tid}.png")
        else:
            arr = rng.integers(0, 10000, (bands, size, size)).astype(np.uint16)
            with rasterio.open(root / "images" / f"{tid}.tif", "w", driver="GTiff", height=size, width=size,
                               count=bands, dtype="uint16") as dst:
                dst.write(arr)
        if masks:
            Image.fromarray(mask).save(root / "masks" / f"{tid}.png")
        rows.append(f"{tid},water;{'forest' if i % 2 == 0 else 'Urban'}")
    if labels:
        (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_csv_labels_and_masks(tmp_path):
    root = make_folder(tmp_path / "d")
    ds = open_dataset("folder", root, "all", modality="s2")
    assert len(ds) == 4 and ds.class_names == ("water", "forest", "urban") and ds.has_masks
    s = ds[1]
    assert s["image"].shape == (5, 16, 16) and float(s["image"].max()) <= 1.0
    assert s["label"].tolist() == [1, 0, 1]  # from labels.csv, case-insensitive class names
    assert s["mask"].shape == (16, 16) and set(s["mask"].unique().tolist()) == {0, 2}
    assert ds.read_mask(0).dtype == np.uint8


def test_labels_from_masks_by_the_ten_percent_rule_and_rgb_images(tmp_path):
    root = make_folder(tmp_path / "d", labels=False, rgb=True)
    ds = FolderDataset(root)
    assert ds[0]["image"].shape == (3, 16, 16)
    assert ds[0]["label"].tolist() == [1, 1, 0]


def test_csv_only_has_no_masks(tmp_path):
    root = make_folder(tmp_path / "d", masks=False)
    ds = FolderDataset(root)
    assert not ds.has_masks and (ds[0]["mask"] == 255).all()
    with pytest.raises(DataError, match="no masks/ folder"):
        ds.read_mask(0)


def test_splits(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("tile_000\ntile_002\n")
    assert FolderDataset(root, "train").ids == ["tile_000", "tile_002"]
    with pytest.raises(DataError, match=r"split 'val' not found.*available: \['all', 'train'\]"):
        FolderDataset(root, "val")
    (root / "splits" / "bad.txt").write_text("tile_009\n")
    with pytest.raises(DataError, match="lists 1 id\\(s\\) with no image"):
        FolderDataset(root, "bad")


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda r: (r / "classes.txt").unlink(), "classes.txt does not exist"),
        (lambda r: (r / "labels.csv").write_text("id,labels\ntile_000,lava\n"), "line 2: unknown class 'lava'"),
        (lambda r: (r / "labels.csv").write_text("name,classes\n"), "must have a header with columns 'id' and 'labels'"),
        (lambda r: (r / "labels.csv").write_text("id,labels\ntile_000,water\n"), "3 image\\(s\\) have no row"),
        (lambda r: (r / "labels.csv").write_text(
            "id,labels\n" + "".join(f"tile_{i:03d},water\n" for i in range(4)) + "tile_777,water\n"),
         "rows for 1 id\\(s\\) with no image"),
        (lambda r: (r / "masks" / "tile_001.png").unlink(), "1 image\\(s\\) have no mask"),
        (lambda r: [p.unlink() for p in [*(r / "images").iterdir(), r / "labels.csv"]], "is empty"),
    ],
)
def test_bad_folders_name_the_problem(tmp_path, damage, message):
    root = make_folder(tmp_path / "d")
    damage(root)
    with pytest.raises(DataError, match=message):
        FolderDataset(root)


def test_bad_mask_values_and_sizes(tmp_path):
    root = make_folder(tmp_path / "d")
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(root / "masks" / "tile_000.png")
    with pytest.raises(DataError, match="holds class id 7 but classes.txt lists 3 classes"):
        FolderDataset(root)[0]
    Image.fromarray(np.zeros((8, 16), np.uint8)).save(root / "masks" / "tile_000.png")
    with pytest.raises(DataError, match="is 8x16 but .*tile_000.tif is 16x16"):
        FolderDataset(root)[0]


def test_multimodal_flag_is_refused_not_ignored_and_cache_works(tmp_path):
    from weakseg.errors import ConfigError

    root = make_folder(tmp_path / "d")
    with pytest.raises(ConfigError, match="--multimodal.*applies to DFC2020"):
        open_dataset("folder", root, "all", modality="s1s2")
    ds = open_dataset("folder", root, "all", cache=True)
    first = ds.read_image(0)
    (root / "images" / "tile_000.tif").unlink()
    assert np.array_equal(ds.read_image(0), first)  # served from memory
    ds[0]["image"].zero_()
    assert first.any()  # samples are copies: changing one does not corrupt the cache


# ---- labels: labels.csv wins; the >= 10 % rule only without it ------------------------------------------


def test_labels_csv_wins_over_masks_for_every_tile(tmp_path):
    root = make_folder(tmp_path / "d", n=4)
    # Make every row disagree with the masks' >= 10 % rule (the fixture's odd tiles already do).
    (root / "labels.csv").write_text(
        "id,labels\ntile_000,urban\ntile_001,forest\ntile_002,water;urban\ntile_003,\n"
    )
    csv_labels = [[0, 0, 1], [0, 1, 0], [1, 0, 1], [0, 0, 0]]
    ds = FolderDataset(root)
    for i in range(4):
        sample = ds[i]
        assert sample["label"].tolist() == csv_labels[i]
        assert multi_hot_from_mask(sample["mask"], 3).tolist() == MASK_RULE_LABELS[i % 2] != csv_labels[i]


def test_labels_csv_labels_are_whole_image_labels_a_transform_does_not_change_them(tmp_path):
    root = make_folder(tmp_path / "d", n=2)

    def all_forest(sample):
        sample["mask"] = torch.ones_like(sample["mask"])
        return sample

    assert FolderDataset(root, transform=all_forest)[1]["label"].tolist() == CSV_LABELS[1]
    (root / "labels.csv").unlink()
    # Without labels.csv the rule runs on the transformed mask.
    assert FolderDataset(root, transform=all_forest)[1]["label"].tolist() == [0, 1, 0]


def test_the_masks_rule_applies_only_without_labels_csv(tmp_path):
    root = make_folder(tmp_path / "d", n=4)
    with_csv = FolderDataset(root)
    assert [with_csv[i]["label"].tolist() for i in range(4)] == [CSV_LABELS[i % 2] for i in range(4)]
    (root / "labels.csv").unlink()
    without = FolderDataset(root)
    assert [without[i]["label"].tolist() for i in range(4)] == [MASK_RULE_LABELS[i % 2] for i in range(4)]
    assert FolderDataset(root, label_threshold=0.05)[1]["label"].tolist() == [1, 0, 1]  # 6.25 % >= 5 %


# ---- labels.csv parsing ---------------------------------------------------------------------------------


def _labels(tmp_path, text, n=4, encoding="utf-8"):
    root = make_folder(tmp_path / "d", n=n, masks=False)
    (root / "labels.csv").write_bytes(text.encode(encoding))
    return root


def test_unquoted_commas_in_a_row_are_an_error_naming_file_line_and_the_fix(tmp_path):
    root = _labels(
        tmp_path, "id,labels\ntile_000,water\ntile_001,urban\ntile_002,water,forest,urban\ntile_003,urban\n"
    )
    with pytest.raises(DataError) as err:
        FolderDataset(root)
    message = str(err.value)
    assert f"{root / 'labels.csv'} line 4: 4 field(s)" in message and "the header has 2" in message
    assert "separate them with ';' or quote the field" in message
    assert 'tile_003,Grassland;Wetlands;Water or tile_003,"Grassland,Wetlands,Water"' in message


def test_a_row_without_its_labels_field_is_an_error(tmp_path):
    root = _labels(tmp_path, "id,labels\ntile_000,water\ntile_001\ntile_002,water\ntile_003,urban\n")
    message = r"labels.csv line 3: 1 field\(s\) \['tile_001'\] but the header has 2.*write 'tile_004,'"
    with pytest.raises(DataError, match=message):
        FolderDataset(root)


def test_several_labels_quoted_or_semicolon_separated_and_extra_columns(tmp_path):
    root = _labels(
        tmp_path,
        'ID, Labels ,notes\n\ntile_000,"water,forest",a\ntile_001, water ; URBAN ;,"b, c"\n'
        "tile_002,forest;forest,\r\ntile_003,urban,\n",
    )
    ds = FolderDataset(root)
    assert [ds[i]["label"].tolist() for i in range(4)] == [[1, 1, 0], [1, 0, 1], [0, 1, 0], [0, 0, 1]]


def test_broken_quoting_is_an_error_naming_the_line(tmp_path):
    root = _labels(tmp_path, 'id,labels\ntile_000,water\ntile_001,"water"forest\n')
    with pytest.raises(DataError, match=r"labels.csv line 3: .*quote a field"):
        FolderDataset(root)


def test_an_empty_labels_field_is_an_image_with_none_of_the_classes(tmp_path, caplog):
    root = _labels(tmp_path, "id,labels\ntile_000,water\ntile_001,\ntile_002,forest\ntile_003, ; \n")
    with caplog.at_level(logging.WARNING, logger="weakseg.data.folder"):
        ds = FolderDataset(root)
    assert ds[1]["label"].tolist() == [0, 0, 0] and ds[3]["label"].tolist() == [0, 0, 0]
    assert "labels.csv: 2 image(s) have an empty labels field" in caplog.text
    assert "'tile_001', 'tile_003'" in caplog.text
    (root / "labels.csv").write_text("id,labels\n" + "".join(f"tile_{i:03d},\n" for i in range(4)))
    with pytest.raises(DataError, match="every labels field in .*labels.csv is empty"):
        FolderDataset(root)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    # Excel's "CSV UTF-8" starts the file with a BOM; read as plain UTF-8 the header would be '\ufeffid'.
    root = _labels(tmp_path, "id,labels\ntile_000,eau\ntile_001,forêt\ntile_002,eau\ntile_003,forêt\n",
                   encoding="utf-8-sig")
    (root / "classes.txt").write_bytes("eau\nforêt\nville\n".encode("utf-8-sig"))
    ds = FolderDataset(root)
    assert ds.class_names == ("eau", "forêt", "ville")
    assert ds[1]["label"].tolist() == [0, 1, 0]


def test_semicolon_or_tab_separated_csv_gets_a_hint(tmp_path):
    root = _labels(tmp_path, "id;labels\ntile_000;water\n")
    message = (
        r"labels.csv line 1: the header 'id;labels' separates columns with ';'; "
        r"use ',' between columns and ';' between labels"
    )
    with pytest.raises(DataError, match=message):
        FolderDataset(root)
    (root / "labels.csv").write_text("id\tlabels\ntile_000\twater\n")
    with pytest.raises(DataError, match="separates columns with tab"):
        FolderDataset(root)


@pytest.mark.parametrize(
    "name,latin1_text,line,byte",
    [
        ("classes.txt", "water\nforêt\nurban\n", 2, "0xea"),
        ("labels.csv", "id,labels\ntile_000,water\ntile_001,water\n\n# forêt\n", 5, "0xea"),
        ("splits/train.txt", "tile_000\ntile_001\ntile_é\n", 3, "0xe9"),
    ],
)
def test_non_utf8_text_files_name_the_file_line_and_encoding(tmp_path, name, latin1_text, line, byte):
    root = make_folder(tmp_path / "d", n=2)
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("tile_000\ntile_001\n")
    (root / name).write_bytes(latin1_text.encode("latin-1"))
    with pytest.raises(DataError) as err:
        FolderDataset(root, "train")
    assert str(err.value).startswith(f"{root / name} line {line} is not UTF-8 (byte {byte}; Latin-1")
    assert "save the file with encoding UTF-8" in str(err.value)
    (root / name).write_bytes(latin1_text.encode("utf-16"))  # Excel's "Unicode text"
    with pytest.raises(DataError, match=rf"{name} is UTF-16 text.*save it as UTF-8"):
        FolderDataset(root, "train")


def test_class_names_are_unique_case_insensitively_and_free_of_label_separators(tmp_path):
    root = make_folder(tmp_path / "d", n=2)
    (root / "classes.txt").write_text("water\nforest\n\nWater\n")
    with pytest.raises(
        DataError, match=r"classes.txt line 4: class 'Water' is listed twice \(first on line 1"
    ):
        FolderDataset(root)
    (root / "classes.txt").write_text("water\nforest\nurban;built-up\n")
    with pytest.raises(DataError, match=r"classes.txt line 3: class 'urban;built-up' contains"):
        FolderDataset(root)
    (root / "labels.csv").unlink()
    assert FolderDataset(root).class_names[2] == "urban;built-up"  # harmless without labels.csv


# ---- pixel scaling --------------------------------------------------------------------------------------


def _one_image(tmp_path, arr, suffix=".tif"):
    """A one-tile folder whose image is ``arr`` (C, H, W) written as is (GeoTIFF) or as a PNG."""
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("water\n")
    (root / "labels.csv").write_text("id,labels\nt,water\n")
    if suffix == ".tif":
        c, h, w = arr.shape
        with rasterio.open(root / "images" / "t.tif", "w", driver="GTiff", height=h, width=w, count=c,
                           dtype=arr.dtype.name) as dst:
            dst.write(arr)
    else:
        Image.fromarray(arr.transpose(1, 2, 0)).save(root / "images" / f"t{suffix}")
    return FolderDataset(root).read_image(0)


def test_uint8_images_are_divided_by_255(tmp_path):
    image = _one_image(tmp_path, np.array([[[0, 51, 102, 255]]], np.uint8))
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, [[[0.0, 0.2, 0.4, 1.0]]], rtol=1e-6)


def test_uint8_png_keeps_the_channel_order(tmp_path):
    rgb = np.stack([np.full((2, 2), v, np.uint8) for v in (0, 51, 255)])  # R, G, B
    image = _one_image(tmp_path, rgb, ".png")
    np.testing.assert_allclose(image[:, 0, 0], [0.0, 0.2, 1.0], rtol=1e-6)


def test_uint16_images_are_divided_by_10000_not_65535_and_not_clipped(tmp_path):
    image = _one_image(tmp_path, np.array([[[0, 2500, 10000, 20000]]], np.uint16))
    np.testing.assert_allclose(image, [[[0.0, 0.25, 1.0, 2.0]]], rtol=1e-6)


def test_float_and_other_integer_images_are_used_as_they_are(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        image = _one_image(tmp_path / "f", np.array([[[-3.5, 0.25, 1234.0, np.nan, np.inf]]], np.float32))
    np.testing.assert_array_equal(image, [[[-3.5, 0.25, 1234.0, np.nan, np.nan]]])  # non-finite: no data (NaN)
    assert "t.tif" in caplog.text and "NaN" in caplog.text
    image = _one_image(tmp_path / "i", np.array([[[-5, 300, 10000]]], np.int16))
    np.testing.assert_array_equal(image, [[[-5.0, 300.0, 10000.0]]])


# ---- no NotGeoreferencedWarning from plain GeoTIFFs / PNGs -------------------------------------------------


def test_reading_plain_tifs_and_pngs_emits_no_not_georeferenced_warning(tmp_path):
    root = make_folder(tmp_path / "d", n=2)  # images: GeoTIFFs without a transform
    for p in (root / "masks").iterdir():  # one mask as GeoTIFF, one as PNG
        if p.stem == "tile_000":
            with rasterio.open(p.with_suffix(".tif"), "w", driver="GTiff", height=16, width=16, count=1,
                               dtype="uint8") as dst:
                dst.write(np.asarray(Image.open(p))[None])
            p.unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # overrides pyproject's ignore filter: a leak would be recorded
        with rasterio.open(root / "images" / "tile_000.tif") as src:
            src.read()  # the fixture really is non-georeferenced: rasterio itself warns
        assert any(issubclass(w.category, NotGeoreferencedWarning) for w in caught)
        caught.clear()
        ds = FolderDataset(root)
        for i in range(2):
            ds[i]
    assert not [w for w in caught if issubclass(w.category, NotGeoreferencedWarning)]
