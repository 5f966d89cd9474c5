"""``weakseg refine --num_devices 2 --accelerator cpu``: refinement under DDP (two gloo processes on CPU).

The command runs in a subprocess, through a small wrapper that records every mask, confidence map and JSON
file each rank writes (Lightning re-launches the same script for rank 1, so both ranks are recorded) and
slows rank 1's mask writes down, so that rank 0 finishes predicting first and must wait for rank 1's tiles
before scoring. Odd tile counts (7 training tiles, 3 test tiles) make the ranks predict different numbers.

**Compared with one process: prediction, not training.** A 1-process run of the same flags trains other
weights, and no setting makes the two trainings identical by construction: under DDP each rank draws its own
shard of the tiles from Lightning's ``DistributedSampler`` (its own seeded order, padded to equal shares: 7
tiles become 8, one seen twice) in batches of ``--batch_size`` per rank, where one process draws
``--batch_size`` tiles from its ``RandomSampler`` (another order); the gradients are the mean over ranks of
each rank's mean loss (the cross-entropy over that rank's labelled pixels, not over the union); the UNet's
BatchNorm normalises each rank's batch with that rank's statistics (no SyncBatchNorm), and each rank keeps
its own running statistics; each rank's augmentations come from its own random stream. Doubling
``--batch_size`` for one process changes none of this, and a model without BatchNorm would still see other
batches. What must be identical is what the processes do with the same weights: the masks (and confidence
maps) the two ranks write after training are those one process predicts from the saved ``unet.ckpt`` (rank
1's running BatchNorm statistics after training are not rank 0's, which are saved; Lightning copies rank 0's
into every rank before predicting), and two processes predicting a newly requested eval split from a finished
stage's ``unet.ckpt`` (refine's no-retraining path) write exactly what one process writes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from weakseg.cli import main
from weakseg.data import open_dataset
from weakseg.data.mask_files import CONFIDENCE_DIR, read_confidence, write_mask_geotiff
from weakseg.data.synthetic import generate_synthetic_dfc2020
from weakseg.evaluation.compare import evaluate_folder

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

WRAPPER = '''
import json, os, sys, time
import weakseg.pipeline.mask_writer as mask_writer
import weakseg.pipeline.refine as refine

LOG = os.environ["REFINE_WRITE_LOG"]


def recorded(kind, function, path_arg=0):
    def wrapper(*args, **kwargs):
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        if rank == 1 and kind in ("mask", "confidence"):
            time.sleep(0.25)  # a slow rank: rank 0 must wait for its tiles before it scores them
        with open(LOG, "a") as log:  # one short line per write, appended: safe from two processes
            log.write(json.dumps({"rank": rank, "kind": kind,
                                  "path": str(args[path_arg])}) + "\\n")
        return function(*args, **kwargs)
    return wrapper


mask_writer.write_mask_geotiff = recorded("mask", mask_writer.write_mask_geotiff)
mask_writer.write_confidence_geotiff = recorded("confidence", mask_writer.write_confidence_geotiff)
refine.atomic_write_json = recorded("json", refine.atomic_write_json)
refine.mark_done = recorded("done", refine.mark_done)
refine.save_resolved = recorded("config", refine.save_resolved, path_arg=1)  # (cfg, out_dir, ...)

from weakseg.cli import main

sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict:
    """One DDP refinement (label-weighted by the tiny classifier, with a held-out split), recorded."""
    tmp = tmp_path_factory.mktemp("refine_ddp")
    data = tmp / "data"
    generate_synthetic_dfc2020(data, {"validation": 7, "test": 3}, tile_size=32, seed=5)
    reader = open_dataset("dfc2020", data, "validation")
    rng = np.random.default_rng(0)
    pseudomasks = tmp / "pm"
    pseudomasks.mkdir()
    for i, tile_id in enumerate(reader.ids):  # ground truth with 30 % of the pixels relabelled at random
        mask = reader.read_mask(i).copy()
        noisy = rng.random(mask.shape) < 0.3
        mask[noisy] = rng.integers(0, 8, int(noisy.sum()))
        write_mask_geotiff(pseudomasks / f"{tile_id}.tif", mask, reader.source_path(i))
    out = tmp / "out"
    writes, stdout = run_recorded(tmp, refine_args(data, pseudomasks, out, tiny_checkpoint, "test", 2))
    return {"data": data, "pseudomasks": pseudomasks, "checkpoint": tiny_checkpoint, "out": out,
            "writes": writes, "stdout": stdout}


def refine_args(data: Path, pseudomasks: Path, out: Path, checkpoint: Path, eval_split: str, devices: int,
                *extra: str) -> list[str]:
    return ["refine", "--datadir", str(data), "--pseudomasks", str(pseudomasks), "--output", str(out),
            "--model_checkpoint", str(checkpoint), "--eval_split", eval_split, "--num_devices", str(devices),
            "--accelerator", "cpu", "--epochs", "1", "--widths", "4", "8", "--batch_size", "2", "--seed", "3",
            *extra]


def run_recorded(tmp: Path, args: list[str]) -> tuple[list[dict], str]:
    """``weakseg <args>`` in a subprocess through :data:`WRAPPER`: (the writes of every rank, stdout)."""
    wrapper = tmp / "run_weakseg.py"
    wrapper.write_text(WRAPPER)
    log = tmp / "writes.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "WEAKSEG_THREADS"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", REFINE_WRITE_LOG=str(log))
    proc = subprocess.run([sys.executable, str(wrapper), *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()], proc.stdout


def run_in_process(args: list[str]) -> None:
    """``weakseg <args>`` in this process, on one thread like each subprocess rank (environment restored)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("WEAKSEG_THREADS", "1")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert main(args) == 0
        finally:
            torch.set_num_threads(threads)


