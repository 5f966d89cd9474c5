"""``weakseg pseudomasks --num_devices 2 --accelerator cpu``: two gloo processes write what one writes.

Each method runs twice on the same 9 tiles (an odd count: Lightning's predict sampler deals them
round-robin, 5 to rank 0 and 4 to rank 1) with the same flags: once with ``--num_devices 2`` in a subprocess,
through a small wrapper that records every mask, confidence map and JSON file each rank writes (Lightning
re-launches the same script for rank 1, so both ranks are recorded) and slows rank 1's writes down, so that
rank 0 finishes first and must wait at the barrier for rank 1's manifest rows before it merges them; and once
with ``--num_devices 1`` (in-process, on one thread like each subprocess rank). Every method is deterministic
per image, whatever batch a tile lands in, so the two folders must be byte-identical (the manifests record
each file's sha256).

- ``attention`` (the default method) on readable tiles: the runs are also scored, and the scores must agree.
- ``gradcam`` (gradients inside the predict loop) on the same tiles with tile 3 made unreadable: it is rank
  1's, whose ``skipped`` row (with the reason) must reach the merged manifest and the summary; no scores (a
  run with skipped tiles is not scored, by design).
"""

from __future__ import annotations

import csv
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
from weakseg.data.mask_files import CONFIDENCE_DIR
from weakseg.data.synthetic import generate_synthetic_dfc2020

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TILES = 9
BAD_TILE = 3  # unreadable in the gradcam case; round-robin dealing gives it to rank 1
CASES = {"attention": False, "gradcam": True}  # method -> with the unreadable tile

