"""Benchmark: a tile store larger than RAM -- writing it, and a training epoch read from it, with flat memory.

Why (issue 12): the real DFC2020 split is 17.5 GB as float32 S2 (20 GB with S1) and SEN12MS is ten times more;
``--cache_data`` keeps float32 tiles in a per-process dict, which cannot hold that on a 24 GB machine. The tile
store (:mod:`weakseg.data.tile_store`, ``weakseg prepare``) must hold such a split on disk, serve a training
epoch from it at the speed of the steps, and cost no private memory that grows with the number of tiles. This
script checks all three on a synthetic split of ``--tiles`` tiles of ``--bands`` x ``--size`` x ``--size``
(default 20,000 x 15 x 256 x 256: 39 GB as float16 on disk, 79 GB as float32 in memory):

1. **write**: :func:`~weakseg.data.tile_store.prepare_store` -- the code ``weakseg prepare`` runs -- on a reader
   whose tiles are made on the fly (:class:`ProceduralTiles`: no GeoTIFFs, which would need as much disk again):
   tiles/s, size on disk, and this process's memory sampled every ``--sample_seconds`` (``RssAnon``: private
   memory, what a growing list or cache would show; ``RssFile``: mapped pages of the store, shared through the
   page cache and dropped by the kernel under pressure);
2. **epoch**: one shuffled epoch of ``weakseg train``'s sample pipeline (random crop of ``--imgsize``, ``fliprot``,
   labels of the crop; the crop is read as a window of the memory map) through a ``DataLoader`` with
   ``--num_workers``, each batch going through a full training step of ``weakseg train``'s default classifier
   (:class:`~weakseg.pipeline.train.TrainConfig`, 15 input bands); and, in the same process, the pure step time
   on one batch held in memory. Printed: the epoch's wall time against ``batches x pure step`` (target <= 1.1),
   the time spent waiting for data, and the memory at 0, 25, 50, 75 and 100 % of the epoch.

The page cache cannot hold a store larger than RAM, so the epoch reads from the disk (about 1/4 of each tile's
pages for a 64 x 64 crop of a 256 x 256 float16 tile: a page holds 8 rows of one band). The store is written into
``--workdir`` (it must have room: checked first) and removed afterwards unless ``--keep``; ``--reuse`` reads an
existing one. Run one heavy job at a time::

    python benchmarks/store_scale.py --workdir /big/disk                      # 20k tiles, ~10 min on 2 cores
    python benchmarks/store_scale.py --tiles 500 --workdir /tmp/scale         # quick
    python benchmarks/store_scale.py --tiles 20000 --workdir /big/disk --keep --json store_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tile_store import memory
from torch.utils.data import DataLoader

#: Distinct noise patterns the procedural tiles draw from (tile i uses pattern i % BANK, shifted).
BANK = 16
#: Rectangles of classes per procedural tile.
REGIONS = 4


class MemorySampler:
    """Samples ``/proc/self/status`` memory every ``seconds`` in a thread; keeps the peaks and a trace."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.trace: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.trace.append((time.perf_counter() - self._t0, memory()))
            self._stop.wait(self.seconds)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.trace.append((time.perf_counter() - self._t0, memory()))

    def peak(self, key: str) -> float:
        return max(m.get(key, 0.0) for _, m in self.trace)