def ids(data: Path, split: str) -> list[str]:
    return open_dataset("dfc2020", data, split).ids


def test_two_ranks_really_ran_and_each_predicted_part_of_the_tiles(ddp_run: dict) -> None:
    ranks = Counter(w["rank"] for w in ddp_run["writes"] if w["kind"] == "mask")
    assert set(ranks) == {0, 1}  # not a silent single-process run
    masks = [w for w in ddp_run["writes"] if w["kind"] == "mask" and "/iter1/masks/" in w["path"]]
    per_rank = Counter(w["rank"] for w in masks)
    assert sorted(per_rank.values()) == [3, 4]  # 7 tiles split between the ranks, none repeated


@pytest.mark.parametrize("folder,split", [("masks", "validation"), ("eval_masks", "test"),
                                          ("eval_unet_alone", "test")])
def test_every_tile_gets_exactly_one_mask_and_one_confidence_map(ddp_run: dict, folder: str,
                                                                  split: str) -> None:
    stage = ddp_run["out"] / "iter1" / folder
    tile_ids = ids(ddp_run["data"], split)
    assert sorted(p.name for p in stage.glob("*.tif")) == sorted(f"{t}.tif" for t in tile_ids)
    written = Counter(Path(w["path"]) for w in ddp_run["writes"] if w["kind"] == "mask")
    for t in tile_ids:
        assert written[stage / f"{t}.tif"] == 1, t  # written once, by one rank
    if folder == "eval_unet_alone":  # the UNet's own argmax: masks only
        assert not (stage / CONFIDENCE_DIR).exists()
        return
    confidence = stage / CONFIDENCE_DIR
    assert sorted(p.name for p in confidence.glob("*.tif")) == sorted(f"{t}.tif" for t in tile_ids)
    written = Counter(Path(w["path"]) for w in ddp_run["writes"] if w["kind"] == "confidence")
    for t in tile_ids:
        assert written[confidence / f"{t}.tif"] == 1, t
        c = read_confidence(confidence / f"{t}.tif")
        assert c.shape == (32, 32) and 0 <= c.min() and c.max() <= 1


def test_no_temporary_or_stray_files_are_left(ddp_run: dict) -> None:
    out = ddp_run["out"]
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    stage = out / "iter1"
    assert {p.name for p in stage.iterdir()} == {"masks", "eval_masks", "eval_unet_alone", "scores.json",
                                                 "done.json", "unet.ckpt", "metrics.csv", "hparams.yaml"}


