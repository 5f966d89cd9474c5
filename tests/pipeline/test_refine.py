"""Tests of weakseg.pipeline.refine and the ``weakseg refine`` command (stage 3: UNet refinement)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image

import weakseg.pipeline.refine as refine_module
from weakseg.cli import build_parser, main
from weakseg.commands.refine import resolve_refine_config
from weakseg.data import open_dataset
from weakseg.data.datamodule import build_transform
from weakseg.data.synthetic import generate_synthetic_dfc2020
from weakseg.data.targets import TargetTiles, drop_low_confidence, load_mask_folder
from weakseg.errors import ConfigError, DataError
from weakseg.evaluation.compare import evaluate_folder, read_prediction_mask
from weakseg.data.mask_files import (
    confidence_path,
    read_confidence,
    write_confidence_geotiff,
    write_mask_geotiff,
)
from weakseg.pipeline.refine import (
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_LR_SCHEDULE,
    DEFAULT_MIN_CONFIDENCE,
    RefineConfig,
    refine,
)
from weakseg.pipeline.tables import format_refine_table
from weakseg.tasks.segmentation import SegmentationTask

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
]

TILE = 32
WIDTHS = [4, 8]  # one pooling: tiles must be even
FAST = dict(widths=WIDTHS, epochs=1, batch_size=4)
REAL_FIT = refine_module._fit


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("refine_data")
    generate_synthetic_dfc2020(root, {"validation": 8, "test": 4}, tile_size=TILE, seed=1)
    return root


def write_noisy_pseudomasks(data_root: Path, folder: Path, seed: int = 0) -> Path:
    """Ground truth with 30 % of the pixels set to a random class and 10 % unlabelled (255)."""
    reader = open_dataset("dfc2020", data_root, "validation")
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, tile_id in enumerate(reader.ids):
        mask = reader.read_mask(i).copy()
        noisy = rng.random(mask.shape) < 0.3
        mask[noisy] = rng.integers(0, 8, int(noisy.sum()))
        mask[rng.random(mask.shape) < 0.1] = 255
        write_mask_geotiff(folder / f"{tile_id}.tif", mask, reader.source_path(i))
    return folder


@pytest.fixture(scope="module")
def pseudomasks(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_noisy_pseudomasks(data_root, tmp_path_factory.mktemp("refine_pm") / "pm")


@pytest.fixture(scope="module")
def refined(data_root: Path, pseudomasks: Path,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[dict[str, Any]]]:
    """One real run shared by the layout tests: 2 iterations with a held-out eval split, training recorded."""
    out = tmp_path_factory.mktemp("refine_out") / "run"
    cfg = RefineConfig(datadir=str(data_root), pseudomasks=str(pseudomasks), output_dir=str(out),
                       eval_split="test", iterations=2, seed=10, **FAST)
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = record_fits(monkeypatch)
        summary = refine(cfg)
    return out, summary, calls


def make_cfg(data_root: Path, pseudomasks: Path | None, out: Path, **kwargs: Any) -> RefineConfig:
    settings = {**FAST, **kwargs}
    return RefineConfig(datadir=str(data_root), pseudomasks=None if pseudomasks is None else str(pseudomasks),
                        output_dir=str(out), **settings)


def record_fits(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace training by a recording wrapper around the real one; returns the list of calls."""
    calls: list[dict[str, Any]] = []

    def fit(task: Any, trainer: Any, loader: Any) -> None:
        calls.append({"targets": [m.copy() for m in loader.dataset.masks], "seed": torch.initial_seed(),
                      "hparams": dict(task.hparams)})
        REAL_FIT(task, trainer, loader)

    monkeypatch.setattr(refine_module, "_fit", fit)
    return calls


def forbid_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    def fit(*args: Any) -> None:
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(refine_module, "_fit", fit)


def mtimes(folder: Path) -> dict[str, int]:
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in files}


# ---- layout and scores -------------------------------------------------------------------------------------
def test_output_layout_and_summary(refined: tuple[Path, dict, list], data_root: Path) -> None:
    out, summary, _ = refined
    train_ids = open_dataset("dfc2020", data_root, "validation").ids
    test_ids = open_dataset("dfc2020", data_root, "test").ids
    assert (out / "config.yaml").is_file()
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert [e["iteration"] for e in summary["iterations"]] == [0, 1, 2]
    assert summary["final_masks"] == str(out / "iter2" / "masks")
    assert (out / "iter0" / "scores.json").is_file()
    for i in (1, 2):
        stage = out / f"iter{i}"
        for name in ("done.json", "scores.json", "unet.ckpt", "metrics.csv"):
            assert (stage / name).is_file(), name
        assert sorted(p.stem for p in (stage / "masks").glob("*.tif")) == sorted(train_ids)
        assert sorted(p.stem for p in (stage / "eval_masks").glob("*.tif")) == sorted(test_ids)
        entry = summary["iterations"][i]
        assert entry["masks"] == str(stage / "masks") and entry["eval_masks"] == str(stage / "eval_masks")
        assert set(entry["train_scores"]) == {"miou", "oa", "aa", "coverage"}
        assert entry["eval_scores"]["miou"] is not None and not entry["resumed"]
    assert not list(out.rglob("*.tmp*")), "temporary files left behind"


