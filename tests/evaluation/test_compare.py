"""Tests of weakseg.evaluation.compare and the ``weakseg evaluate`` command on tiny mask folders."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

import weakseg.data
from weakseg.commands import evaluate as evaluate_command
from weakseg.errors import ConfigError, DataError
from weakseg.evaluation.compare import (
    compare_folders,
    evaluate_folder,
    list_prediction_masks,
    read_prediction_mask,
)
from weakseg.evaluation.metrics import ConfusionMatrix, compute_scores

NAMES3 = ["a", "b", "c"]


class FakeGroundTruth:
    """The reader interface evaluation relies on: ids, read_mask(i), class_names."""

    def __init__(self, masks: dict[str, np.ndarray], class_names: list[str] = NAMES3) -> None:
        self.ids = list(masks)
        self._masks = list(masks.values())
        self.class_names = class_names
        self.reads: list[int] = []

    def read_mask(self, i: int) -> np.ndarray:
        self.reads.append(i)
        return self._masks[i]


def write_tif(path: Path, array: np.ndarray) -> None:
    """Write a (H, W) or (bands, H, W) uint8 GeoTIFF."""
    bands = array[None] if array.ndim == 2 else array
    count, height, width = bands.shape
    with rasterio.open(
        path, "w", driver="GTiff", height=height, width=width, count=count, dtype="uint8"
    ) as dst:
        dst.write(bands)


def write_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


# Two 2 x 3 ground-truth tiles. Tile t2 has one ignored pixel.
GT_T1 = np.array([[0, 0, 1], [1, 2, 2]], dtype=np.uint8)
GT_T2 = np.array([[2, 2, 2], [0, 1, 255]], dtype=np.uint8)
# Predictions: t1 has one error (GT 1 -> 2); t2 one unlabelled pixel (GT 2 -> 255) and the ignored one is 0.
PRED_T1 = np.array([[0, 0, 1], [2, 2, 2]], dtype=np.uint8)
PRED_T2 = np.array([[2, 2, 255], [0, 1, 0]], dtype=np.uint8)
# Accumulated CM over the 11 evaluated pixels:
#   row 0: [3, 0, 0]          -> 3
#   row 1: [0, 2, 1]          -> 3
#   row 2: [0, 0, 4] + 1 unl  -> 5
#   cols: 3, 2, 5; trace 9 -> OA = 9/11
#   recall 1, 2/3, 4/5 -> AA = (1 + 2/3 + 4/5)/3 = 37/45
#   IoU0 = 3/(3+3-3) = 1, IoU1 = 2/(3+2-2) = 2/3, IoU2 = 4/(5+5-4) = 2/3 -> mIoU = 7/9
EXPECTED_CM = [[3, 0, 0], [0, 2, 1], [0, 0, 4]]


@pytest.fixture
def ground_truth() -> FakeGroundTruth:
    return FakeGroundTruth({"t1": GT_T1, "t2": GT_T2})


@pytest.fixture
def tif_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tif_preds"
    folder.mkdir()
    write_tif(folder / "t1.tif", PRED_T1)
    write_tif(folder / "t2.tif", PRED_T2)
    (folder / "manifest.json").write_text("{}")  # other files are skipped
    return folder


@pytest.fixture
def png_dir(tmp_path: Path) -> Path:
    """A perfect prediction as PNG."""
    folder = tmp_path / "png_preds"
    folder.mkdir()
    write_png(folder / "t1.png", GT_T1)
    write_png(folder / "t2.png", np.where(GT_T2 == 255, 0, GT_T2).astype(np.uint8))
    return folder


def test_evaluate_tif_folder(tif_dir: Path, ground_truth: FakeGroundTruth) -> None:
    result = evaluate_folder(tif_dir, ground_truth)
    assert result["confusion_matrix"] == EXPECTED_CM
    assert result["unlabelled_by_class"] == [0, 0, 1]
    assert result["ignored_pixels"] == 1
    assert result["oa"] == pytest.approx(9 / 11)
    assert result["aa"] == pytest.approx(37 / 45)
    assert result["iou"] == pytest.approx([1.0, 2 / 3, 2 / 3])
    assert result["miou"] == pytest.approx(7 / 9)
    assert result["coverage"] == pytest.approx(10 / 11)
    assert result["tiles_evaluated"] == 2
    assert result["tiles_missing"] == 0 and result["tiles_extra"] == 0
    assert result["warnings"] == []
    assert result["predictions"] == str(tif_dir)


def test_folder_equals_direct_confusion_matrix(tif_dir: Path, ground_truth: FakeGroundTruth) -> None:
    cm = ConfusionMatrix(3)
    cm.update(GT_T1, PRED_T1)
    cm.update(GT_T2, PRED_T2)
    direct = compute_scores(cm, NAMES3)
    result = evaluate_folder(tif_dir, ground_truth)
    assert {key: result[key] for key in direct} == direct


def test_compare_folders_reads_each_ground_truth_once(
    tif_dir: Path, png_dir: Path, ground_truth: FakeGroundTruth
) -> None:
    results = compare_folders({"method_tif": tif_dir, "perfect_png": png_dir}, ground_truth)
    assert list(results) == ["method_tif", "perfect_png"]
    assert results["method_tif"]["miou"] == pytest.approx(7 / 9)
    assert results["perfect_png"]["oa"] == pytest.approx(1.0)
    assert results["perfect_png"]["miou"] == pytest.approx(1.0)
    assert results["perfect_png"]["coverage"] == pytest.approx(1.0)
    assert ground_truth.reads == [0, 1]


def test_read_palette_png(tmp_path: Path) -> None:
    image = Image.fromarray(GT_T1, mode="L").convert("P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    path = tmp_path / "p.png"
    image.save(path)
    np.testing.assert_array_equal(read_prediction_mask(path), GT_T1)


def test_missing_tiles(tmp_path: Path) -> None:
    ids = [f"tile{i:02d}" for i in range(12)]
    gt = FakeGroundTruth({tile_id: GT_T1 for tile_id in ids})
    folder = tmp_path / "preds"
    folder.mkdir()
    for tile_id in ids[:2]:
        write_tif(folder / f"{tile_id}.tif", PRED_T1)
    missing_message = r"10 of 12 ground-truth tiles have no mask in .*preds: 'tile02', 'tile03'"
    with pytest.raises(DataError, match=missing_message):
        evaluate_folder(folder, gt)
    with pytest.raises(DataError, match=r"\(10 in total\).*allow_missing"):
        evaluate_folder(folder, gt)

    result = evaluate_folder(folder, gt, allow_missing=True)
    assert result["tiles_evaluated"] == 2
    assert result["tiles_missing"] == 10
    assert result["missing_ids"] == ids[2:]
    assert result["evaluated_pixels"] == 12
    assert "10 of 12 ground-truth tiles have no mask" in result["warnings"][0]


def test_extra_tiles(tif_dir: Path, ground_truth: FakeGroundTruth) -> None:
    write_tif(tif_dir / "other_split.tif", PRED_T1)
    extra_message = r"1 masks in .*tif_preds belong to no ground-truth tile: 'other_split'"
    with pytest.raises(DataError, match=extra_message):
        evaluate_folder(tif_dir, ground_truth)
    result = evaluate_folder(tif_dir, ground_truth, allow_extra=True)
    assert result["tiles_extra"] == 1 and result["extra_ids"] == ["other_split"]
    assert result["confusion_matrix"] == EXPECTED_CM  # the extra mask is not scored
    assert "ignored" in result["warnings"][0]


def test_no_overlap_is_an_error_even_when_allowed(tmp_path: Path, ground_truth: FakeGroundTruth) -> None:
    folder = tmp_path / "test_split"
    folder.mkdir()
    write_tif(folder / "x9.tif", PRED_T1)
    with pytest.raises(DataError, match=r"none of the 1 masks in .*test_split matches a ground-truth tile"):
        evaluate_folder(folder, ground_truth, allow_missing=True, allow_extra=True)


def test_missing_or_empty_folder(tmp_path: Path, ground_truth: FakeGroundTruth) -> None:
    with pytest.raises(DataError, match=r"prediction folder .*nowhere does not exist"):
        evaluate_folder(tmp_path / "nowhere", ground_truth)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no masks here")
    with pytest.raises(DataError, match=r"prediction folder .*empty holds no prediction masks"):
        evaluate_folder(empty, ground_truth)
    a_file = tmp_path / "file.tif"
    a_file.write_bytes(b"")
    with pytest.raises(DataError, match="is not a folder"):
        list_prediction_masks(a_file)


def test_two_masks_for_one_tile(tif_dir: Path, ground_truth: FakeGroundTruth) -> None:
    write_png(tif_dir / "t1.png", PRED_T1)
    with pytest.raises(DataError, match=r"two masks for tile 't1': t1.png and t1.tif"):
        evaluate_folder(tif_dir, ground_truth)


def test_size_mismatch_names_file_and_sizes(tif_dir: Path, ground_truth: FakeGroundTruth) -> None:
    write_tif(tif_dir / "t2.tif", np.zeros((4, 5), dtype=np.uint8))
    size_message = r"t2.tif is 4x5 \(height x width\) but the ground truth of tile 't2' is 2x3"
    with pytest.raises(DataError, match=size_message):
        evaluate_folder(tif_dir, ground_truth)


def test_unreadable_file(tif_dir: Path, ground_truth: FakeGroundTruth) -> None:
    (tif_dir / "t2.tif").write_bytes(b"this is not a tiff")
    with pytest.raises(DataError, match=r"cannot read prediction mask .*t2.tif"):
        evaluate_folder(tif_dir, ground_truth)
    (tif_dir / "t2.tif").unlink()
    (tif_dir / "t2.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"cannot read prediction mask .*t2.png"):
        evaluate_folder(tif_dir, ground_truth)


def test_multiband_masks(tmp_path: Path, ground_truth: FakeGroundTruth) -> None:
    folder = tmp_path / "multi"
    folder.mkdir()
    write_tif(folder / "t1.tif", np.stack([PRED_T1, PRED_T1]))
    write_tif(folder / "t2.tif", PRED_T2)
    with pytest.raises(DataError, match=r"t1.tif has 2 bands"):
        evaluate_folder(folder, ground_truth)
    (folder / "t1.tif").unlink()
    write_png(folder / "t1.png", np.stack([PRED_T1] * 3, axis=-1))
    with pytest.raises(DataError, match=r"t1.png has 3 bands \(RGB\)"):
        evaluate_folder(folder, ground_truth)


def test_float_mask_rejected(tmp_path: Path) -> None:
    path = tmp_path / "f.tif"
    with rasterio.open(path, "w", driver="GTiff", height=2, width=3, count=1, dtype="float32") as dst:
        dst.write(PRED_T1.astype(np.float32)[None])
    with pytest.raises(DataError, match=r"f.tif holds float32 values"):
        read_prediction_mask(path)


def test_ground_truth_with_bad_ids_names_the_tile(tif_dir: Path) -> None:
    gt = FakeGroundTruth({"t1": GT_T1, "t2": np.full((2, 3), 9, dtype=np.uint8)})
    with pytest.raises(DataError, match=r"ground truth of tile 't2'.*\[9\]"):
        evaluate_folder(tif_dir, gt)


def test_ground_truth_without_masks(tif_dir: Path, ground_truth: FakeGroundTruth) -> None:
    ground_truth.has_masks = False
    with pytest.raises(DataError, match="has no masks"):
        evaluate_folder(tif_dir, ground_truth)


def test_different_tile_sets_warn(tif_dir: Path, tmp_path: Path, ground_truth: FakeGroundTruth) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    write_tif(partial / "t1.tif", PRED_T1)
    results = compare_folders({"full": tif_dir, "partial": partial}, ground_truth, allow_missing=True)
    assert results["partial"]["tiles_evaluated"] == 1
    assert any("not directly comparable" in w for w in results["full"]["warnings"])


# --- the ``weakseg evaluate`` command ---


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="weakseg")
    evaluate_command.add_parser(parser.add_subparsers())
    return parser.parse_args(argv)


def test_command_run(
    tif_dir: Path,
    png_dir: Path,
    ground_truth: FakeGroundTruth,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    calls = []

    def fake_open_dataset(kind: str, root: Path, split: str, **kwargs: object) -> FakeGroundTruth:
        calls.append((kind, root, split))
        return ground_truth

    monkeypatch.setattr(weakseg.data, "open_dataset", fake_open_dataset, raising=False)
    args = _parse(
        ["evaluate", "--predictions", str(tif_dir), str(png_dir), "--names", "ours", "oracle",
         "--datadir", str(tmp_path / "data"), "--split", "validation"]
    )
    assert args.run is evaluate_command.run
    assert args.run(args) == 0
    assert calls == [("dfc2020", tmp_path / "data", "validation")]

    out = capsys.readouterr().out
    table_rows = [line.split() for line in out.splitlines()]
    rows = {cells[0]: cells for cells in table_rows if cells[:1] in (["ours"], ["oracle"])}
    assert rows["ours"][1:4] == ["81.8", "82.2", "77.8"]  # OA 9/11, AA 37/45, mIoU 7/9 in %
    assert rows["oracle"][1:4] == ["100.0", "100.0", "100.0"]

    # default: beside the first folder, named after it and the split
    scores = tif_dir.parent / f"{tif_dir.name}_scores_validation.json"
    written = json.loads(scores.read_text())
    assert written["split"] == "validation" and written["dataset"] == "dfc2020"
    assert list(written["results"]) == ["ours", "oracle"]
    assert written["results"]["ours"]["confusion_matrix"] == EXPECTED_CM
    figures = [tif_dir.parent / f"{tif_dir.name}_scores_validation_{n}.png" for n in ("confusion", "iou")]
    assert all(f.stat().st_size > 1000 for f in figures)
    assert "dataset layout: dfc2020 (no classes.txt" in out

    # never replaced silently: a second evaluation refuses, --overwrite replaces, --no-figures draws nothing
    with pytest.raises(ConfigError, match="exists .* --overwrite"):
        args.run(args)
    for f in figures:
        f.unlink()
    again = _parse([*sys_argv_of(args), "--overwrite", "--no-figures"])
    assert again.run(again) == 0 and not any(f.exists() for f in figures)


def sys_argv_of(args: argparse.Namespace) -> list[str]:
    return ["evaluate", "--predictions", *map(str, args.predictions), "--names", *args.names, "--datadir",
            str(args.datadir), "--split", args.split]


def test_dataset_kind_is_inferred(tmp_path: Path) -> None:
    from weakseg.data import guess_dataset_kind

    data, preds = tmp_path / "data", tmp_path / "preds"
    data.mkdir()
    preds.mkdir()
    assert guess_dataset_kind(data, preds)[0] == "dfc2020"
    (data / "classes.txt").write_text("a\nb\n")
    assert guess_dataset_kind(data, preds) == ("folder", f"{data / 'classes.txt'} exists")
    from weakseg.data import open_dataset

    with pytest.raises(DataError, match="looks like a folder dataset; pass --dataset folder"):
        open_dataset("dfc2020", data, "all")
    (preds / "run.json").write_text(json.dumps({"dataset": "dfc2020"}))  # what the masks were made for wins
    assert guess_dataset_kind(data, preds)[0] == "dfc2020"


def test_command_output_default_names_and_flags(
    tif_dir: Path, ground_truth: FakeGroundTruth, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(weakseg.data, "open_dataset", lambda *a, **k: ground_truth, raising=False)
    write_tif(tif_dir / "extra.tif", PRED_T1)
    (tif_dir / "t2.tif").unlink()
    output = tmp_path / "out" / "s.json"
    base = ["evaluate", "--predictions", str(tif_dir), "--datadir", "d", "--split", "test",
            "--dataset", "folder", "--output", str(output)]
    with pytest.raises(DataError, match="allow_missing"):
        evaluate_command.run(_parse(base))
    with pytest.raises(DataError, match="allow_extra"):
        evaluate_command.run(_parse([*base, "--allow_missing"]))
    assert evaluate_command.run(_parse([*base, "--allow_missing", "--allow_extra"])) == 0
    result = json.loads(output.read_text())["results"]["tif_preds"]  # default name: the folder name
    assert result["tiles_missing"] == 1 and result["tiles_extra"] == 1


def test_command_name_errors(tif_dir: Path, png_dir: Path) -> None:
    with pytest.raises(ConfigError, match="--names gives 1 names for 2"):
        evaluate_command.run(
            _parse(["evaluate", "--predictions", str(tif_dir), str(png_dir), "--names", "x",
                    "--datadir", "d", "--split", "test"])
        )
    with pytest.raises(ConfigError, match="must be unique"):
        evaluate_command.run(
            _parse(["evaluate", "--predictions", str(tif_dir), str(png_dir), "--names", "x", "x",
                    "--datadir", "d", "--split", "test"])
        )


def test_command_reports_unknown_split(tmp_path, capsys) -> None:
    # Split names are the reader's business (folder datasets have their own), so the reader's error reaches the user.
    from weakseg.cli import main

    pred = tmp_path / "p"
    pred.mkdir()
    (tmp_path / "d").mkdir()
    assert main(["evaluate", "--predictions", str(pred), "--datadir", str(tmp_path / "d"), "--split", "train"]) == 2
    assert "no DFC2020 'train' split" in capsys.readouterr().err


# --- prediction values outside the class ids ---


def write_int16_tif(path: Path, array: np.ndarray) -> None:
    with rasterio.open(path, "w", driver="GTiff", height=array.shape[0], width=array.shape[1], count=1,
                       dtype="int16") as dst:
        dst.write(array.astype(np.int16)[None])


def test_prediction_ids_at_or_above_the_class_count_are_an_error(
    tif_dir: Path, ground_truth: FakeGroundTruth
) -> None:
    pred = PRED_T2.copy()
    pred[0, 0] = 3  # K = 3: not a class, not 255
    pred[1, 2] = 7  # under an ignored ground-truth pixel: refused all the same
    write_tif(tif_dir / "t2.tif", pred)
    with pytest.raises(DataError) as err:
        evaluate_folder(tif_dir, ground_truth)
    message = str(err.value)
    assert message.startswith(
        f"prediction mask {tif_dir / 't2.tif'} holds values that are neither a class id 0..2 "
        "nor 255 (unlabelled): 3 (1 pixels), 7 (1 pixels);"
    )
    assert "'a', 'b', 'c'" in message


def test_negative_prediction_ids_in_a_signed_mask_are_an_error(
    tif_dir: Path, ground_truth: FakeGroundTruth
) -> None:
    pred = PRED_T1.astype(np.int16)
    pred[0, :2] = -1  # "no prediction" written as -1 in an int16 mask
    write_int16_tif(tif_dir / "t1.tif", pred)
    with pytest.raises(DataError, match=r"t1.tif holds values that are neither a class id 0..2 nor 255 "
                                        r"\(unlabelled\): -1 \(2 pixels\);.*e.g. -1"):
        evaluate_folder(tif_dir, ground_truth)


def test_signed_masks_with_valid_ids_and_255_are_scored(tif_dir: Path, ground_truth: FakeGroundTruth) -> None:
    write_int16_tif(tif_dir / "t1.tif", PRED_T1)
    write_int16_tif(tif_dir / "t2.tif", PRED_T2)
    assert evaluate_folder(tif_dir, ground_truth)["confusion_matrix"] == EXPECTED_CM


def test_cli_refuses_out_of_range_predictions_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from weakseg.cli import main

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    (data / "classes.txt").write_text("a\nb\nc\n")
    (data / "labels.csv").write_text("id,labels\nt1,a;b;c\n")
    write_png(data / "images" / "t1.png", np.zeros((2, 3), dtype=np.uint8))
    write_png(data / "masks" / "t1.png", GT_T1)
    preds = tmp_path / "preds"
    preds.mkdir()
    pred = PRED_T1.astype(np.int16)
    pred[1, 1] = -3
    write_int16_tif(preds / "t1.tif", pred)
    output = tmp_path / "scores.json"
    argv = ["evaluate", "--predictions", str(preds), "--datadir", str(data), "--split", "all",
            "--dataset", "folder", "--output", str(output)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: prediction mask {preds / 't1.tif'} holds values" in err and "-3 (1 pixels)" in err
    assert not output.exists()
    write_tif(preds / "t1.tif", PRED_T1)
    assert main(argv) == 0
    assert json.loads(output.read_text())["results"]["preds"]["oa"] == pytest.approx(5 / 6)


# --- no NotGeoreferencedWarning from plain GeoTIFF masks ---


def test_plain_geotiff_masks_are_read_without_not_georeferenced_warning(
    tif_dir: Path, ground_truth: FakeGroundTruth
) -> None:
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # overrides pyproject's ignore filter: a leak would be recorded
        with rasterio.open(tif_dir / "t1.tif") as src:
            src.read()  # the fixture really is non-georeferenced: rasterio itself warns
        assert any(issubclass(w.category, NotGeoreferencedWarning) for w in caught)
        caught.clear()
        read_prediction_mask(tif_dir / "t1.tif")
        evaluate_folder(tif_dir, ground_truth)
    assert not [w for w in caught if issubclass(w.category, NotGeoreferencedWarning)]