def test_scores_are_those_of_the_masks_on_disk(ddp_run: dict) -> None:
    """Rank 0 scores after both ranks' masks are written: the same as scoring the folders in one process."""
    data, out = ddp_run["data"], ddp_run["out"]
    scores = json.loads((out / "iter1" / "scores.json").read_text())
    train_reader = open_dataset("dfc2020", data, "validation")
    test_reader = open_dataset("dfc2020", data, "test")
    expected = {
        "train_tiles": evaluate_folder(out / "iter1" / "masks", train_reader),
        "eval_split": evaluate_folder(out / "iter1" / "eval_masks", test_reader),
        "eval_unet_alone": evaluate_folder(out / "iter1" / "eval_unet_alone", test_reader),
    }
    assert scores == json.loads(json.dumps(expected))
    summary = json.loads((out / "summary.json").read_text())
    assert [e["iteration"] for e in summary["iterations"]] == [0, 1]
    entry = summary["iterations"][1]
    for key, name in (("train_scores", "train_tiles"), ("eval_scores", "eval_split"),
                      ("eval_unet_alone_scores", "eval_unet_alone")):
        assert entry[key] == {k: scores[name][k] for k in ("miou", "oa", "aa", "coverage")}, key
    assert summary["final_masks"] == str(out / "iter1" / "masks")


def test_markers_scores_summary_and_config_are_written_once_by_rank_zero(ddp_run: dict) -> None:
    out = ddp_run["out"]
    single = [w for w in ddp_run["writes"] if w["kind"] in ("done", "json", "config")]
    counts = Counter((w["kind"], w["path"]) for w in single)
    assert counts == Counter({("done", str(out / "iter1")): 1, ("config", str(out)): 1,
                              ("json", str(out / "iter0" / "scores.json")): 1,
                              ("json", str(out / "iter1" / "scores.json")): 1,
                              ("json", str(out / "summary.json")): 1})
    assert {w["rank"] for w in single} == {0}
    done = json.loads((out / "iter1" / "done.json").read_text())
    assert (done["stage"], done["train_tiles"], done["eval_split"], done["epochs"]) == ("iter1", 7, "test", 1)
    assert ddp_run["stdout"].count("iteration 1/1:") == 1  # one progress line: rank 0 only


# ---- the same weights: one process and two write the same masks --------------------------------------------
def repredict_args(ddp_run: dict, out: Path, eval_split: str, devices: int) -> list[str]:
    """The DDP run's command into a copy ``out`` of its folder, asking for another eval split (no figures)."""
    return refine_args(ddp_run["data"], ddp_run["pseudomasks"], out, ddp_run["checkpoint"], eval_split,
                       devices, "--no-figures")


