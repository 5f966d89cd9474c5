"""Tests of ``weakseg pseudomasks`` with the new methods and flags, and of the region-assignment check."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from tests.conftest import TINY_VIT_FLAGS
from weakseg.cli import main
from weakseg.data import open_dataset
from weakseg.data.mask_files import read_confidence
from weakseg.pipeline.pseudomasks import assignment_is_best

# ---- is the region -> class assignment the best one? -------------------------------------------------------
# Two regions: region 0 = the left two columns, region 1 = the right two; ground truth 3 left and 5 right.
REGIONS = np.array([[0, 0, 1, 1]] * 3, dtype=np.int16)
GT = np.array([[3, 3, 5, 5]] * 3, dtype=np.uint8)


def test_the_right_assignment_is_best_and_the_swapped_one_is_not() -> None:
    assert assignment_is_best(REGIONS, np.array([3, 5]), GT) is True
    assert assignment_is_best(REGIONS, np.array([5, 3]), GT) is False


def test_a_majority_decides_and_ties_count_as_best() -> None:
    gt = GT.copy()
    gt[:, 1] = 5  # region 0 is now half 3, half 5; region 1 all 5
    assert assignment_is_best(REGIONS, np.array([3, 5]), gt) is True  # 3 + 6 correct pixels
    assert assignment_is_best(REGIONS, np.array([5, 3]), gt) is False  # 3 + 0
    tie = np.array([[3, 5, 3, 5]] * 3, dtype=np.uint8)  # each region half and half: both assignments score 6
    assert assignment_is_best(REGIONS, np.array([3, 5]), tie) is True
    assert assignment_is_best(REGIONS, np.array([5, 3]), tie) is True


def test_the_best_is_over_permutations_not_per_region_majorities() -> None:
    gt = np.array([[5, 255, 5, 5]] * 3, dtype=np.uint8)
    gt[0, 0] = 3  # region 0: one 3, two 5, three ignored; region 1: six 5
    # 3 -> region 0, 5 -> region 1 labels 1 + 6 pixels right; the swap 2 + 0, though region 0 is mostly 5
    assert assignment_is_best(REGIONS, np.array([3, 5]), gt) is True
    assert assignment_is_best(REGIONS, np.array([5, 3]), gt) is False


def test_ignored_pixels_and_pixels_outside_regions_do_not_count() -> None:
    gt = np.full_like(GT, 255)
    gt[0, 0], gt[0, 3] = 3, 5  # one labelled pixel per region
    assert assignment_is_best(REGIONS, np.array([3, 5]), gt) is True
    assert assignment_is_best(REGIONS, np.array([5, 3]), gt) is False
    regions = REGIONS.copy()
    regions[0, 0] = -1  # region 0's only labelled pixel leaves every region: [3, 5] 1 pixel, [5, 3] 0
    assert assignment_is_best(regions, np.array([3, 5]), gt) is True
    assert assignment_is_best(regions, np.array([5, 3]), gt) is False
    nothing = np.full_like(GT, 255)  # nothing to count: a tie
    assert assignment_is_best(REGIONS, np.array([5, 3]), nothing) is True


def test_fewer_than_two_assigned_regions_is_nothing_to_check() -> None:
    assert assignment_is_best(REGIONS, np.array([3, -1]), GT) is None
    assert assignment_is_best(np.zeros((3, 4), np.int16), np.array([5]), GT) is None
    assert assignment_is_best(np.full((3, 4), -1, np.int16), np.array([-1, -1]), GT) is None
    padded = assignment_is_best(REGIONS, np.array([5, 3, -1]), GT)  # a padded slot does not count
    assert padded is False


def test_three_regions_need_the_globally_best_permutation() -> None:
    regions = np.array([[0, 0, 1, 1, 2, 2]], dtype=np.int16)
    gt = np.array([[1, 1, 2, 2, 0, 0]], dtype=np.uint8)
    assert assignment_is_best(regions, np.array([1, 2, 0]), gt) is True
    assert assignment_is_best(regions, np.array([2, 1, 0]), gt) is False
    assert assignment_is_best(regions, np.array([0, 1, 2]), gt) is False


# ---- the CLI -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def class_token_checkpoint(tiny_dfc: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-token classifier trained for one epoch on the tiny data through the real CLI."""
    out = tmp_path_factory.mktemp("class_tokens_run")
    assert main(["train", "--datadir", str(tiny_dfc), "--arch", "class_tokens", "--prune",
                 "--output_dir", str(out), *TINY_VIT_FLAGS]) == 0
    return out / "checkpoints" / "last.ckpt"


