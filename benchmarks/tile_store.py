"""Benchmark: reading a split from GeoTIFFs vs from the memory-mapped tile store vs the in-memory cache.

Why (:mod:`weakseg.data.tile_store`): without a store every epoch decodes every GeoTIFF; the in-memory cache holds
float32 tiles per process (multiplied by DataLoader workers, and the real DFC2020 does not fit). This measures, in
one process and on the same tiles:

- tiles/s of one pass of ``read_image`` + ``read_mask`` over the split: from the files, from a float16 and a
  float32 store, and from the in-memory cache (its second pass; the first pass decodes the files);
- tiles/s of writing each store (``weakseg prepare``) and its size on disk;
- memory before / after one pass through a store: ``VmRSS`` with its parts ``RssAnon`` (private memory: what the
  cache costs) and ``RssFile`` (mapped file pages: shared by every process through the page cache and dropped by
  the kernel under memory pressure), from ``/proc/self/status``.

Store reads are measured with a warm page cache (the store was just written, as on a machine whose RAM holds it);
a cold read is bounded by the disk. The data is the built-in synthetic generator (13 S2 bands; ``--modality
s1s2`` adds the 2 S1 bands) at each ``--sizes`` with ``--tiles`` tiles, generated into ``--workdir`` (a temporary
folder by default, removed afterwards), or an existing dataset (``--datadir``, e.g. the real DFC2020). Run::

    python benchmarks/tile_store.py                                   # 200 tiles at 64 x 64 and 256 x 256
    python benchmarks/tile_store.py --tiles 50 --sizes 64 256         # quicker
    python benchmarks/tile_store.py --tiles 20000 --sizes 256 --modality s1s2 --workdir /big/disk  # ~39 GB float16
    python benchmarks/tile_store.py --datadir /data/DFC2020 --split validation
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np


def memory() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile of this process in MB (Linux ``/proc/self/status``)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def read_pass(reader: Any) -> float:
    """Seconds to read every tile's image and mask once (the arrays are touched, then dropped)."""
    t0 = time.perf_counter()
    for i in range(len(reader)):
        image = reader.read_image(i)  # (C, H, W) float32
        if reader.has_masks:
            reader.read_mask(i)  # (H, W) uint8
        image[0, 0, 0]  # noqa: B018 - touch the result
    return time.perf_counter() - t0


def sample_pass(reader: Any) -> float:
    """Seconds to build every sample once (``reader[i]``, no transform): what a DataLoader worker does per tile
    before augmentation (validity, labels; the cache copies its array here, the store already made a new one)."""
    t0 = time.perf_counter()
    for i in range(len(reader)):
        reader[i]
    return time.perf_counter() - t0


def rate(reader: Any, repeats: int) -> tuple[float, float]:
    """(tiles/s of read_image + read_mask, tiles/s of samples): medians of ``repeats`` passes."""
    raw = len(reader) / statistics.median(read_pass(reader) for _ in range(repeats))
    return raw, len(reader) / statistics.median(sample_pass(reader) for _ in range(repeats))


def dir_size(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.iterdir() if p.is_file())