@pytest.fixture(scope="module")
def repredicted(ddp_run: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The DDP run's saved UNet (``iter1/unet.ckpt``) predicting again in one process, through refine's path
    for a finished stage asked for a new eval split (no retraining): a copy of the DDP run's folder asked for
    ``--eval_split validation`` (the 7 training tiles as an eval split), then for ``--eval_split test``."""
    tmp = tmp_path_factory.mktemp("refine_repredict")
    one = tmp / "one"
    shutil.copytree(ddp_run["out"], one)
    run_in_process(repredict_args(ddp_run, one, "validation", 1))
    one_validation = tmp / "one_validation_iter1"
    shutil.copytree(one / "iter1", one_validation)
    run_in_process(repredict_args(ddp_run, one, "test", 1))
    return {"one_validation": one_validation, "one_test": one / "iter1"}


@pytest.fixture(scope="module")
def repredicted_by_two(ddp_run: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same new eval split (``validation``) predicted from the saved UNet by two processes (recorded)."""
    tmp = tmp_path_factory.mktemp("refine_repredict_ddp")
    two = tmp / "two"
    shutil.copytree(ddp_run["out"], two)
    writes, stdout = run_recorded(tmp, repredict_args(ddp_run, two, "validation", 2))
    return {"two": two, "writes": writes, "stdout": stdout}


def assert_same_folders(a: Path, b: Path, ids: list[str], confidence: bool = True) -> None:
    """The same masks (and confidence maps) of ``ids``, pixel for pixel and byte for byte, and no others."""
    names = [f"{t}.tif" for t in ids] + ([f"{CONFIDENCE_DIR}/{t}.tif" for t in ids] if confidence else [])
    for folder in (a, b):
        found = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        assert found == set(names), folder
    for name in names:
        with rasterio.open(a / name) as x, rasterio.open(b / name) as y:
            assert x.shape == y.shape == (32, 32) and np.array_equal(x.read(1), y.read(1)), name
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def without_paths(scores: dict) -> dict:
    """Scores with the predictions folder left out (the only value that names where the masks are)."""
    return {k: v for k, v in scores.items() if k != "predictions"}


def test_masks_both_ranks_wrote_after_training_are_those_one_process_predicts_from_the_saved_unet(
        ddp_run: dict, repredicted: dict) -> None:
    """Rank 1 ends training with its own BatchNorm running statistics; the masks it writes must still be those
    of the saved weights (rank 0's), as one process predicts them."""
    data, stage = ddp_run["data"], ddp_run["out"] / "iter1"
    validation, test = repredicted["one_validation"], repredicted["one_test"]
    assert_same_folders(stage / "masks", validation / "eval_masks", ids(data, "validation"))
    assert_same_folders(stage / "eval_masks", test / "eval_masks", ids(data, "test"))
    assert_same_folders(stage / "eval_unet_alone", test / "eval_unet_alone", ids(data, "test"),
                        confidence=False)
    ddp_scores = json.loads((stage / "scores.json").read_text())
    validation = json.loads((validation / "scores.json").read_text())
    test = json.loads((test / "scores.json").read_text())
    assert without_paths(validation["eval_split"]) == without_paths(ddp_scores["train_tiles"])
    assert without_paths(test["eval_split"]) == without_paths(ddp_scores["eval_split"])
    assert without_paths(test["eval_unet_alone"]) == without_paths(ddp_scores["eval_unet_alone"])


@pytest.mark.slow  # one more 2-process launch (~15 s); run with -m slow
def test_two_processes_predict_a_new_eval_split_from_the_saved_unet_as_one_process(
        ddp_run: dict, repredicted: dict, repredicted_by_two: dict) -> None:
    """refine's no-retraining path (a finished stage asked for a new eval split) under DDP: the ranks share
    the tiles and write what one process writes; rank 0 alone rescores and re-marks the stage."""
    two, one = repredicted_by_two["two"] / "iter1", repredicted["one_validation"]
    tile_ids = ids(ddp_run["data"], "validation")
    writes = repredicted_by_two["writes"]
    for folder, kind in (("eval_masks", "mask"), ("eval_masks/confidence", "confidence"),
                         ("eval_unet_alone", "mask")):
        stage = two / folder
        mine = [w for w in writes if w["kind"] == kind and Path(w["path"]).parent == stage]
        once_each = Counter({stage / f"{t}.tif": 1 for t in tile_ids})
        assert Counter(Path(w["path"]) for w in mine) == once_each, folder
        assert sorted(Counter(w["rank"] for w in mine).values()) == [3, 4], folder  # both ranks, unequally
    assert not [w for w in writes if w["kind"] in ("mask", "confidence") and "/eval_masks/" not in w["path"]
                and "/eval_unet_alone/" not in w["path"]]  # nothing retrained, nothing else predicted
    assert_same_folders(two / "eval_masks", one / "eval_masks", tile_ids)
    assert_same_folders(two / "eval_unet_alone", one / "eval_unet_alone", tile_ids, confidence=False)
    a, b = (json.loads((stage / "scores.json").read_text()) for stage in (two, one))
    assert a.keys() == b.keys() == {"train_tiles", "eval_split", "eval_unet_alone"}
    assert all(without_paths(a[k]) == without_paths(b[k]) for k in a)
    assert json.loads((two / "done.json").read_text()) == json.loads((one / "done.json").read_text())
    single = Counter((w["kind"], Path(w["path"]).name) for w in writes if w["kind"] in ("done", "json"))
    assert single == Counter({("done", "iter1"): 1, ("json", "scores.json"): 2, ("json", "summary.json"): 1})
    assert {w["rank"] for w in writes if w["kind"] in ("done", "json", "config")} == {0}
    leftovers = [p for p in repredicted_by_two["two"].rglob("*")
                 if p.name.endswith(".tmp") or p.name == ".weakseg.lock"]
    assert leftovers == []
    assert repredicted_by_two["stdout"].count("iteration 1/1:") == 1