def test_iteration0_scores_equal_direct_evaluation(refined: tuple[Path, dict, list], data_root: Path,
                                                   pseudomasks: Path) -> None:
    out, summary, _ = refined
    direct = evaluate_folder(pseudomasks, open_dataset("dfc2020", data_root, "validation"))
    stored = json.loads((out / "iter0" / "scores.json").read_text())["train_tiles"]
    assert stored["confusion_matrix"] == direct["confusion_matrix"]
    expected = {key: direct[key] for key in ("miou", "oa", "aa", "coverage")}
    assert summary["iterations"][0]["train_scores"] == expected
    assert direct["coverage"] < 1.0  # the 255 pixels of the pseudomasks count as unlabelled


def test_iteration_scores_equal_direct_evaluation(refined: tuple[Path, dict, list], data_root: Path) -> None:
    out, summary, _ = refined
    test_reader = open_dataset("dfc2020", data_root, "test")
    train_reader = open_dataset("dfc2020", data_root, "validation")
    for i in (1, 2):
        held_out = evaluate_folder(out / f"iter{i}" / "eval_masks", test_reader)
        train = evaluate_folder(out / f"iter{i}" / "masks", train_reader)
        assert summary["iterations"][i]["eval_scores"]["miou"] == pytest.approx(held_out["miou"])
        assert summary["iterations"][i]["train_scores"]["oa"] == pytest.approx(train["oa"])
        assert train["coverage"] == 1.0  # the UNet labels every pixel


def test_predictions_have_tile_size_dtype_and_georeference(refined: tuple[Path, dict, list],
                                                           data_root: Path) -> None:
    out, _, _ = refined
    for split, folder in (("validation", "masks"), ("test", "eval_masks")):
        reader = open_dataset("dfc2020", data_root, split)
        for i, tile_id in enumerate(reader.ids):
            with rasterio.open(out / "iter1" / folder / f"{tile_id}.tif") as pred, \
                    rasterio.open(reader.source_path(i)) as src:
                assert pred.count == 1 and pred.dtypes == ("uint8",)
                assert (pred.height, pred.width) == (TILE, TILE)
                assert pred.crs is not None and pred.crs == src.crs
                assert pred.transform == src.transform
                assert pred.read(1).max() < 8


