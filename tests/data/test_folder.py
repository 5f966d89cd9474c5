import numpy as np
import pytest
import rasterio
from PIL import Image

from weakseg.data import open_dataset
from weakseg.data.folder import FolderDataset
from weakseg.errors import DataError


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
        mask[:, size // 2 :] = 1 + i % 2
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
