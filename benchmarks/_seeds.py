"""Run one seed per subprocess, a few at a time, with a fixed thread count (shared by the quality benchmarks).

On a 2-core machine two runs with default threads were measured 10x slower than two runs with one thread each,
so every seed runs in its own process with ``OMP_NUM_THREADS`` (and torch's thread count) set to ``threads``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def run_seeds(script: str, args: Sequence[str], seeds: Sequence[int], jobs: int, threads: int) -> list[int]:
    """Run ``python script *args --seed-run S`` for every seed, ``jobs`` at once; returns the failed seeds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending, running, failed = list(seeds), [], []
    t0 = time.time()
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            print(f"[{time.time() - t0:5.0f}s] seed {seed} started", flush=True)
            running.append((seed, subprocess.Popen([sys.executable, script, *args, "--seed-run", str(seed)], env=env)))
        time.sleep(2)
        for seed, proc in list(running):
            if proc.poll() is not None:
                running.remove((seed, proc))
                print(f"[{time.time() - t0:5.0f}s] seed {seed} finished (exit {proc.returncode})", flush=True)
                if proc.returncode:
                    failed.append(seed)
    return failed


def add_seed_arguments(p: argparse.ArgumentParser, output: str, jobs: int = 2, tiles: bool = False) -> None:
    """The options every seeded benchmark shares: ``--seeds``, ``--jobs``, ``--threads``, ``--output``,
    ``--aggregate``, the internal ``--seed-run`` and, with ``tiles``, ``--train_tiles`` / ``--test_tiles``."""
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--jobs", type=int, default=jobs, help=f"seeds run at once, one thread each (default {jobs})")
    p.add_argument("--threads", type=int, default=1, help="torch threads per seed (default 1)")
    p.add_argument("--output", type=Path, default=Path(output), help=f"output folder (default {output})")
    if tiles:
        p.add_argument("--train_tiles", type=int, default=256, help="built-in training tiles (default 256)")
        p.add_argument("--test_tiles", type=int, default=64, help="built-in test tiles (default 64)")
    p.add_argument("--aggregate", type=Path, help="only aggregate the finished seeds in this folder")
    p.add_argument("--seed-run", type=int, help=argparse.SUPPRESS)  # internal: run one seed in this process


def mean_sd(values: Sequence[float], scale: float = 100.0) -> str:
    """``"52.3 ± 1.4"`` (mean and sample standard deviation, times ``scale``); ``"-"`` for no value."""
    if not values:
        return "-"
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{statistics.fmean(values) * scale:5.1f} ± {sd:4.1f}"


def seed_benchmark_main(
    args: argparse.Namespace,
    script: str,
    forwarded: Sequence[str],
    run_one_seed: Callable[[argparse.Namespace], None],
    aggregate: Callable[[Path], str],
    result_name: str,
    tiles: tuple[int, int] = (256, 64),
) -> None:
    """The ``main`` of a seeded benchmark: one seed in this process (``--seed-run``), re-aggregation
    (``--aggregate DIR``), or the whole run: built-in data (data seed 0, ``tiles`` training / test tiles of
    64 x 64), every seed in its own process, the aggregated table printed and written to ``output/result_name``.
    """
    if args.seed_run is not None:
        run_one_seed(args)
        return
    if args.aggregate is not None:
        print(aggregate(args.aggregate))
        return
    from weakseg.data.synthetic import generate_synthetic_dfc2020

    t0 = time.time()
    args.output.mkdir(parents=True, exist_ok=True)
    generate_synthetic_dfc2020(args.output / "data", {"validation": tiles[0], "test": tiles[1]}, tile_size=64, seed=0)
    failed = run_seeds(script, ["--output", str(args.output), "--threads", str(args.threads), *forwarded],
                       args.seeds, args.jobs, args.threads)
    table = aggregate(args.output)
    print("\n" + table)
    print(f"total {time.time() - t0:.0f}s")
    (args.output / result_name).write_text(table + "\n")
    if failed:
        raise SystemExit(f"seeds {failed} failed")
