"""No data through the CLI: partly-NaN Sentinel-1 (DFC2020 layout) and a folder dataset with a nodata tag train and
get pseudomasks with those pixels ignored; the tile without any data is skipped with its reason (fatal with
``--strict_data``), and the band statistics are those of the valid pixels, computed here by hand from the files.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from PIL import Image

from tests.conftest import TINY_VIT_FLAGS
from weakseg.cli import main
from weakseg.data import open_dataset
from weakseg.evaluation.compare import evaluate_folder

VAL = "ROIs0000_validation"
NAN_ROWS = 8  # S1 rows 0..7 are NaN on the partly-NaN tiles
PARTLY = [0, 1, 2, 3, 4, 5]
ALL_NAN = 6


def s1_file(root: Path, tile: int) -> Path:
    return root / VAL / "s1_validation" / f"{VAL}_s1_0_p{tile}.tif"


def rewrite(path: Path, arr: np.ndarray) -> None:
    with rasterio.open(path) as src:
        profile = src.profile
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(arr)


@pytest.fixture(scope="module")
def nan_dfc(tiny_dfc: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nan_dfc") / "data"
    shutil.copytree(tiny_dfc, root)
    for tile in PARTLY + [ALL_NAN]:
        with rasterio.open(s1_file(root, tile)) as src:
            s1 = src.read()  # (2, 32, 32) float64 dB
        if tile == ALL_NAN:
            s1[:] = np.nan
        else:
            s1[:, :NAN_ROWS] = np.nan
        rewrite(s1_file(root, tile), s1)
    return root


def hand_band_stats(root: Path, ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-band mean and std of the pixels valid in all 15 bands, from the files and the documented scaling;
    also the S1 means a reader that turned NaN into 0 (after scaling) would have reported."""
    pixels, zeroed = [], []
    for tid in ids:
        n = tid.rsplit("_p", 1)[1]
        with rasterio.open(root / VAL / "s2_validation" / f"{VAL}_s2_0_p{n}.tif") as src:
            s2 = np.clip(src.read().astype(np.float64), 0, 10000) / 10000
        with rasterio.open(root / VAL / "s1_validation" / f"{VAL}_s1_0_p{n}.tif") as src:
            s1 = (np.clip(src.read().astype(np.float64), -25, 0) + 25) / 25  # NaN stays NaN
        image = np.concatenate([s2, s1]).reshape(15, -1)
        pixels.append(image[:, np.isfinite(image).all(0)])
        zeroed.append(np.nan_to_num(image[13:], nan=0.0))
    valid = np.concatenate(pixels, axis=1)
    return valid.mean(1), valid.std(1), np.concatenate(zeroed, axis=1).mean(1)