WRAPPER = '''
import json, os, sys, time
import weakseg.io as io
import weakseg.pipeline.pseudomasks as pseudomasks

LOG = os.environ["PSEUDOMASK_WRITE_LOG"]


def recorded(kind, function):
    def wrapper(*args, **kwargs):
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        if rank == 1 and kind in ("mask", "confidence"):
            time.sleep(0.2)  # a slow rank: rank 0 must wait for its rows before it merges the manifest
        result = function(*args, **kwargs)
        with open(LOG, "a") as log:  # one short line per write, appended: safe from two processes
            log.write(json.dumps({"rank": rank, "kind": kind, "path": str(args[0]),
                                  "time": time.time_ns()}) + "\\n")
        return result
    return wrapper


pseudomasks.write_mask_geotiff = recorded("mask", pseudomasks.write_mask_geotiff)
pseudomasks.write_confidence_geotiff = recorded("confidence", pseudomasks.write_confidence_geotiff)
pseudomasks.atomic_write_json = recorded("json", pseudomasks.atomic_write_json)  # run.json, summary.json
io.atomic_write_json = recorded("json", io.atomic_write_json)  # scores.json (the command imports it late)

from weakseg.cli import main

sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """9 readable tiles, and a copy whose tile 3 is not a GeoTIFF."""
    tmp = tmp_path_factory.mktemp("pm_ddp_data")
    clean = tmp / "clean"
    generate_synthetic_dfc2020(clean, {"validation": TILES}, tile_size=32, seed=5)
    broken = tmp / "broken"
    shutil.copytree(clean, broken)
    bad = open_dataset("dfc2020", broken, "validation").source_path(BAD_TILE)
    Path(bad).write_bytes(b"not a tiff")
    return {False: clean, True: broken}


def command(checkpoint: Path, data: Path, out: Path, method: str, devices: int) -> list[str]:
    return ["pseudomasks", "--model_checkpoint", str(checkpoint), "--datadir", str(data),
            "--output", str(out), "--method", method, "--batch_size", "4", "--num_workers", "0",
            "--no-figures", "--accelerator", "cpu", "--num_devices", str(devices)]


@pytest.fixture(scope="module", params=sorted(CASES))
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path,
         datasets: dict[bool, Path]) -> dict:
    """One method: the 2-process run (recorded) and the 1-process run of the same command."""
    method = request.param
    data = datasets[CASES[method]]
    tmp = tmp_path_factory.mktemp(f"pm_ddp_{method}")
    wrapper = tmp / "run_weakseg.py"
    wrapper.write_text(WRAPPER)
    log = tmp / "writes.jsonl"
    two, one = tmp / "two", tmp / "one"
    env = {k: v for k, v in os.environ.items() if k != "WEAKSEG_THREADS"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PSEUDOMASK_WRITE_LOG=str(log))
    proc = subprocess.run([sys.executable, str(wrapper), *command(tiny_checkpoint, data, two, method, 2)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.MonkeyPatch.context() as mp:  # one thread like each rank; the environment is restored after
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("WEAKSEG_THREADS", "1")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert main(command(tiny_checkpoint, data, one, method, 1)) == 0
        finally:
            torch.set_num_threads(threads)
    writes = [json.loads(line) for line in log.read_text().splitlines()]
    return {"method": method, "broken": CASES[method], "data": data, "two": two, "one": one,
            "writes": writes, "stdout": proc.stdout, "ids": open_dataset("dfc2020", data, "validation").ids}


def rank_rows(out: Path) -> dict[int, list[dict]]:
    """The manifest rows each rank logged (``.manifest.rank<k>.jsonl``, kept beside the merged manifest)."""
    rows = {}
    for path in sorted(out.glob(".manifest.rank*.jsonl")):
        rank = int(path.name.split(".")[2].removeprefix("rank"))
        rows[rank] = [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def read_tif(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def written_ids(run: dict) -> list[str]:
    return [t for i, t in enumerate(run["ids"]) if not (run["broken"] and i == BAD_TILE)]


def test_both_ranks_predicted_a_disjoint_share_of_the_tiles(runs: dict) -> None:
    rows = rank_rows(runs["two"])
    assert sorted(rows) == [0, 1]  # not a silent single-process run
    ids = {rank: [r["id"] for r in found] for rank, found in rows.items()}
    assert sorted(len(v) for v in ids.values()) == [4, 5]  # 9 tiles: unequal shares
    assert sorted(ids[0] + ids[1]) == sorted(runs["ids"])  # every tile once, by one rank
    assert set(Counter(w["rank"] for w in runs["writes"] if w["kind"] == "mask")) == {0, 1}
    for w in runs["writes"]:  # each rank wrote the files of the tiles it logged, and only those
        if w["kind"] in ("mask", "confidence"):
            assert Path(w["path"]).stem in ids[w["rank"]], w
    assert list(rank_rows(runs["one"])) == [0]


def test_every_tile_gets_exactly_one_mask_and_one_confidence_map(runs: dict) -> None:
    out = runs["two"]
    expected = sorted(f"{t}.tif" for t in written_ids(runs))
    assert sorted(p.name for p in out.glob("*.tif")) == expected
    assert sorted(p.name for p in (out / CONFIDENCE_DIR).glob("*.tif")) == expected
    for kind, folder in (("mask", out), ("confidence", out / CONFIDENCE_DIR)):
        counts = Counter(Path(w["path"]) for w in runs["writes"] if w["kind"] == kind)
        assert counts == Counter({folder / name: 1 for name in expected}), kind  # none for the bad tile


def test_masks_and_confidence_maps_are_identical_to_one_process(runs: dict) -> None:
    two, one = runs["two"], runs["one"]
    assert sorted(p.name for p in one.glob("*.tif")) == sorted(p.name for p in two.glob("*.tif"))
    for t in written_ids(runs):
        for name in (f"{t}.tif", f"{CONFIDENCE_DIR}/{t}.tif"):
            a, b = read_tif(one / name), read_tif(two / name)
            assert a.shape == (32, 32) and np.array_equal(a, b), name  # pixel-identical (uint8 confidence)
            assert (one / name).read_bytes() == (two / name).read_bytes(), name  # and the same GeoTIFF
    # The merged manifest (dataset order; each file's size and sha256, statuses, labels, probabilities) too.
    assert (two / "manifest.csv").read_text() == (one / "manifest.csv").read_text()


def test_manifest_summary_and_skipped_accounting_match(runs: dict) -> None:
    two, one = runs["two"], runs["one"]
    rows = list(csv.DictReader((two / "manifest.csv").open()))
    assert [r["id"] for r in rows] == runs["ids"]  # one row per tile, dataset order
    summaries = [json.loads((out / "summary.json").read_text()) for out in (two, one)]
    for s in summaries:
        s.pop("seconds_this_run")
    assert summaries[0] == summaries[1]
    summary = summaries[0]
    written = written_ids(runs)
    assert (summary["tiles"], summary["written"], summary["tiles_this_run"]) == (TILES, len(written), TILES)
    assert sum(summary["status"].values()) == TILES
    skipped = [r for r in rows if r["status"] == "skipped"]
    if not runs["broken"]:
        assert skipped == [] and summary["skipped"] == [] and "skipped" not in summary["status"]
        return
    bad = runs["ids"][BAD_TILE]
    assert [r["id"] for r in skipped] == [bad]
    assert skipped[0]["file"] == "" and skipped[0]["confidence_file"] == ""
    assert summary["status"]["skipped"] == 1
    assert [s["id"] for s in summary["skipped"]] == [bad]
    assert "cannot read" in summary["skipped"][0]["reason"]
    by_rank = rank_rows(two)
    assert [r["id"] for r in by_rank[1] if r["status"] == "skipped"] == [bad]  # rank 1's row, merged
    assert not any(r["status"] == "skipped" for r in by_rank[0])
    assert "scores not computed: 1 of 9 tile(s) were skipped" in runs["stdout"]


def test_scores_match_one_process(runs: dict) -> None:
    two, one = runs["two"], runs["one"]
    if runs["broken"]:  # a run with skipped tiles is not scored (commands/pseudomasks.py), in either mode
        assert not (two / "scores.json").exists() and not (one / "scores.json").exists()
        return
    a, b = (json.loads((out / "scores.json").read_text()) for out in (two, one))
    assert (a.pop("predictions"), b.pop("predictions")) == (str(two), str(one))  # the only difference
    assert a == b
    assert runs["stdout"].count("scores in %") == 1  # the table printed once: by rank 0


def test_rank_zero_alone_writes_run_files_after_every_rank_finished(runs: dict) -> None:
    single = [w for w in runs["writes"] if w["kind"] == "json"]
    names = ["run.json", "summary.json"] + ([] if runs["broken"] else ["scores.json"])
    assert Counter(Path(w["path"]).name for w in single) == Counter(names)  # each once
    assert {w["rank"] for w in single} == {0}
    summary_time = next(w["time"] for w in single if w["path"].endswith("summary.json"))
    rank1_last = max(w["time"] for w in runs["writes"] if w["rank"] == 1)
    assert summary_time > rank1_last  # merged only once the slow rank had written everything
    assert runs["stdout"].count("tiles written") == 1  # one summary printed: rank 0 only


def test_no_temporary_lock_or_stray_files_are_left(runs: dict) -> None:
    run_files = {"run.json", "manifest.csv", "summary.json"} | (set() if runs["broken"] else {"scores.json"})
    tifs = {f"{t}.tif" for t in written_ids(runs)}
    for out, ranks in ((runs["two"], 2), (runs["one"], 1)):
        assert [p for p in out.rglob("*") if p.name.endswith(".tmp")] == []
        logs = {f".manifest.rank{k}.jsonl" for k in range(ranks)}
        assert {p.name for p in out.iterdir()} == logs | run_files | tifs | {CONFIDENCE_DIR}, out  # no lock