def test_each_iteration_trains_on_previous_masks_with_its_seed(refined: tuple[Path, dict, list],
                                                             data_root: Path, pseudomasks: Path) -> None:
    out, _, calls = refined
    reader = open_dataset("dfc2020", data_root, "validation")
    assert [c["seed"] for c in calls] == [11, 12]  # seed + iteration
    expected_iter1 = [read_prediction_mask(pseudomasks / f"{t}.tif") for t in reader.ids]
    expected_iter2 = [read_prediction_mask(out / "iter1" / "masks" / f"{t}.tif") for t in reader.ids]
    assert all(np.array_equal(a, b) for a, b in zip(calls[0]["targets"], expected_iter1, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(calls[1]["targets"], expected_iter2, strict=True))


def test_unet_learns_single_class_pseudomasks(data_root: Path, tmp_path: Path) -> None:
    """Pseudomasks labelling every pixel class 3: the trained UNet predicts class 3 everywhere."""
    reader = open_dataset("dfc2020", data_root, "validation")
    folder = tmp_path / "pm"
    folder.mkdir()
    for i, tile_id in enumerate(reader.ids):
        constant = np.full((TILE, TILE), 3, np.uint8)
        write_mask_geotiff(folder / f"{tile_id}.tif", constant, reader.source_path(i))
    summary = refine(make_cfg(data_root, folder, tmp_path / "out", iterations=1, epochs=6, lr=0.02,
                               lr_schedule="constant"))
    for tile_id in reader.ids:
        assert (read_prediction_mask(tmp_path / "out" / "iter1" / "masks" / f"{tile_id}.tif") == 3).all()
    # Same masks, same scores: the refined iteration scores exactly like the constant input.
    assert summary["iterations"][1]["train_scores"] == summary["iterations"][0]["train_scores"]


def test_training_samples_flip_and_rotate_image_and_mask_together(data_root: Path) -> None:
    reader = open_dataset("dfc2020", data_root, "validation")
    image = reader.read_image(0)  # (C, H, W)
    # A mask computed from the image: any transform that moved them apart would break the relation.
    mask = (image[3] > np.median(image[3])).astype(np.uint8)  # (H, W)
    config = {"normalization": "none", "band_stats": None, "augmentations": ["fliprot"]}
    tiles = TargetTiles(reader, [mask] * len(reader.ids), build_transform("train", (TILE, TILE), config),
                        (TILE, TILE))
    torch.manual_seed(0)
    moved = 0
    for _ in range(12):
        sample = tiles[0]
        band = sample["image"][3].numpy()
        assert np.array_equal(sample["mask"].numpy(), (band > np.median(image[3])).astype(np.int64))
        moved += not np.array_equal(band, image[3])
    assert moved > 0, "augmentation never changed the tile"


# ---- supervised --------------------------------------------------------------------------------------------
def test_supervised_trains_on_ground_truth_beside_the_refinement(
    refined: tuple[Path, dict, list], data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, first, _ = refined
    calls = record_fits(monkeypatch)
    summary = refine(make_cfg(data_root, None, out, supervised=True, eval_split="test", seed=10))
    reader = open_dataset("dfc2020", data_root, "validation")
    assert len(calls) == 1 and calls[0]["seed"] == 11  # seed + 1: the same initialisation as iteration 1
    assert all(np.array_equal(a, reader.read_mask(i)) for i, a in enumerate(calls[0]["targets"]))
    stage = out / "supervised"
    assert sorted(p.stem for p in (stage / "masks").glob("*.tif")) == sorted(reader.ids)
    assert len(list((stage / "eval_masks").glob("*.tif"))) == 4
    assert (stage / "done.json").is_file() and (out / "config_supervised.yaml").is_file()
    direct = evaluate_folder(stage / "eval_masks", open_dataset("dfc2020", data_root, "test"))
    assert summary["supervised"]["eval_scores"]["miou"] == pytest.approx(direct["miou"])
    # One summary for both modes: the refinement's iterations are kept.
    assert summary["iterations"] == json.loads(json.dumps(first["iterations"]))
    assert json.loads((out / "summary.json").read_text())["supervised"]["masks"] == str(stage / "masks")


# ---- resume ------------------------------------------------------------------------------------------------
def test_resume_skips_finished_iterations_and_extends(
    data_root: Path, pseudomasks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    refine(make_cfg(data_root, pseudomasks, out, iterations=1))
    before = mtimes(out / "iter1")
    forbid_fits(monkeypatch)
    summary = refine(make_cfg(data_root, pseudomasks, out, iterations=1))
    assert mtimes(out / "iter1") == before
    assert summary["iterations"][1]["resumed"] and summary["iterations"][1]["train_scores"] is not None

    calls = record_fits(monkeypatch)
    summary = refine(make_cfg(data_root, pseudomasks, out, iterations=2))
    assert len(calls) == 1 and calls[0]["seed"] == 2  # only the new iteration trained
    assert mtimes(out / "iter1") == before
    assert [e["resumed"] for e in summary["iterations"]] == [False, True, False]


def test_unfinished_iteration_is_redone_and_later_ones_unmarked(
    data_root: Path, pseudomasks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    refine(make_cfg(data_root, pseudomasks, out, iterations=2))
    (out / "iter1" / "done.json").unlink()  # as if killed while iteration 1 was written
    (out / "iter1" / "masks" / "stale.tif").write_bytes(b"")  # a leftover file must not survive
    calls = record_fits(monkeypatch)
    refine(make_cfg(data_root, pseudomasks, out, iterations=1))
    assert [c["seed"] for c in calls] == [1]
    assert not (out / "iter1" / "masks" / "stale.tif").exists()
    # iteration 2 was made from the old iteration-1 masks: it must not be reused later
    assert not (out / "iter2" / "done.json").exists()


def test_new_eval_split_on_resume_uses_the_saved_unet(
    data_root: Path, pseudomasks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    refine(make_cfg(data_root, pseudomasks, out, iterations=1))
    assert not (out / "iter1" / "eval_masks").exists()
    forbid_fits(monkeypatch)
    summary = refine(make_cfg(data_root, pseudomasks, out, iterations=1, eval_split="test"))
    assert len(list((out / "iter1" / "eval_masks").glob("*.tif"))) == 4
    assert summary["iterations"][1]["eval_scores"]["miou"] is not None
    assert json.loads((out / "iter1" / "done.json").read_text())["eval_split"] == "test"


def test_changed_settings_refuse_to_reuse_a_finished_iteration(refined: tuple[Path, dict, list],
                                                              data_root: Path, pseudomasks: Path) -> None:
    out, _, _ = refined
    before = mtimes(out)
    message = r"iter1 was finished with other settings \(epochs: 1 then, 2 now\)"
    with pytest.raises(ConfigError, match=message):
        refine(make_cfg(data_root, pseudomasks, out, iterations=2, seed=10, epochs=2))
    assert mtimes(out) == before  # refused before writing anything


# ---- errors ------------------------------------------------------------------------------------------------
def test_missing_pseudomask_folder(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"pseudomask folder .*nowhere does not exist \(--pseudomasks\)"):
        refine(make_cfg(data_root, tmp_path / "nowhere", tmp_path / "out"))


def test_pseudomask_folder_lacking_tiles_names_count_and_ids(data_root: Path, tmp_path: Path) -> None:
    folder = write_noisy_pseudomasks(data_root, tmp_path / "pm")
    for name in ("ROIs0000_validation_p2.tif", "ROIs0000_validation_p5.tif"):
        (folder / name).unlink()
    with pytest.raises(DataError, match=r"lacks masks for 2 of the 8 tiles of split 'validation': "
                                        r"'ROIs0000_validation_p2', 'ROIs0000_validation_p5'"):
        refine(make_cfg(data_root, folder, tmp_path / "out"))


def test_pseudomask_of_wrong_size(data_root: Path, tmp_path: Path) -> None:
    folder = write_noisy_pseudomasks(data_root, tmp_path / "pm")
    write_mask_geotiff(folder / "ROIs0000_validation_p3.tif", np.zeros((16, 16), np.uint8), None)
    with pytest.raises(DataError, match=r"ROIs0000_validation_p3.tif is 16x16 but tile "
                                        r"'ROIs0000_validation_p3' of split 'validation' is 32x32"):
        refine(make_cfg(data_root, folder, tmp_path / "out"))


def test_pseudomask_with_values_outside_the_classes(data_root: Path, tmp_path: Path) -> None:
    folder = write_noisy_pseudomasks(data_root, tmp_path / "pm")
    write_mask_geotiff(folder / "ROIs0000_validation_p1.tif", np.full((TILE, TILE), 9, np.uint8), None)
    with pytest.raises(DataError, match=r"ROIs0000_validation_p1.tif holds values \[9\] that are neither"):
        refine(make_cfg(data_root, folder, tmp_path / "out"))


def test_tiles_not_divisible_by_the_unet_are_padded_not_refused(data_root: Path, pseudomasks: Path,
                                                                 tmp_path: Path, caplog) -> None:
    widths = [4, 8, 16, 32, 64, 128, 256]  # 6 poolings: 64 does not divide the 32 px tiles
    caplog.set_level("INFO", logger="weakseg")
    summary = refine(make_cfg(data_root, pseudomasks, tmp_path / "out", widths=widths, iterations=1))
    assert "padded by reflection inside the UNet" in caplog.text
    folder = Path(summary["final_masks"])
    shapes = {np.asarray(Image.open(p)).shape if p.suffix == ".png" else rasterio.open(p).shape
              for p in folder.iterdir() if p.suffix in (".tif", ".png")}
    assert shapes == {(TILE, TILE)}  # cropped back to the tiles


def test_tiles_of_different_sizes_are_refused_before_training(tmp_path: Path) -> None:
    from tests.data.test_folder import make_folder

    root = make_folder(tmp_path / "d", n=3, size=16)
    odd = root / "images" / "tile_001.tif"
    with rasterio.open(odd, "w", driver="GTiff", height=16, width=24, count=5, dtype="uint16") as dst:
        dst.write(np.zeros((5, 16, 24), np.uint16))
    reader = open_dataset("folder", root, "all")
    with pytest.raises(ConfigError, match=r"differ in size \(16x16: 2 tile\(s\), e.g. 'tile_000'; 16x24: 1 tile\(s\), "
                                          r"e.g. 'tile_001'\); refinement needs tiles of one size"):
        refine_module._tile_geometry(reader, "all", [16, 32])


def test_refinement_without_pseudomasks_is_a_config_error(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"needs a pseudomask folder \(--pseudomasks\), or --supervised"):
        refine(make_cfg(data_root, None, tmp_path / "out"))


def make_folder_dataset(root: Path, n: int = 4) -> Path:
    """A bring-your-own folder dataset with image labels only (no masks/)."""
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("land\nwater\n")
    rng = np.random.default_rng(0)
    rows = ["id,labels"]
    for i in range(n):
        pixels = rng.integers(0, 255, (TILE, TILE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"t{i}.png")
        rows.append(f"t{i},land")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_supervised_without_ground_truth_masks(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "byod")
    with pytest.raises(ConfigError, match=r"split 'all' of .*byod has no ground-truth masks"):
        refine(make_cfg(root, None, tmp_path / "out", dataset="folder", split="all", supervised=True))


def test_refinement_without_ground_truth_writes_masks_and_no_scores(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "byod")
    pm = tmp_path / "pm"
    pm.mkdir()
    for i in range(4):
        Image.fromarray(np.full((TILE, TILE), i % 2, np.uint8)).save(pm / f"t{i}.png")
    summary = refine(make_cfg(root, pm, tmp_path / "out", dataset="folder", split="all", iterations=1))
    assert not summary["has_ground_truth"]
    assert [e["train_scores"] for e in summary["iterations"]] == [None, None]
    masks = tmp_path / "out" / "iter1" / "masks"
    written = sorted(p.name for p in masks.iterdir() if p.is_file())  # confidence/ is the one sub-folder
    assert written == [f"t{i}.tif" for i in range(4)]
    assert sorted(p.name for p in (masks / "confidence").iterdir()) == written


# ---- the command -------------------------------------------------------------------------------------------
def test_refine_command_end_to_end(data_root: Path, pseudomasks: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    code = main(["refine", "--datadir", str(data_root), "--pseudomasks", str(pseudomasks),
                 "--output", str(out), "--eval_split", "test", "--iterations", "1", "--epochs", "1",
                 "--batch_size", "4",
                 "--widths", "4", "8", "--learning_rate", "0.01", "--seed", "3", "--no-augment",
                 "--accelerator", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "iteration 1/1: 1 epochs on 8 tiles" in printed
    assert "stage" in printed and "iter0" in printed and "eval mIoU" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["iterations"]) == 2 and summary["eval_split"] == "test"
    config = (out / "config.yaml").read_text()
    assert "lr: 0.01" in config and "augment: false" in config and "seed: 3" in config


def test_refine_command_reports_user_errors(data_root: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["refine", "--datadir", str(data_root), "--pseudomasks", str(tmp_path / "none"),
                 "--output", str(tmp_path / "out")])
    assert code == 2
    assert "error: pseudomask folder" in capsys.readouterr().err


def test_model_checkpoint_supplies_data_settings_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    from weakseg.tasks import classification

    stats = ((0.1,) * 15, (0.2,) * 15)
    data_config = {"dataset": "dfc2020", "modality": "s1s2", "normalization": "standardize",
                   "band_stats": stats, "augmentations": ["fliprot"]}
    monkeypatch.setattr(classification, "load_classifier",
                        lambda path: SimpleNamespace(hparams={"data_config": data_config}))
    args = argparse.Namespace(datadir="d", output="o", model_checkpoint=Path("c.ckpt"), widths=[4, 8])
    cfg = resolve_refine_config(args)
    assert (cfg.modality, cfg.normalization, cfg.output_dir) == ("s1s2", "standardize", "o")
    assert cfg.band_stats == [[0.1] * 15, [0.2] * 15] and cfg.widths == [4, 8]
    args = argparse.Namespace(datadir="d", output="o", model_checkpoint=Path("c.ckpt"), multimodal=False,
                              normalization="none")
    cfg = resolve_refine_config(args)
    assert (cfg.modality, cfg.normalization) == ("s2", "none")


def test_command_needs_datadir_and_output() -> None:
    with pytest.raises(ConfigError, match=r"needs an output folder \(--output\)"):
        resolve_refine_config(argparse.Namespace(datadir="d"))


def test_mask_folder_loader_ignores_masks_of_other_tiles(data_root: Path, pseudomasks: Path,
                                                         tmp_path: Path) -> None:
    folder = tmp_path / "pm"
    folder.mkdir()
    for path in pseudomasks.iterdir():
        os.link(path, folder / path.name)
    write_mask_geotiff(folder / "ROIs0000_test_p0.tif", np.zeros((TILE, TILE), np.uint8), None)
    reader = open_dataset("dfc2020", data_root, "validation")
    masks = load_mask_folder(folder, reader, "validation", (TILE, TILE))
    assert len(masks) == 8 and all(m.dtype == np.uint8 and m.shape == (TILE, TILE) for m in masks)


def test_refine_table_shows_percentages_per_stage() -> None:
    scores = {"miou": 0.5, "oa": 0.755, "aa": 0.25, "coverage": 1.0}
    summary = {"split": "validation", "eval_split": "test",
               "iterations": [{"iteration": 0, "train_scores": scores, "eval_scores": None},
                              {"iteration": 1, "train_scores": scores, "eval_scores": {**scores, "miou": 0.125}}],
               "supervised": {"iteration": "supervised", "train_scores": None, "eval_scores": scores}}
    lines = format_refine_table(summary).splitlines()
    assert "'validation'" in lines[0] and "'test'" in lines[0]
    assert lines[3].split() == ["iter0", "50.0", "75.5", "25.0", "-", "-", "-"]
    assert lines[4].split() == ["iter1", "50.0", "75.5", "25.0", "12.5", "75.5", "25.0"]
    assert lines[5].split() == ["supervised", "-", "-", "-", "50.0", "75.5", "25.0"]


# ---- confidence-aware refinement and the UNet recipe (tiny_dfc: 24 + 8 tiles of 32x32) ---------------------
TINY_FAST = dict(widths=WIDTHS, epochs=1, batch_size=8)
NO_AUGMENT = {"normalization": "none", "band_stats": None, "augmentations": []}


def write_banded_pseudomasks(data_root: Path, folder: Path) -> Path:
    """Masks of class (i % 8) with rows 0-3 unlabelled; confidence 0.2 on rows 2-9 and 0.9 elsewhere."""
    reader = open_dataset("dfc2020", data_root, "validation")
    for i, tile_id in enumerate(reader.ids):
        mask = np.full((TILE, TILE), i % 8, np.uint8)
        mask[:4] = 255
        confidence = np.full((TILE, TILE), 0.9, np.float32)
        confidence[2:10] = 0.2
        write_mask_geotiff(folder / f"{tile_id}.tif", mask, reader.source_path(i))
        write_confidence_geotiff(confidence_path(folder, tile_id), confidence, reader.source_path(i))
    return folder


def test_defaults_are_the_measured_unet_recipe_and_reach_the_task(
    tiny_dfc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = RefineConfig(datadir="d", pseudomasks="p", output_dir="o")
    assert (cfg.epochs, cfg.lr, cfg.lr_schedule) == (DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_LR_SCHEDULE)
    assert (DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_LR_SCHEDULE) == (30, 3e-3, "cosine")
    assert cfg.min_confidence == DEFAULT_MIN_CONFIDENCE == 0.0
    pm = write_noisy_pseudomasks(tiny_dfc, tmp_path / "pm")
    calls = record_fits(monkeypatch)
    refine(make_cfg(tiny_dfc, pm, tmp_path / "out", iterations=1, **TINY_FAST))
    assert calls[0]["hparams"]["lr_schedule"] == "cosine" and calls[0]["hparams"]["lr"] == 3e-3
    refine(make_cfg(tiny_dfc, pm, tmp_path / "out2", iterations=1, lr_schedule="constant", **TINY_FAST))
    assert calls[1]["hparams"]["lr_schedule"] == "constant"


def test_low_confidence_pseudomask_pixels_are_ignored_and_the_fraction_reported(
    tiny_dfc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pm = write_banded_pseudomasks(tiny_dfc, tmp_path / "pm")
    calls = record_fits(monkeypatch)
    summary = refine(make_cfg(tiny_dfc, pm, tmp_path / "out", iterations=1, min_confidence=0.5, **TINY_FAST))
    # Rows 0-3 unlabelled, rows 4-9 below 0.5, rows 10-31 kept: 10 of 32 rows ignored, 6 for confidence.
    for i, target in enumerate(calls[0]["targets"]):
        assert (target[:10] == 255).all() and (target[10:] == i % 8).all()
    entry = summary["iterations"][1]
    assert entry["ignored_fraction"] == pytest.approx(10 / 32)
    assert entry["low_confidence_fraction"] == pytest.approx(6 / 32)
    assert summary["iterations"][0]["ignored_fraction"] is None
    done = json.loads((tmp_path / "out" / "iter1" / "done.json").read_text())
    assert done["ignored_fraction"] == pytest.approx(10 / 32) and done["targets_have_confidence"]
    printed = capsys.readouterr().out
    assert "iteration 1/1: 1 epochs on 24 tiles" in printed and "ignored 31.2% of target pixels" in printed
    table_row = next(line for line in printed.splitlines() if line.startswith("iter1 "))
    assert table_row.split()[-1] == "31.2"


def test_pseudomasks_without_confidence_keep_every_pixel(tiny_dfc: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pm = write_banded_pseudomasks(tiny_dfc, tmp_path / "pm")
    shutil.rmtree(pm / "confidence")
    calls = record_fits(monkeypatch)
    summary = refine(make_cfg(tiny_dfc, pm, tmp_path / "out", iterations=1, min_confidence=0.95, **TINY_FAST))
    assert all((t[:4] == 255).all() and (t[4:] == i % 8).all() for i, t in enumerate(calls[0]["targets"]))
    assert summary["iterations"][1]["ignored_fraction"] == pytest.approx(4 / 32)


def test_partial_confidence_folder_is_refused_before_training(tiny_dfc: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pm = write_banded_pseudomasks(tiny_dfc, tmp_path / "pm")
    confidence_path(pm, "ROIs0000_validation_p4").unlink()
    forbid_fits(monkeypatch)
    message = (rf"mask folder {pm} has confidence maps .* for only 23 of the 24 tiles of split 'validation'; "
               r"missing: 'ROIs0000_validation_p4'")
    with pytest.raises(DataError, match=message):
        refine(make_cfg(tiny_dfc, pm, tmp_path / "out", iterations=1, min_confidence=0.5, **TINY_FAST))
    assert not (tmp_path / "out" / "iter1").exists()


def test_iteration2_trains_on_iteration1_masks_filtered_by_their_confidence(
    tiny_dfc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pm = write_noisy_pseudomasks(tiny_dfc, tmp_path / "pm")  # no confidence/: iteration 1 keeps every pixel
    # Pick a threshold that splits iteration 1's confidences: a first run gives them, the second run (same
    # seed, same targets) trains iteration 1 the same way and then iteration 2 with the threshold.
    # A few steps at a high constant rate, so that the UNet's confidences spread out (after one epoch at the
    # default rate every pixel is near-uniform).
    recipe = {**TINY_FAST, "epochs": 3, "lr": 0.02, "lr_schedule": "constant"}
    refine(make_cfg(tiny_dfc, pm, tmp_path / "probe", iterations=1, **recipe))
    reader = open_dataset("dfc2020", tiny_dfc, "validation")
    probe_masks = tmp_path / "probe" / "iter1" / "masks"
    probe = np.concatenate([read_confidence(confidence_path(probe_masks, t)).ravel() for t in reader.ids])
    threshold = float(np.median(probe))
    calls = record_fits(monkeypatch)
    out = tmp_path / "out"
    summary = refine(make_cfg(tiny_dfc, pm, out, iterations=2, eval_split="test", min_confidence=threshold,
                              **recipe))
    masks1 = out / "iter1" / "masks"
    # Iteration 1 wrote a confidence map beside each mask, of train and eval tiles alike.
    for folder, split in ((masks1, "validation"), (out / "iter1" / "eval_masks", "test")):
        ids = open_dataset("dfc2020", tiny_dfc, split).ids
        assert sorted(p.stem for p in (folder / "confidence").glob("*.tif")) == sorted(ids)
    expected, dropped = [], 0
    for tile_id in reader.ids:
        mask = read_prediction_mask(masks1 / f"{tile_id}.tif")
        filtered = drop_low_confidence(mask, read_confidence(confidence_path(masks1, tile_id)), threshold)
        dropped += int((filtered == 255).sum())
        expected.append(filtered)
    total = len(reader.ids) * TILE * TILE
    assert 0 < dropped < total, "the threshold should drop some pixels and keep others"
    assert all(np.array_equal(a, b) for a, b in zip(calls[1]["targets"], expected, strict=True))
    assert summary["iterations"][2]["ignored_fraction"] == pytest.approx(dropped / total)
    # The UNet labels every pixel, so everything ignored in iteration 2 was dropped for its confidence.
    assert summary["iterations"][2]["low_confidence_fraction"] == pytest.approx(dropped / total)


def test_unet_confidence_is_the_softmax_probability_of_its_prediction(
    refined: tuple[Path, dict, list], data_root: Path
) -> None:
    out, _, _ = refined
    task = SegmentationTask.load_from_checkpoint(out / "iter1" / "unet.ckpt", map_location="cpu").eval()
    reader = open_dataset("dfc2020", data_root, "validation")
    tiles = TargetTiles(reader, None, build_transform("predict", (TILE, TILE), NO_AUGMENT), (TILE, TILE))
    with torch.no_grad():
        for i, tile_id in enumerate(reader.ids):
            prob, pred = task(tiles[i]["image"][None]).softmax(dim=1).max(dim=1)  # (1, H, W) each
            stored = read_confidence(confidence_path(out / "iter1" / "masks", tile_id))
            assert np.abs(stored - prob[0].numpy()).max() <= 0.5 / 255 + 1e-6
            mask = read_prediction_mask(out / "iter1" / "masks" / f"{tile_id}.tif")
            assert np.array_equal(mask, pred[0].numpy())


def test_changed_min_confidence_refuses_to_reuse_a_finished_iteration(
    refined: tuple[Path, dict, list], data_root: Path, pseudomasks: Path
) -> None:
    out, _, _ = refined
    before = mtimes(out)
    with pytest.raises(ConfigError, match=r"iter1 was finished with other settings "
                                          r"\(min_confidence: 0.0 then, 0.3 now\)"):
        refine(make_cfg(data_root, pseudomasks, out, iterations=2, seed=10, eval_split="test",
                        min_confidence=0.3))
    assert mtimes(out) == before


def test_supervised_targets_are_not_filtered_by_confidence(data_root: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_fits(monkeypatch)
    summary = refine(make_cfg(data_root, None, tmp_path / "out", supervised=True, min_confidence=0.99))
    reader = open_dataset("dfc2020", data_root, "validation")
    ground_truth = [reader.read_mask(i) for i in range(len(reader.ids))]
    assert all(np.array_equal(a, b) for a, b in zip(calls[0]["targets"], ground_truth, strict=True))
    no_data = sum(int((m == 255).sum()) for m in ground_truth) / (len(ground_truth) * TILE * TILE)
    assert summary["supervised"]["ignored_fraction"] == pytest.approx(no_data)
    assert summary["supervised"]["low_confidence_fraction"] == 0.0
    # The threshold does not change the supervised stage: another value reuses it.
    forbid_fits(monkeypatch)
    again = refine(make_cfg(data_root, None, tmp_path / "out", supervised=True, min_confidence=0.0))
    assert again["supervised"]["resumed"]


def test_min_confidence_and_lr_schedule_flags(tmp_path: Path) -> None:
    args = build_parser().parse_args(["refine", "--datadir", "d", "--output", "o", "--min_confidence", "0.4",
                                      "--lr_schedule", "constant"])
    cfg = resolve_refine_config(args)
    assert (cfg.min_confidence, cfg.lr_schedule) == (0.4, "constant")
    cfg = resolve_refine_config(build_parser().parse_args(["refine", "--datadir", "d", "--output", "o"]))
    assert (cfg.min_confidence, cfg.lr_schedule, cfg.epochs, cfg.lr) == (0.0, "cosine", 30, 3e-3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["refine", "--lr_schedule", "step"])


@pytest.mark.parametrize("settings, message", [
    ({"min_confidence": 1.5}, r"min_confidence must be a number in \[0, 1\], got 1.5 \(--min_confidence\)"),
    ({"min_confidence": -0.1}, r"min_confidence must be a number in \[0, 1\]"),
    ({"min_confidence": float("nan")}, r"min_confidence must be a number in \[0, 1\]"),
    ({"lr_schedule": "step"},
     r"unknown lr_schedule 'step'; choose from \['constant', 'cosine', 'poly'\] \(--lr_schedule\)"),
])
def test_invalid_min_confidence_or_lr_schedule(tmp_path: Path, settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        refine(make_cfg(tmp_path / "data", tmp_path / "pm", tmp_path / "out", **settings))


# ---- predictions weighted by the classifier's image labels ----------------------------------------------------
class _FixedUNet(torch.nn.Module):
    """Stand-in segmenter: the same logits for every image, (B, K, H, W)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(image.shape[0], -1, -1, -1)

    def predict_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """What SegmentationTask.predict_probabilities gives for one view: the softmax of the logits."""
        return self(image).softmax(dim=1)


def test_label_weighting_multiplies_unet_and_classifier_probabilities() -> None:
    # 3 classes, 1 x 2 pixels. The UNet prefers class 0 on both; the classifier says class 0 is absent.
    logits = torch.log(torch.tensor([[[0.6, 0.5]], [[0.3, 0.1]], [[0.1, 0.4]]]))[None]  # (1, 3, 1, 2)
    module = refine_module.LabelWeightedSegmenter(_FixedUNet(logits), {"a": np.array([0.0, 1.0, 1.0]),
                                                                      "b": np.array([1.0, 0.5, 0.5])})
    out = module.predict_step({"image": torch.zeros(2, 1, 1, 2), "id": ["a", "b"]}, 0)
    assert out["pred_alone"].tolist() == [[[0, 0]], [[0, 0]]]  # the UNet's own argmax
    assert out["pred"].tolist() == [[[1, 2]], [[0, 0]]]  # tile a: 0.3 vs 0.1 -> 1, 0.1 vs 0.4 -> 2
    # Confidence: the winner's share of the weighted sum, e.g. tile a pixel 0: 0.3 / (0 + 0.3 + 0.1).
    assert torch.allclose(out["prob"][0, 0], torch.tensor([0.3 / 0.4, 0.4 / 0.5]))
    assert torch.allclose(out["prob"][1, 0], torch.tensor([0.6 / (0.6 + 0.15 + 0.05), 0.5 / (0.5 + 0.05 + 0.2)]))


def test_every_stage_trains_on_masks_read_per_tile_not_held(data_root: Path, pseudomasks: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12: iteration 1 (the pseudomask folder), iteration 2 (the UNet's masks) and the supervised run (the
    ground truth) hand training a sequence that reads each mask when drawn, holding no array per tile."""
    held: list[list[str]] = []

    def fit(task: Any, trainer: Any, loader: Any) -> None:
        masks = loader.dataset.masks
        items = {"list": masks} if isinstance(masks, list) else vars(masks)
        held.append([k for k, v in items.items()
                     if isinstance(v, np.ndarray) or (isinstance(v, list) and any(isinstance(m, np.ndarray) for m in v))])
        REAL_FIT(task, trainer, loader)

    monkeypatch.setattr(refine_module, "_fit", fit)
    refine(make_cfg(data_root, pseudomasks, tmp_path / "out", iterations=2))
    refine(make_cfg(data_root, None, tmp_path / "out", supervised=True))
    assert held == [[], [], []]


def test_label_probabilities_are_one_array_looked_up_by_tile_id() -> None:
    """Issue 12: one (N, C) array and an id -> row index, not a small array per tile."""
    probs = np.arange(6, dtype=np.float32).reshape(3, 2)  # (N, C)
    table = refine_module.LabelProbabilities(["a", "b", "c"], probs)
    assert list(table) == ["a", "b", "c"] and len(table) == 3 and "b" in table and "d" not in table
    assert table["b"].tolist() == [2.0, 3.0] and np.shares_memory(table["b"], probs)
    assert np.stack([table[i] for i in ["c", "a"]]).tolist() == [[4.0, 5.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="3 tile ids but probabilities of shape"):
        refine_module.LabelProbabilities(["a", "b", "c"], probs[:2])


def test_classifier_probabilities_cover_every_tile(tiny_checkpoint: Path, tiny_dfc: Path) -> None:
    probs = refine_module.classifier_probabilities(tiny_checkpoint, "dfc2020", str(tiny_dfc), "validation:train",
                                                   batch_size=5)
    reader = open_dataset("dfc2020", tiny_dfc, "validation:train")
    assert list(probs) == reader.ids
    assert all(p.shape == (8,) and ((p > 0) & (p < 1)).all() for p in probs.values())
    assert isinstance(probs, refine_module.LabelProbabilities) and probs.probs.shape == (len(reader.ids), 8)


def test_refinement_with_a_classifier_weights_every_prediction_and_scores_the_unet_alone(
        tiny_checkpoint: Path, tiny_dfc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A classifier certain that every tile is class 3 makes every weighted prediction class 3."""
    def only_class_3(checkpoint: Path, dataset: str, datadir: str, split: str) -> dict[str, np.ndarray]:
        assert Path(checkpoint) == tiny_checkpoint
        reader = open_dataset(dataset, datadir, split)
        return {tile: np.eye(8, dtype=np.float32)[3] for tile in reader.ids}

    monkeypatch.setattr(refine_module, "classifier_probabilities", only_class_3)
    pm = write_noisy_pseudomasks(tiny_dfc, tmp_path / "pm")
    cfg = RefineConfig(datadir=str(tiny_dfc), pseudomasks=str(pm), output_dir=str(tmp_path / "out"),
                       split="validation", eval_split="test", iterations=1, classifier=str(tiny_checkpoint),
                       widths=[4, 8], epochs=1, batch_size=8)
    summary = refine(cfg, verbose=False)
    it1 = summary["iterations"][1]
    for folder in (Path(it1["masks"]), Path(it1["eval_masks"])):
        masks = [read_prediction_mask(p) for p in folder.glob("*.tif")]
        assert masks and all((m == 3).all() for m in masks)
    alone = tmp_path / "out" / "iter1" / refine_module.ALONE_DIR
    assert len(list(alone.glob("*.tif"))) == 8  # the test split's tiles
    assert it1["eval_unet_alone_scores"] is not None and it1["eval_scores"]["miou"] is not None
    # Without weighting the same run is refused in the same folder (the fingerprint records it) ...
    with pytest.raises(ConfigError, match="label_weighting"):
        refine(RefineConfig(**{**cfg.__dict__, "label_weighting": False}), verbose=False)
    # ... and in a new one predicts with the UNet alone, writing no eval_unet_alone folder.
    plain = refine(RefineConfig(**{**cfg.__dict__, "label_weighting": False, "output_dir": str(tmp_path / "o2")}),
                   verbose=False)
    assert not (tmp_path / "o2" / "iter1" / refine_module.ALONE_DIR).exists()
    assert plain["iterations"][1]["eval_unet_alone_scores"] is None


def test_missing_classifier_checkpoint_is_a_config_error(data_root: Path, pseudomasks: Path, tmp_path: Path) -> None:
    cfg = make_cfg(data_root, pseudomasks, tmp_path / "o", classifier=str(tmp_path / "nope.ckpt"))
    with pytest.raises(ConfigError, match="nope.ckpt does not exist"):
        refine(cfg)


def test_eval_split_of_training_tiles_is_warned_and_counted(
    data_root: Path, pseudomasks: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str], refined: tuple[Path, dict, list[dict[str, Any]]],
) -> None:
    """``--eval_split`` naming the training split scores training tiles: the run says so, in the log, in its
    printed summary and in ``summary.json``; a held-out split counts 0 and says nothing."""
    assert refined[1]["eval_tiles_in_training"] == 0  # eval split "test"
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="weakseg.pipeline.refine"):
        summary = refine(make_cfg(data_root, pseudomasks, out, iterations=1, eval_split="validation"))
    expected = "8 of the 8 tiles of eval split 'validation' are training tiles of split 'validation'"
    assert summary["eval_tiles_in_training"] == 8
    assert json.loads((out / "summary.json").read_text())["eval_tiles_in_training"] == 8
    assert any(expected in r.getMessage() for r in caplog.records)
    assert f"warning: {expected}" in capsys.readouterr().out