def read_tif(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def test_partly_nan_s1_trains_and_predicts_with_those_pixels_ignored(nan_dfc: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "--datadir", str(nan_dfc), "--multimodal", "--output_dir", str(run),
                 *TINY_VIT_FLAGS]) == 0
    skipped_id = f"{VAL}_p{ALL_NAN}"
    split = "validation:train" if skipped_id in open_dataset("dfc2020", nan_dfc, "validation:train").ids \
        else "validation:holdout"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_tiles"]["count"] == 1 and summary["skipped_tiles"]["per_split"][split] == 1
    rows = list(csv.DictReader((run / "skipped_tiles.csv").open()))
    assert [(r["split"], r["id"]) for r in rows] == [(split, skipped_id)]
    assert f"{s1_file(nan_dfc, ALL_NAN)} has no finite pixel" in rows[0]["reason"]
    assert "skipped tiles    1" in capsys.readouterr().out

    # Band statistics = those of the valid pixels of the usable training tiles, by hand.
    train_ids = [t for t in open_dataset("dfc2020", nan_dfc, "validation:train").ids if t != skipped_id]
    mean, std, zeroed_s1_mean = hand_band_stats(nan_dfc, train_ids)
    stats = yaml.safe_load((run / "config.yaml").read_text())["data"]["band_stats"]
    np.testing.assert_allclose(stats[0], mean, rtol=1e-5)
    np.testing.assert_allclose(stats[1], std, rtol=1e-4)
    assert np.all(np.abs(np.asarray(stats[0][13:]) - zeroed_s1_mean) > 1e-3)  # the old NaN -> 0 was different

    # Pseudomasks: the NaN rows are unlabelled (255, confidence 0), the tile without data a 'skipped' row.
    masks = tmp_path / "masks"
    assert main(["pseudomasks", "--model_checkpoint", str(run / "checkpoints" / "last.ckpt"), "--datadir",
                 str(nan_dfc), "--method", "gradcam", "--output", str(masks), "--no-evaluate"]) == 0
    manifest = {r["id"]: r for r in csv.DictReader((masks / "manifest.csv").open())}
    assert manifest[skipped_id]["status"] == "skipped" and "no finite pixel" in manifest[skipped_id]["reason"]
    for tile in PARTLY:
        mask = read_tif(masks / f"{VAL}_p{tile}.tif")
        confidence = read_tif(masks / "confidence" / f"{VAL}_p{tile}.tif")
        assert (mask[:NAN_ROWS] == 255).all() and (confidence[:NAN_ROWS] == 0).all()
        assert (mask[NAN_ROWS:] < 8).all()
    assert (read_tif(masks / f"{VAL}_p{PARTLY[-1] + 2}.tif") < 8).all()  # a tile with all its data

    # Evaluation scores no pixel without data: evaluated = ground-truth pixels with a class and image data.
    reader = open_dataset("dfc2020", nan_dfc, "validation", modality="s1s2")
    scores = evaluate_folder(masks, reader, allow_missing=True)
    expected = 0
    for i, tid in enumerate(reader.ids):
        if tid == skipped_id:
            continue
        labelled = reader.read_mask(i) != 255
        if int(tid.rsplit("_p", 1)[1]) in PARTLY:
            labelled[:NAN_ROWS] = False
        expected += int(labelled.sum())
    assert scores["evaluated_pixels"] == expected and scores["tiles_missing"] == 1


def test_strict_data_stops_training_at_start_up_naming_the_file(nan_dfc: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--datadir", str(nan_dfc), "--multimodal", "--strict_data", "--output_dir",
                 str(tmp_path / "run"), *TINY_VIT_FLAGS])
    err = capsys.readouterr().err
    assert code == 2 and "--strict_data" in err and f"{s1_file(nan_dfc, ALL_NAN)} has no finite pixel" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_folder_dataset_with_a_nodata_tag_trains_and_predicts_with_nodata_ignored(tmp_path: Path) -> None:
    root = tmp_path / "mydata"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("water\nforest\nurban\n")
    rng = np.random.default_rng(0)
    for i in range(8):
        image = rng.integers(1, 10000, (4, 32, 32)).astype(np.uint16)
        if i < 4:
            image[2, :4] = 0  # band 2 has no data in rows 0..3: the pixels have none
        if i == 7:
            image[:] = 0  # a tile without data
        with rasterio.open(root / "images" / f"tile_{i}.tif", "w", driver="GTiff", height=32, width=32, count=4,
                           dtype="uint16", nodata=0) as dst:
            dst.write(image)
        mask = np.zeros((32, 32), np.uint8)
        mask[:, 16:] = 1 + i % 2
        Image.fromarray(mask).save(root / "masks" / f"tile_{i}.png")
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--datadir", str(root), "--train_split", "all", "--val_split",
                 "none", "--output_dir", str(run), "--imgsize", "32", "--patch_size", "8", "--embed_dim", "24",
                 "--depth", "2", "--num_heads", "4", "--num_epochs", "1", "--train_batch_size", "4"]) == 0
    rows = list(csv.DictReader((run / "skipped_tiles.csv").open()))
    assert [r["id"] for r in rows] == ["tile_7"] and "tile_7.tif has no valid pixel" in rows[0]["reason"]
    masks = tmp_path / "masks"
    assert main(["pseudomasks", "--model_checkpoint", str(run / "checkpoints" / "last.ckpt"), "--datadir",
                 str(root), "--split", "all", "--method", "gradcam", "--output", str(masks), "--no-evaluate"]) == 0
    for i in range(4):
        mask = read_tif(masks / f"tile_{i}.tif")
        assert (mask[:4] == 255).all() and (mask[4:] < 3).all()
    assert (read_tif(masks / "tile_5.tif") < 3).all()
    manifest = {r["id"]: r for r in csv.DictReader((masks / "manifest.csv").open())}
    assert manifest["tile_7"]["status"] == "skipped" and "no valid pixel" in manifest["tile_7"]["reason"]