def pseudomasks(checkpoint: Path, data: Path, out: Path, *flags: str) -> int:
    return main(["pseudomasks", "--model_checkpoint", str(checkpoint), "--datadir", str(data),
                 "--output", str(out), "--batch_size", "4", *flags])


def test_class_attention_writes_masks_and_confidence_for_every_holdout_tile(class_token_checkpoint, tiny_dfc,
                                                                            tmp_path) -> None:
    out = tmp_path / "ca"
    assert pseudomasks(class_token_checkpoint, tiny_dfc, out, "--method", "class_attention",
                       "--split", "validation:holdout") == 0
    holdout = open_dataset("dfc2020", tiny_dfc, "validation:holdout")
    assert len(holdout.ids) == 5
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert [r["id"] for r in rows] == holdout.ids
    assert all(r["method"] == "class_attention" and r["status"] in ("ok", "fallback") for r in rows)
    assert sorted(p.stem for p in out.glob("*.tif")) == sorted(holdout.ids)
    assert sorted(p.stem for p in (out / "confidence").glob("*.tif")) == sorted(holdout.ids)
    for tid in holdout.ids:
        with rasterio.open(out / f"{tid}.tif") as mask:
            assert mask.shape == (32, 32) and mask.read(1).max() < 8
        with rasterio.open(out / "confidence" / f"{tid}.tif") as conf:
            assert conf.shape == (32, 32) and conf.dtypes[0] == "uint8"
    for r in rows:  # the confidence follows the rule that made the mask
        confidence = read_confidence(out / "confidence" / f"{r['id']}.tif")
        if r["reason"] == "single_label":
            assert (confidence == 1).all()
        elif r["reason"] == "no_label_above_threshold" or "nothing_painted" in r["reason"]:
            assert (confidence == 0).all()
        else:
            assert r["reason"].startswith("class_attention_argmax") and confidence.max() > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"] == "validation:holdout" and summary["tiles"] == summary["written"] == 5


def test_class_attention_on_a_one_cls_checkpoint_names_it_and_the_arch(tiny_checkpoint, tiny_dfc, tmp_path,
                                                                       capsys) -> None:
    out = tmp_path / "refused"
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--method", "class_attention") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert str(tiny_checkpoint) in err and "--arch class_tokens" in err
    assert not list(out.glob("*.tif"))


def test_an_option_of_another_method_is_refused_naming_the_flag(tiny_checkpoint, tiny_dfc, tmp_path,
                                                                 capsys) -> None:
    out = tmp_path / "x"
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--method", "gradcam", "--assign", "rank") == 2
    err = capsys.readouterr().err
    assert "error: --assign applies to --method attention, not to --method gradcam" in err


def test_head_gradient_assignment_is_checked_against_the_ground_truth(tiny_checkpoint, tiny_dfc, tmp_path,
                                                                      capsys) -> None:
    out = tmp_path / "hg"
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--method", "attention", "--assign", "head_gradient",
                       "--oracle") == 0
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert "assignment" in rows[0]
    assert {r["assignment"] for r in rows} <= {"best", "not_best", ""}
    checked = [r for r in rows if r["assignment"]]
    assert checked, "no tile was clustered: the diagnostic was never exercised"
    assert all(r["reason"].startswith("clustered") or r["reason"].startswith("fewer_heads_than_labels")
               for r in checked)
    assert all(r["reason"].split(";")[0] in ("single_label", "no_label_above_threshold", "no_heads_kept")
               for r in rows if not r["assignment"] and "nothing_painted" not in r["reason"])
    summary = json.loads((out / "summary.json").read_text())
    best = sum(r["assignment"] == "best" for r in checked)
    assert summary["assignment"] == {"best": best, "checked": len(checked), "labels": "oracle"}
    assert f"the best possible on {best} of {len(checked)} multi-label tiles" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert run["method_options"]["assign"] == "head_gradient"


def test_top_class_has_no_assignment_to_check(tiny_checkpoint, tiny_dfc, tmp_path) -> None:
    out = tmp_path / "top"
    flags = ["--method", "top_class", "--split", "validation:holdout"]
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, *flags) == 0
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert len(rows) == 5 and all(r["assignment"] == "" for r in rows)
    assert "assignment" not in json.loads((out / "summary.json").read_text())


