"""``weakseg refine --num_devices 2 --accelerator cpu``: refinement under DDP (two gloo processes on CPU).

The command runs in a subprocess, through a small wrapper that records every mask, confidence map and JSON
file each rank writes (Lightning re-launches the same script for rank 1, so both ranks are recorded) and
slows rank 1's mask writes down, so that rank 0 finishes predicting first and must wait for rank 1's tiles
before scoring. Odd tile counts (7 training tiles, 3 test tiles) make the ranks predict different numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

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
    wrapper = tmp / "run_weakseg.py"
    wrapper.write_text(WRAPPER)
    log = tmp / "writes.jsonl"
    out = tmp / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "REFINE_WRITE_LOG": str(log)}
    cmd = [sys.executable, str(wrapper), "refine", "--datadir", str(data), "--pseudomasks", str(pseudomasks),
           "--output", str(out), "--model_checkpoint", str(tiny_checkpoint), "--eval_split", "test",
           "--num_devices", "2", "--accelerator", "cpu", "--epochs", "1", "--widths", "4", "8",
           "--batch_size", "2", "--seed", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    writes = [json.loads(line) for line in log.read_text().splitlines()]
    return {"data": data, "out": out, "writes": writes, "stdout": proc.stdout}


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
