"""Benchmark: peak memory of ``weakseg train``, ``pseudomasks`` and ``refine`` against the number of tiles.

Why (issue 12): a command whose memory grows with the number of tiles (a list of per-tile results, a cache
of every tile, the predictions of the whole split kept to the end) works on the demo's 256 tiles and fails on
a large dataset, hours into a run. This runs the real commands on datasets that differ only in their tile
count and checks that their private memory stays flat.

What: for each ``--tiles`` count (default 1,000 and 10,000 tiles of 64 x 64, ``--tile_size``) a DFC2020-layout
dataset is generated (:func:`weakseg.data.synthetic.generate_synthetic_dfc2020`, the ``validation`` split
only) and each command runs once on it, in its own process through the real CLI (``python -m weakseg.cli``),
with one thread (``OMP_NUM_THREADS`` = ``--threads``, 1), on CPU, without DataLoader workers:

- ``weakseg train``: the tests' tiny gated ViT (``TINY_VIT_FLAGS``: dim 24, 2 blocks x 4 heads, patch 8,
  32 x 32 crops) for 1 epoch on ``validation:train``, ``best.ckpt`` chosen on ``validation:holdout``;
- ``weakseg pseudomasks``: attention clustering (the default method) from that run's ``last.ckpt`` on every
  tile of ``validation``, the masks scored on the ground truth (``--evaluate``, the default);
- ``weakseg refine``: 1 iteration of 1 epoch of a small UNet (widths 8 16) on those pseudomasks, with the
  classifier's label weighting, predicting every tile;
- with ``--store`` (the default) then ``weakseg prepare`` (the float16 tile store of ``validation``) and the
  three commands again, now reading the store: rows ``files`` and ``store`` of the tables.

How: the benchmark polls ``/proc/<pid>/status`` of the command's process and its descendants every
``--interval`` seconds (0.2) and keeps the peaks, over the process tree, of ``VmRSS`` and of its parts
``RssAnon`` -- private memory: heap, numpy and torch arrays, Python objects -- and ``RssFile`` -- mapped file
pages: shared libraries and the memory-mapped tile store. Only ``RssAnon`` decides the verdict. ``RssFile``
pages are page cache: shared by every process that maps the file and dropped by the kernel under memory
pressure, so a store of 10,000 tiles mapped page by page raises ``VmRSS`` by its size (here up to ~1 GB)
without costing memory a process can run out of. As a check, ``ru_maxrss`` of the child (from ``os.wait4``:
the kernel's own peak ``VmRSS``, which a 0.2 s poll can miss by a few MB) is printed beside the polled peaks;
``--json`` also keeps ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` before and after each command (the largest
child so far: it moves only when a command is the largest yet). Wall time includes the interpreter start and
imports (5-10 s); tiles/s is the split's tile count over it.

Verdict, per command and row, between the smallest and the largest ``--tiles``: ``flat`` when peak
``RssAnon`` changes by less than ``--flat_mb`` (default 32 MB), ``GROWS`` when it rises by more, ``DROPS``
when it falls by more (memory that depends on the tile count the other way round: a cache switched off above a
size). A fixed amount, not a ratio: about 300 MB of every command is the interpreter with torch and
Lightning, so "20 % more" would let 64 MB through, 7 kB per extra tile from 1,000 to 10,000 tiles, more than
a 64 x 64 mask (4 kB as uint8). 32 MB over 9,000 extra tiles is 3.6 kB a tile, 1/60 of one 13-band float32
tile (208 kB): a per-tile image or mask kept in memory is caught, the run-to-run noise of the allocator and
of torch's lazy allocations (1-4 MB measured; the spread is printed with ``--repeats`` > 1) is not. The
growth per extra tile (kB) is printed as well: times the tile count of a real dataset, it is what a small but
non-zero growth (per-tile bookkeeping: ids, file paths, manifest rows, the store's per-tile fingerprints)
costs there.

Known, by design: ``refine`` without a store keeps its training tiles in memory when they take less than
1 GiB (:data:`weakseg.pipeline.refine.CACHE_LIMIT_BYTES`), 208 kB a tile here: about +200 MB at 1,000 tiles
and none at 10,000 (2 GB, over the limit), so its ``files`` row reads ``DROPS`` and its ``store`` row (no
cache) is the one to read; the cache's growth shows between two counts under the limit (``--tiles 200
1000``: +258 kB per extra tile). Run (35 min on two shared cores with the defaults; 3-4 min of it generates
the 10,000 tiles)::

    OMP_NUM_THREADS=1 python benchmarks/memory_scale.py
    OMP_NUM_THREADS=1 python benchmarks/memory_scale.py --tiles 100 400 --no-store            # ~2 min
    OMP_NUM_THREADS=1 python benchmarks/memory_scale.py --workdir /big/disk --keep --json runs/memscale.json
    OMP_NUM_THREADS=1 python benchmarks/memory_scale.py --commands pseudomasks refine   # train runs too

``--workdir`` holds the datasets and the runs (in a temporary folder inside it, removed afterwards unless
``--keep``); each command's output goes to ``logs/<tiles>-<reads>-<command>.log`` there, and the end of it is
printed when a command fails (exit status 1). Exit status 1 as well when a verdict is ``GROWS``; ``DROPS`` is
reported but is not a failure (the default run's ``refine``/``files`` row always drops, see above).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: The tests' tiny ViT (tests/conftest.py TINY_VIT_FLAGS), 1 epoch.
TINY_VIT_FLAGS = ["--embed_dim", "24", "--depth", "2", "--num_heads", "4", "--patch_size", "8", "--imgsize",
                  "32", "--train_batch_size", "8", "--num_epochs", "1"]
#: A small UNet, 1 iteration of 1 epoch.
TINY_REFINE_FLAGS = ["--widths", "8", "16", "--epochs", "1", "--iterations", "1", "--batch_size", "16"]
#: Fields of /proc/<pid>/status summed over the process tree (kB there, MB here).
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
COMMANDS = ("prepare", "train", "pseudomasks", "refine")
#: What each command reads that another command writes: run first (unmeasured) when only it is asked for.
NEEDS = {"prepare": (), "train": (), "pseudomasks": ("train",), "refine": ("train", "pseudomasks")}


def commands_to_run(wanted: list[str], variant: str) -> list[str]:
    """The commands a ``variant`` ("files" / "store") run needs for ``wanted``, in :data:`COMMANDS` order:
    the wanted ones, what they read (:data:`NEEDS`), and ``prepare`` before the first store run."""
    needed = set(wanted) | {dep for name in wanted for dep in NEEDS[name]}
    if variant == "store" and needed:
        needed.add("prepare")
    else:
        needed.discard("prepare")  # it writes the store: measured in the store rows only
    return [name for name in COMMANDS if name in needed]


# ---- measuring one process tree ----------------------------------------------------------------------------
def read_status(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, RssFile, RssShmem of one process in MB ({} when it is gone)."""
    out: dict[str, float] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            out[key] = int(value.split()[0]) / 1024
    return out


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (``/proc/<pid>/task/<tid>/children``, recursively)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                todo += [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    return found


def tree_memory(pid: int) -> tuple[dict[str, float], int]:
    """The STATUS_FIELDS summed over ``pid`` and its descendants, and how many processes that is."""
    total = dict.fromkeys(STATUS_FIELDS, 0.0)
    pids = descendants(pid)
    for p in pids:
        for key, value in read_status(p).items():
            total[key] += value
    return total, len(pids)


def run_measured(cmd: list[str], env: dict[str, str], log_file: Path, interval: float) -> dict[str, Any]:
    """Run ``cmd`` (output to ``log_file``), polling its process tree: peaks (MB), wall s, ru_maxrss, rc."""
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    peak = dict.fromkeys(STATUS_FIELDS, 0.0)
    samples, max_procs = 0, 0
    with log_file.open("w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # (0, 0, zeros) while it runs
            if pid == proc.pid:
                break
            mem, procs = tree_memory(proc.pid)
            if mem["VmRSS"] > 0:  # an exited process not yet reaped reports no VmRSS
                samples, max_procs = samples + 1, max(max_procs, procs)
                for key in STATUS_FIELDS:
                    peak[key] = max(peak[key], mem[key])
            time.sleep(interval)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4 above: tell Popen
    return {
        "rc": proc.returncode, "wall_s": wall, "samples": samples, "processes": max_procs,
        **{f"peak_{key}_mb": peak[key] for key in STATUS_FIELDS},
        "ru_maxrss_mb": usage.ru_maxrss / 1024,  # the child's peak VmRSS (its reaped children's included)
        "children_maxrss_before_mb": children_before,
        "children_maxrss_after_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


# ---- the commands ------------------------------------------------------------------------------------------
def command_lines(data: Path, run: Path) -> dict[str, list[str]]:
    """Each command's argv (after ``python -m weakseg.cli``) on dataset ``data``, outputs under ``run``."""
    ckpt = run / "train" / "checkpoints" / "last.ckpt"
    common = ["--accelerator", "cpu"]
    return {
        "prepare": ["prepare", "--datadir", str(data), "--split", "validation"],
        "train": ["train", "--datadir", str(data), "--output_dir", str(run / "train"), "--prune",
                  *TINY_VIT_FLAGS, "--num_workers", "0", *common],
        "pseudomasks": ["pseudomasks", "--model_checkpoint", str(ckpt), "--datadir", str(data), "--split",
                        "validation", "--output", str(run / "pseudomasks"), "--batch_size", "16",
                        "--num_workers", "0", *common],
        "refine": ["refine", "--datadir", str(data), "--pseudomasks", str(run / "pseudomasks"), "--output",
                   str(run / "refine"), "--model_checkpoint", str(ckpt), "--split", "validation",
                   *TINY_REFINE_FLAGS, "--num_workers", "0", *common],
    }


def run_command(name: str, argv: list[str], env: dict[str, str], log_file: Path, tiles: int,
                interval: float, note: str = "") -> dict[str, Any]:
    """One measured command (``note`` ends its line); a failure ends the benchmark with the end of its log."""
    result = run_measured([sys.executable, "-m", "weakseg.cli", *argv], env, log_file, interval)
    result.update(command=name, tiles=tiles, tiles_per_s=tiles / result["wall_s"], argv=argv)
    status = "ok" if result["rc"] == 0 else f"FAILED (exit {result['rc']})"
    print(f"  {log_file.stem:30s} {status:4s} {result['wall_s']:7.1f} s {result['tiles_per_s']:7.1f} "
          f"tiles/s  "
          f"peak VmRSS {result['peak_VmRSS_mb']:5.0f} MB (RssAnon {result['peak_RssAnon_mb']:5.0f}, RssFile "
          f"{result['peak_RssFile_mb']:5.0f}), ru_maxrss {result['ru_maxrss_mb']:5.0f} MB{note}", flush=True)
    if result["rc"] != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-40:])
        print(f"---- {log_file} (last 40 lines)\n{tail}")
        raise SystemExit(f"{log_file.stem} failed; the end of its log is above")
    return result


def bench_size(tiles: int, args: argparse.Namespace, work: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """Generate the dataset of ``tiles`` tiles and run every command on it (files, then prepare and store)."""
    from weakseg.data.synthetic import generate_synthetic_dfc2020

    data = work / f"dfc_{tiles}"
    t0 = time.perf_counter()
    generate_synthetic_dfc2020(data, num_tiles={"validation": tiles, "test": 0}, tile_size=args.tile_size,
                               seed=0)
    print(f"\n== {tiles} tiles of {args.tile_size} x {args.tile_size}: generated in "
          f"{time.perf_counter() - t0:.0f} s ({data})", flush=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    results = []
    for variant in ["files", "store"] if args.store else ["files"]:
        for repeat in range(args.repeats):
            run = work / f"run_{tiles}_{variant}_{repeat}"
            lines = command_lines(data, run)
            # prepare once, before the first run that reads the store; the files runs come before it
            names = [n for n in commands_to_run(args.commands, variant) if n != "prepare" or repeat == 0]
            for name in names:
                reads = "prepare" if name == "prepare" else variant
                label = f"{tiles}-{reads}-{name}" + (f"-r{repeat}" if args.repeats > 1 else "")
                measured = name in args.commands
                result = run_command(name, lines[name], env, logs / f"{label}.log", tiles, args.interval,
                                     note="" if measured else "  (needed by --commands, not compared)")
                result.update(variant=reads, repeat=repeat)
                if measured:
                    results.append(result)
            shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)  # its store (data/.weakseg_store) with it
    return results


# ---- the tables --------------------------------------------------------------------------------------------
def median_of(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def verdict(small: float, large: float, flat_mb: float) -> str:
    """``flat`` / ``GROWS`` / ``DROPS``: the peak RssAnon at the largest tile count against the smallest's."""
    if abs(large - small) < flat_mb:
        return "flat"
    return "GROWS" if large > small else "DROPS"


def print_tables(results: list[dict[str, Any]], sizes: list[int], flat_mb: float) -> dict[str, Any]:
    """A table per command: a row per reads variant and tile count, then the largest / smallest comparison."""
    small, large = min(sizes), max(sizes)
    summary: dict[str, Any] = {}
    header = (f"  {'reads':7s} {'tiles':>6s} {'wall s':>7s} {'tiles/s':>8s} {'VmRSS MB':>9s} "
              f"{'RssAnon MB':>11s} {'RssFile MB':>11s} {'ru_maxrss MB':>13s}")
    for name in COMMANDS:
        rows = [r for r in results if r["command"] == name]
        if not rows:
            continue
        print(f"\n{name}\n{header}")
        for variant in dict.fromkeys(r["variant"] for r in rows):
            for tiles in sizes:
                group = [r for r in rows if r["variant"] == variant and r["tiles"] == tiles]
                if not group:
                    continue
                spread = ""
                if len(group) > 1:
                    anon = [r["peak_RssAnon_mb"] for r in group]
                    spread = f"  (RssAnon {min(anon):.0f}..{max(anon):.0f} in {len(group)} runs)"
                print(f"  {variant:7s} {tiles:6d} {median_of(group, 'wall_s'):7.1f} "
                      f"{median_of(group, 'tiles_per_s'):8.1f} {median_of(group, 'peak_VmRSS_mb'):9.0f} "
                      f"{median_of(group, 'peak_RssAnon_mb'):11.0f} "
                      f"{median_of(group, 'peak_RssFile_mb'):11.0f} "
                      f"{median_of(group, 'ru_maxrss_mb'):13.0f}{spread}")
            lo = [r for r in rows if r["variant"] == variant and r["tiles"] == small]
            hi = [r for r in rows if r["variant"] == variant and r["tiles"] == large]
            if not lo or not hi or small == large:
                continue
            a_lo, a_hi = median_of(lo, "peak_RssAnon_mb"), median_of(hi, "peak_RssAnon_mb")
            v_lo, v_hi = median_of(lo, "peak_VmRSS_mb"), median_of(hi, "peak_VmRSS_mb")
            per_tile_kb = (a_hi - a_lo) * 1024 / (large - small)
            result = verdict(a_lo, a_hi, flat_mb)
            print(f"  {variant:7s} {large}/{small}: VmRSS x{v_hi / v_lo:.2f}, RssAnon x{a_hi / a_lo:.2f} "
                  f"({a_hi - a_lo:+.0f} MB, {per_tile_kb:+.2f} kB per extra tile) -> {result}")
            summary[f"{name}/{variant}"] = {
                "small_tiles": small, "large_tiles": large, "rss_anon_small_mb": a_lo,
                "rss_anon_large_mb": a_hi, "vm_rss_small_mb": v_lo, "vm_rss_large_mb": v_hi,
                "rss_anon_ratio": a_hi / a_lo, "vm_rss_ratio": v_hi / v_lo, "rss_anon_change_mb": a_hi - a_lo,
                "rss_anon_kb_per_extra_tile": per_tile_kb, "verdict": result,
            }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[1000, 10000],
                        help="tile counts of the datasets; the verdict compares the smallest and the largest")
    parser.add_argument("--tile_size", type=int, default=64, help="tile side in pixels (64)")
    parser.add_argument("--store", action=argparse.BooleanOptionalAction, default=True,
                        help="also run weakseg prepare and the three commands on the tile store (default on)")
    parser.add_argument("--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS),
                        help="commands to measure and compare (default all); what they read (train for "
                             "pseudomasks, train and pseudomasks for refine, prepare for the store) still "
                             "runs, not compared")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each command per dataset (medians compared, the spread printed)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between two memory samples")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of the commands (OMP_NUM_THREADS, MKL_NUM_THREADS; default 1)")
    parser.add_argument("--flat_mb", type=float, default=32.0,
                        help="peak RssAnon changing by less than this many MB is flat (module docstring)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where datasets and runs go (a temporary folder in it; default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (its logs/) afterwards")
    parser.add_argument("--json", type=Path, default=None, help="save the measurements and verdicts here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.interval <= 0 or args.threads < 1 or any(t < 2 for t in args.tiles):
        parser.error("--repeats and --threads >= 1, --interval > 0, every --tiles >= 2 (a holdout needs one)")
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "OPENBLAS_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="weakseg_memory_scale_", dir=args.workdir))
    sizes = sorted(dict.fromkeys(args.tiles))
    args.commands = [name for name in COMMANDS if name in args.commands]
    print(f"memory scale benchmark: {os.cpu_count()} CPU(s), {', '.join(args.commands)} with {threads} "
          "thread(s), tiles "
          f"{sizes} of {args.tile_size} x {args.tile_size}, store {'on' if args.store else 'off'}, work "
          f"folder {work}, python {sys.version.split()[0]}", flush=True)
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    try:
        for tiles in sizes:
            results += bench_size(tiles, args, work, env)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary = print_tables(results, sizes, args.flat_mb)
    total = time.perf_counter() - t0
    flagged = [k for k, v in summary.items() if v["verdict"] != "flat"]
    print(f"\nverdict (peak RssAnon, {max(sizes)} vs {min(sizes)} tiles; flat: changes by < {args.flat_mb:g} "
          "MB): "
          + (", ".join(f"{k} {summary[k]['verdict']}" for k in flagged) if flagged else "all flat")
          + f"; total {total / 60:.1f} min")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings, "results": results, "summary": summary,
                                         "total_s": total}, indent=2))
        print(f"saved {args.json}")
    return 1 if any(summary[k]["verdict"] == "GROWS" for k in flagged) else 0  # a drop is reported, not a failure


if __name__ == "__main__":
    sys.exit(main())