def test_relabel_through_the_cli_only_relabels_regions_within_the_label_set(tiny_checkpoint, tiny_dfc,
                                                                           tmp_path) -> None:
    """``--relabel`` (the paper's step 8) gives each region of the plain mask one class among the image's labels."""
    plain, relabelled = tmp_path / "plain", tmp_path / "relabelled"
    assert pseudomasks(tiny_checkpoint, tiny_dfc, plain, "--oracle", "--no-evaluate") == 0
    assert pseudomasks(tiny_checkpoint, tiny_dfc, relabelled, "--oracle", "--relabel", "--no-evaluate") == 0
    assert json.loads((relabelled / "run.json").read_text())["relabel"] is True
    reader = open_dataset("dfc2020", tiny_dfc, "validation")
    rows = {r["id"]: r for r in csv.DictReader((relabelled / "manifest.csv").open())}
    assert set(rows) == set(reader.ids)
    changed = 0
    for tid in reader.ids:
        with rasterio.open(plain / f"{tid}.tif") as a, rasterio.open(relabelled / f"{tid}.tif") as b:
            before, after = a.read(1), b.read(1)
        assert before.shape == after.shape
        labels = {reader.class_names.index(n) for n in rows[tid]["labels"].split(";") if n}
        assert labels, tid  # oracle labels: every tile has some
        for c in np.unique(before):
            new = np.unique(after[before == c])
            assert len(new) == 1, (tid, c, new)  # a region keeps one class: only relabelled, never reshaped
            assert int(new[0]) in labels, (tid, c, new)  # and it is one of the image's labels
        changed += int((before != after).any())
    assert changed > 0, "no region changed class: --relabel was not exercised"


# ---- --crf ---------------------------------------------------------------------------------------------------
def _masks(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(folder.glob("*.tif")):
        with rasterio.open(path) as src:
            out[path.stem] = src.read(1)
    return out


def test_crf_masks_are_the_crf_of_the_plain_masks_on_each_tiles_composite(tiny_checkpoint, tiny_dfc, tmp_path):
    pytest.importorskip("pydensecrf.densecrf")
    from weakseg.masks.crf import CRFSettings, crf_image, crf_refine

    plain, with_crf = tmp_path / "plain", tmp_path / "crf"
    flags = ["--method", "gradcam", "--split", "validation", "--no-evaluate"]
    assert pseudomasks(tiny_checkpoint, tiny_dfc, plain, *flags) == 0
    assert pseudomasks(tiny_checkpoint, tiny_dfc, with_crf, *flags, "--crf", "--crf_settings",
                       "bilateral_sxy=20", "iterations=5") == 0
    settings = CRFSettings(bilateral_sxy=20, iterations=5)
    assert json.loads((with_crf / "run.json").read_text())["crf"] == {**settings.__dict__}
    reader = open_dataset("dfc2020", tiny_dfc, "validation")
    before, after = _masks(plain), _masks(with_crf)
    assert before.keys() == after.keys() == set(reader.ids)
    changed = 0
    for i, tile in enumerate(reader.ids):
        expected = crf_refine(before[tile], crf_image(reader.read_image(i)), settings)
        assert np.array_equal(after[tile], expected), tile
        changed += int((after[tile] != before[tile]).any())
    assert changed > 0  # the CRF did something on this data
    # the same folder with other CRF settings is another run: refused without --overwrite
    assert pseudomasks(tiny_checkpoint, tiny_dfc, with_crf, *flags, "--crf") == 2


def test_crf_flag_mistakes_are_named(tiny_checkpoint, tiny_dfc, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m"
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--crf_settings", "iterations=3") == 2
    assert "--crf_settings needs --crf" in capsys.readouterr().err
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--crf", "--crf_settings", "sxy=3") == 2
    assert "expected KEY=VALUE with KEY one of" in capsys.readouterr().err
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--crf", "--crf_settings", "iterations=many") == 2
    assert "iterations must be an integer" in capsys.readouterr().err

    import weakseg.pipeline.pseudomasks as pipeline
    from weakseg.errors import ConfigError

    def missing() -> None:
        raise ConfigError("--crf needs the optional dependency pydensecrf2, which is not installed: "
                          "pip install 'weakseg[crf]' (or pip install pydensecrf2)")

    monkeypatch.setattr(pipeline, "require_crf", missing)
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--crf") == 2
    assert "pip install 'weakseg[crf]'" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