def make_reader(tiles: int, bands: int, size: int, seed: int) -> Any:
    """A :class:`~weakseg.data.base.TileDataset` of procedural tiles (no files); built here so the import of
    weakseg (and Lightning) is not paid by ``--help``."""
    from weakseg.data.base import TileDataset
    from weakseg.data.classes import DFC_CLASS_COLORS, DFC_CLASS_NAMES

    class ProceduralTiles(TileDataset):
        """``tiles`` tiles of ``bands`` x ``size`` x ``size`` made on the fly, deterministic in (seed, index).

        Each tile is ``REGIONS`` rectangles of classes (its mask) filled with per-class band means plus one of
        ``BANK`` noise patterns, rolled by the tile index: cheap (a gather and an add) so that writing the store
        measures the store. Values lie in [0, 1] like scaled Sentinel bands.
        """

        split = "validation"
        modality = "s2" if bands == 13 else "s1s2"
        class_names = tuple(DFC_CLASS_NAMES)
        class_colors = tuple(DFC_CLASS_COLORS)
        has_masks = True

        def __init__(self) -> None:
            super().__init__(transform=None, label_threshold=0.10, cache=False)
            self.ids = [f"procedural_{i:06d}" for i in range(tiles)]
            rng = np.random.default_rng(seed)
            self.means = rng.uniform(0.15, 0.85, (len(self.class_names), bands)).astype(np.float32)  # (K, C)
            self.bank = (0.05 * rng.standard_normal((BANK, bands, size, size))).astype(np.float32)

        def _restrict_files(self, indices: list[int]) -> None:
            pass

        def _image_files(self, i: int) -> list[Path]:
            return []  # nothing on disk: the store's fingerprints are empty and it stays fresh

        def source_path(self, i: int) -> Path:
            return Path(f"<procedural tile {i}>")

        def mask_path(self, i: int) -> Path:
            return self.source_path(i)

        def _read_mask(self, i: int) -> np.ndarray:
            rng = np.random.default_rng([seed, i])
            classes = rng.integers(0, len(self.class_names), REGIONS)
            cut_y, cut_x = rng.integers(size // 4, 3 * size // 4, 2)
            mask = np.empty((size, size), dtype=np.uint8)
            mask[:cut_y, :cut_x], mask[:cut_y, cut_x:] = classes[0], classes[1]
            mask[cut_y:, :cut_x], mask[cut_y:, cut_x:] = classes[2], classes[3]
            return mask  # (H, W)

        def _read_image(self, i: int) -> np.ndarray:
            mask = self._read_mask(i)
            noise = np.roll(self.bank[i % BANK], shift=(i // BANK) % size, axis=1)  # (C, H, W)
            return np.clip(self.means.T[:, mask] + noise, 0.0, 1.0)  # (C, H, W) float32

    return ProceduralTiles()


def write_store(reader: Any, path: Path, dtype: str, sample_seconds: float) -> dict[str, Any]:
    from weakseg.data.tile_store import prepare_store

    last = [0.0]

    def progress(done: int, total: int, written: int, skipped: int, seconds: float) -> None:
        if seconds - last[0] >= 30 or done == total:
            last[0] = seconds
            m = memory()
            print(f"   write: {done}/{total} tiles, {done / max(seconds, 1e-9):.0f} tiles/s, RssAnon "
                  f"{m.get('RssAnon', 0):.0f} MB, RssFile {m.get('RssFile', 0):.0f} MB", flush=True)

    with MemorySampler(sample_seconds) as mem:
        result = prepare_store(reader, path, kind="procedural", root=path.parent, dtype=dtype, progress=progress,
                               progress_seconds=5.0)
    start = mem.trace[0][1]
    return {"status": result.status, "written": result.written, "seconds": result.seconds,
            "tiles_per_s": result.written / max(result.seconds, 1e-9), "disk_bytes": result.bytes_on_disk,
            "rss_anon_start_mb": start.get("RssAnon", 0.0), "rss_anon_peak_mb": mem.peak("RssAnon"),
            "rss_file_peak_mb": mem.peak("RssFile"), "vm_rss_peak_mb": mem.peak("VmRSS")}


def build_step(bands: int, imgsize: int, device: torch.device) -> tuple[Any, torch.optim.Optimizer, Any]:
    """``weakseg train``'s default classifier (TrainConfig defaults) for ``bands`` channels, its optimiser, cfg."""
    from weakseg.pipeline.train import TrainConfig
    from weakseg.tasks.classification import ClassificationTask

    cfg = TrainConfig(imgsize=[imgsize, imgsize])
    model = dict(img_size=imgsize, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                 num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, in_chans=bands, num_classes=8)
    task = ClassificationTask(model, prune=cfg.prune, lr=cfg.learning_rate, lr_scheduler=False)
    task.to(device).train()
    return task, task.configure_optimizers(), cfg


def train_step(task: Any, optimizer: torch.optim.Optimizer, batch: dict[str, Any], device: torch.device) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = task.training_step({"image": batch["image"].to(device), "label": batch["label"].to(device)}, 0)
    loss.backward()
    optimizer.step()


def epoch(reader: Any, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One shuffled epoch of samples + steps, and the pure step time on one in-memory batch (same process)."""
    from weakseg.data.datamodule import build_transform

    reader.transform = build_transform("train", (args.imgsize, args.imgsize),
                                       {"normalization": "none", "augmentations": ["fliprot"], "train_view": "crop"})
    task, optimizer, _ = build_step(args.bands, args.imgsize, device)
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(reader, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=generator,
                        num_workers=args.num_workers, persistent_workers=False)
    batches = len(loader)
    if args.epoch_batches:
        batches = min(batches, args.epoch_batches)
    warnings.filterwarnings("ignore", message=".*self.trainer.*")  # the task logs; no Trainer here
    torch.manual_seed(args.seed)
    first = next(iter(DataLoader(reader, batch_size=args.batch_size)))
    for _ in range(3):  # warm-up: thread pool, optimiser states
        train_step(task, optimizer, first, device)

    def pure_steps(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            train_step(task, optimizer, first, device)
        return (time.perf_counter() - t0) / n

    pure_before = pure_steps(args.pure_steps)
    marks = {round(batches * f) for f in (0.25, 0.5, 0.75)}
    at: dict[str, dict[str, float]] = {"0%": memory()}
    waiting = stepping = 0.0
    with MemorySampler(args.sample_seconds) as mem:
        t0 = time.perf_counter()
        t_wait = t0
        for b, batch in enumerate(loader):
            t_got = time.perf_counter()
            waiting += t_got - t_wait
            train_step(task, optimizer, batch, device)
            t_wait = time.perf_counter()
            stepping += t_wait - t_got
            if b + 1 in marks:
                at[f"{100 * (b + 1) // batches}%"] = memory()
            if b + 1 >= batches:
                break
        wall = time.perf_counter() - t0
    at["100%"] = memory()
    pure_after = pure_steps(args.pure_steps)
    pure = statistics.mean([pure_before, pure_after])
    return {"batches": batches, "tiles": batches * args.batch_size, "wall_s": wall, "waiting_s": waiting,
            "stepping_s": stepping, "pure_step_s": pure, "pure_step_s_before_after": [pure_before, pure_after],
            "epoch_over_pure_steps": wall / (batches * pure), "images_per_s": batches * args.batch_size / wall,
            "memory_at": at, "rss_anon_peak_mb": mem.peak("RssAnon"), "rss_file_peak_mb": mem.peak("RssFile"),
            "num_workers": args.num_workers, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=20000, help="tiles in the synthetic split")
    parser.add_argument("--bands", type=int, default=15, help="bands per tile (15 = S2 + S1, 13 = S2)")
    parser.add_argument("--size", type=int, default=256, help="tile side (DFC2020: 256)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="store dtype")
    parser.add_argument("--imgsize", type=int, default=64, help="training crop (weakseg train's default: 64)")
    parser.add_argument("--batch_size", type=int, default=16, help="training batch (weakseg train's default: 16)")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers of the epoch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the machine's)")
    parser.add_argument("--epoch_batches", type=int, default=0, help="stop the epoch after this many batches (0: all)")
    parser.add_argument("--pure_steps", type=int, default=20, help="steps timed on one in-memory batch, before "
                                                                   "and after the epoch")
    parser.add_argument("--sample_seconds", type=float, default=0.5, help="memory sampling interval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where the store goes (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    parser.add_argument("--reuse", action="store_true", help="read the store already in --workdir, do not rewrite")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the steps run")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also save the numbers as JSON")
    args = parser.parse_args(argv)
    if args.tiles < args.batch_size:
        parser.error(f"--tiles ({args.tiles}) must be at least --batch_size ({args.batch_size})")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="weakseg_store_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "store"
    itemsize = 2 if args.dtype == "float16" else 4
    need = args.tiles * args.size * args.size * (args.bands * itemsize + 1)  # images + uint8 masks
    float32_dict = args.tiles * args.bands * args.size * args.size * 4
    free = shutil.disk_usage(work).free
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if not args.reuse and need > free * 0.95:
        parser.error(f"--workdir {work}: the store needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    print(f"{args.tiles} tiles of {args.bands} x {args.size} x {args.size}: store {need / 1e9:.1f} GB "
          f"({args.dtype}) in {path}; as float32 dicts {float32_dict / 1e9:.1f} GB against {ram / 1e9:.1f} GB of "
          f"RAM; {torch.get_num_threads()} thread(s), {args.num_workers} DataLoader worker(s)", flush=True)

    from weakseg.data.tile_store import TileStore

    reader = make_reader(args.tiles, args.bands, args.size, args.seed)
    result: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "store_bytes_expected": need, "float32_dict_bytes": float32_dict, "ram_bytes": ram}
    try:
        if not (args.reuse and TileStore.exists(path)):
            result["write"] = w = write_store(reader, path, args.dtype, args.sample_seconds)
            print(f"write: {w['written']} tiles in {w['seconds']:.0f}s ({w['tiles_per_s']:.0f} tiles/s), "
                  f"{w['disk_bytes'] / 1e9:.1f} GB on disk; RssAnon {w['rss_anon_start_mb']:.0f} MB at start, "
                  f"peak {w['rss_anon_peak_mb']:.0f} MB; RssFile peak {w['rss_file_peak_mb']:.0f} MB", flush=True)
        store = TileStore.open(path)
        reader.attach_store(store)
        e = result["epoch"] = epoch(reader, args, device)
        print(f"epoch: {e['batches']} batches ({e['tiles']} tiles) in {e['wall_s']:.0f}s, "
              f"{e['images_per_s']:.0f} images/s; waiting for data {e['waiting_s']:.1f}s, steps {e['stepping_s']:.1f}s")
        verdict = "ok" if e["epoch_over_pure_steps"] <= 1.1 else "ABOVE TARGET"
        print(f"epoch / (batches x pure step {1000 * e['pure_step_s']:.1f} ms) = {e['epoch_over_pure_steps']:.3f} "
              f"(target <= 1.10) {verdict}")
        print("memory during the epoch (MB):")
        for mark, m in e["memory_at"].items():
            print(f"   {mark:>4}: RssAnon {m.get('RssAnon', 0):7.0f}  RssFile {m.get('RssFile', 0):7.0f}  "
                  f"VmRSS {m.get('VmRSS', 0):7.0f}")
        anon = [m.get("RssAnon", 0.0) for m in e["memory_at"].values()]
        print(f"   private memory (RssAnon) growth over the epoch: {anon[-1] - anon[0]:+.0f} MB; peak "
              f"{e['rss_anon_peak_mb']:.0f} MB")
    finally:
        if not args.keep and not args.reuse:
            shutil.rmtree(path, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.json)
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