def bench(kind: str, root: Path, split: str, modality: str, repeats: int, stores: Path) -> None:
    from weakseg.data import open_dataset
    from weakseg.data.tile_store import prepare_store

    files = open_dataset(kind, root, split, modality=modality, store=False)
    first = files.read_image(0)
    print(f"\n== {root} split {split!r}, {modality}: {len(files)} tiles of {first.shape} "
          f"({first.nbytes * len(files) / 1e6:.0f} MB as float32)")
    made = {}
    for dtype in ("float16", "float32"):
        path = stores / f"{root.name}-{split}-{modality}-{dtype}"
        result = prepare_store(files, path, kind=kind, root=root, dtype=dtype, progress=lambda *a: None)
        made[dtype] = path
        err = result.meta.get("max_abs_rounding_error", 0.0)
        print(f"  prepare {dtype}: {result.written} tiles in {result.seconds:.1f}s "
              f"({result.tiles_per_second:.0f} tiles/s), {dir_size(path) / 1e6:.1f} MB on disk, "
              f"max abs rounding error {err:.2g}")

    results = {"GeoTIFF files": rate(files, repeats)}
    gc.collect()
    before = memory()
    store16 = open_dataset(kind, root, split, modality=modality, store=made["float16"])
    read_pass(store16)  # the first pass maps every page once: the memory figure is taken after it
    after = memory()
    results["store float16"] = rate(store16, repeats)  # passes after the first (warm page cache, mapped)
    store32 = open_dataset(kind, root, split, modality=modality, store=made["float32"])
    results["store float32"] = rate(store32, repeats)
    del store16, store32
    gc.collect()
    cached = open_dataset(kind, root, split, modality=modality, store=False, cache=True)
    before_cache = memory()
    read_pass(cached)  # fills the cache (decodes the files)
    after_cache = memory()
    results["in-memory cache"] = rate(cached, repeats)
    base = results["GeoTIFF files"]
    print("  tiles/s                  read_image+read_mask           samples (reader[i])")
    for name, (raw, samples) in results.items():
        print(f"  {name:16s} {raw:12.0f} (x{raw / base[0]:7.1f} vs files) {samples:9.0f} (x{samples / base[1]:5.1f})")

    def mem(m: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.0f} MB" for k, v in m.items())

    print(f"  memory before one pass through the float16 store: {mem(before)}")
    print(f"  memory after it:                                  {mem(after)}")
    if before and after:
        print(f"    -> private (RssAnon) +{after['RssAnon'] - before['RssAnon']:.0f} MB; mapped file pages (RssFile, "
              f"shared, reclaimable) +{after['RssFile'] - before['RssFile']:.0f} MB "
              f"(the store is {dir_size(made['float16']) / 1e6:.0f} MB)")
        print(f"  in-memory cache filled: private (RssAnon) +{after_cache['RssAnon'] - before_cache['RssAnon']:.0f} "
              "MB, in every process (DataLoader worker, DDP rank) that reads the split")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=200, help="tiles to generate per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="tile sides to generate")
    parser.add_argument("--modality", choices=("s2", "s1s2"), default="s2")
    parser.add_argument("--repeats", type=int, default=3, help="passes per figure (the median is printed)")
    parser.add_argument("--workdir", type=Path, default=None, help="where data and stores go (default: a temp folder)")
    parser.add_argument("--datadir", type=Path, default=None, help="benchmark this dataset instead of generating")
    parser.add_argument("--dataset", default="dfc2020", help="with --datadir: dfc2020, folder or voc")
    parser.add_argument("--split", default="validation", help="with --datadir: the split to read")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    work = Path(tempfile.mkdtemp(prefix="weakseg_store_bench_", dir=args.workdir))
    print(f"tile store benchmark: {os.cpu_count()} CPU(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"work folder {work}, python {sys.version.split()[0]}, numpy {np.__version__}")
    try:
        for kind, root, split in datasets(args, work):
            bench(kind, root, split, args.modality, args.repeats, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def datasets(args: argparse.Namespace, work: Path) -> Iterator[tuple[str, Path, str]]:
    """(kind, root, split) to benchmark: ``--datadir`` as given, else the built-in generator at each of ``--sizes``
    with ``--tiles`` tiles in ``work`` (each removed once the caller is done with it). Shared with data.py."""
    if args.datadir is not None:
        yield args.dataset, args.datadir, args.split
        return
    from weakseg.data.synthetic import generate_synthetic_dfc2020

    for size in args.sizes:
        root = work / f"synthetic_{size}"
        t0 = time.perf_counter()
        generate_synthetic_dfc2020(root, num_tiles={"validation": args.tiles, "test": 0}, tile_size=size, seed=0)
        print(f"\ngenerated {args.tiles} tiles of {size} x {size} in {time.perf_counter() - t0:.0f}s")
        yield "dfc2020", root, "validation"
        shutil.rmtree(root)


if __name__ == "__main__":
    sys.exit(main())
