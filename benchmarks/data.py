"""Benchmark: does the data pipeline keep up with the training step? Tiles/s of every stage against step images/s.

Why (issue 12, "the data pipeline is never the bottleneck"): a training epoch is the steps plus whatever part of
the data loading the steps do not hide. With ``num_workers 0`` (``weakseg train``'s default below 8 CPUs) loading
and the step run one after the other, so the epoch takes ``1 + step_rate / data_rate`` times the steps alone;
with workers the loading overlaps the steps, if there is a free core for each worker. This measures, in one
process and on the same tiles (and on the same batches for the step):

- (a) ``read_image`` + ``read_mask`` of every tile from the GeoTIFF files (``tile_store.py``'s read pass);
- (b) the same from the memory-mapped float16 tile store (``weakseg prepare``, :mod:`weakseg.data.tile_store`),
  written into the work folder and read with a warm page cache;
- (c) full training samples, ``TileDataset.__getitem__`` with the training transform of ``weakseg train``
  (:func:`weakseg.data.datamodule.build_transform`: random crop to the model input, the default augmentation
  ``fliprot``, ``standardize`` with band statistics of the split; labels of the crop), from the files and from
  the store;
- (d) the same through a torch ``DataLoader`` as the data module builds it (batch ``--batch_size``, shuffled,
  ``drop_last``, persistent workers; collate included) with ``num_workers`` 0, 1 and 2, from both sources;
- (e) the training step's consumption: images/s of full optimisation steps (forward, the task's loss, backward,
  AdamW; :meth:`ClassificationTask.training_step` as ``benchmarks/train_step.py`` times it) of the default
  ``weakseg train`` classifier (:class:`~weakseg.pipeline.train.TrainConfig` defaults: ViT 64 x 64 / 8, dim 96,
  depth 4, 6 heads, no pruning) on the batches of one epoch of (d) (at most 32, collated beforehand and kept in
  memory), with ``--threads`` torch threads;
- (f) the check of the prediction: images/s of whole epochs of DataLoader + step, for each loader of (d).

The table gives per source tiles/s, the headroom (data tiles/s / step images/s: > 1 means the data keeps up), the
predicted epoch / step time ratio (``1 + step/data`` for stages that run in the training process, ``max(1,
step/data)`` for workers, which overlap the step) and, for (f), the measured one. Every figure is the median over
``--repeats`` passes; the measurements are interleaved, in an order that rotates every repeat, so drift and other
processes fall on all of them alike. DataLoader workers use one torch thread each (torch's default), the training
process ``--threads``: on 2 cores, 1 thread and 1 worker is the split that does not oversubscribe them.
Each DataLoader epoch starts with a reset of its persistent workers (tens of ms), so epochs of a few batches
understate what workers deliver: use ``--tiles`` of a few hundred or more (the real DFC2020 split has 986). Tiles
larger than the model input (256 x 256 DFC2020 tiles, 64 x 64 crops) are decoded whole and cropped, so their
data rate falls with the tile area while the step's does not, except from the store, which reads only the
crop's window. The in-memory cache (``--cache_data``, the default on the built-in data: float32 tiles in a
per-process dict, filled before the timings) is the third source of (c), (d) and (f).

The data is the built-in synthetic generator (13 S2 bands; ``--modality s1s2`` adds the 2 S1 bands and trains the
multimodal ViT) at each ``--sizes`` with ``--tiles`` tiles, generated into ``--workdir`` (a temporary folder by
default, removed afterwards), or an existing dataset (``--datadir``, e.g. the real DFC2020). Run on a quiet
machine::

    OMP_NUM_THREADS=1 python benchmarks/data.py                          # 200 tiles at 64 x 64 and 256 x 256
    OMP_NUM_THREADS=1 python benchmarks/data.py --tiles 400 --repeats 2  # the README numbers (5 min)
    OMP_NUM_THREADS=1 python benchmarks/data.py --tiles 40 --sizes 64 256 --repeats 2   # quicker
    python benchmarks/data.py --datadir /data/DFC2020 --split validation --json data.json
    python benchmarks/data.py --device cuda --threads 8                  # the step on a GPU: data must keep up
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tile_store import datasets, read_pass, sample_pass
from torch import Tensor
from torch.utils.data import DataLoader

#: Distinct in-memory batches the step (e) goes through (an epoch's worth when it has fewer; 32 x 3.4 MB by default).
MAX_STEP_BATCHES = 32
#: ``num_workers`` of the DataLoader rows (d) and (f).
WORKERS = (0, 1, 2)


@dataclass
class Measure:
    """One row of the table: a callable that runs one pass and returns (seconds, tiles), and its passes."""

    stage: str
    source: str
    run: Callable[[], tuple[float, int]]
    workers: int | None = None  # DataLoader rows: num_workers (None: in the training process, no loader)
    seconds: list[float] = field(default_factory=list)
    tiles: list[int] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.stage} | {self.source}"

    def rates(self) -> list[float]:
        return [n / s for n, s in zip(self.tiles, self.seconds, strict=True)]

    def rate(self) -> float:
        """Median tiles/s (images/s for the step) over the passes."""
        return statistics.median(self.rates())


# ---- what weakseg train builds ---------------------------------------------------------------------------------
def train_config(args: argparse.Namespace) -> Any:
    """``weakseg train``'s defaults, with this benchmark's batch size and modality."""
    from weakseg.pipeline.train import TrainConfig

    return TrainConfig(train_batch_size=args.batch_size, multimodal=args.modality == "s1s2")


def train_transform(cfg: Any, kind: str, root: Path, split: str, modality: str) -> Any:
    """The training sample transform (random crop, augmentations, normalisation) as the data module builds it.

    The data module screens the split once (every tile decoded) and computes the ``standardize`` band statistics
    on it, as ``weakseg train`` does before its first epoch.
    """
    from weakseg.data.datamodule import WeakSegDataModule, build_transform

    dm = WeakSegDataModule(root, dataset=kind, modality=modality, img_size=cfg.imgsize, train_split=split,
                           val_split=None, batch_size=cfg.train_batch_size, normalization=cfg.normalization,
                           augmentations=cfg.augmentations, label_threshold=cfg.label_threshold)
    dm.prepare_stats()
    return build_transform("train", dm.img_size, dm.data_config)


def build_task(cfg: Any, reader: Any, device: torch.device) -> tuple[Any, torch.optim.Optimizer]:
    """The classifier of ``weakseg train`` (src/weakseg/pipeline/train.py) and its AdamW, on ``device``.

    The learning-rate schedule is left out (it needs a Lightning trainer; one multiply per step).
    """
    from weakseg.models.architectures import get_architecture
    from weakseg.pipeline.train import build_classifier_task

    task = build_classifier_task(cfg, get_architecture(cfg.arch), int(reader.read_image(0).shape[0]),
                                 list(reader.class_names), lr_scheduler=False)
    task.to(device).train()
    return task, task.configure_optimizers()  # the optimiser after .to(device): its states live there


def make_loader(reader: Any, batch_size: int, workers: int, seed: int) -> DataLoader:
    """The training DataLoader of :meth:`WeakSegDataModule.train_dataloader`, seeded."""
    return DataLoader(reader, batch_size=batch_size, shuffle=True, num_workers=workers,
                      drop_last=len(reader) > batch_size, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))


# ---- passes ----------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(task: Any, optimizer: torch.optim.Optimizer, batch: dict[str, Any], device: torch.device) -> Tensor:
    """One training step of ``weakseg train``: the task's loss (BCE, metrics update), backward, AdamW."""
    batch = {"image": batch["image"].to(device), "label": batch["label"].to(device)}  # (B, C, h, w), (B, K)
    optimizer.zero_grad(set_to_none=True)
    loss = task.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    return loss.detach()


def step_pass(task: Any, optimizer: torch.optim.Optimizer, batches: list[dict[str, Any]], steps: int,
              device: torch.device) -> tuple[float, int]:
    """(seconds, images) of ``steps`` steps cycling through ``batches`` (already collated, in memory)."""
    synchronize(device)
    t0 = time.perf_counter()
    images = 0
    for k in range(steps):
        batch = batches[k % len(batches)]
        loss = step(task, optimizer, batch, device)
        images += batch["image"].shape[0]
    synchronize(device)
    seconds = time.perf_counter() - t0
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite training loss {float(loss)}")
    return seconds, images


def loader_pass(loader: Iterable[dict[str, Any]]) -> tuple[float, int]:
    """(seconds, tiles) of one epoch of batches (the image tensor is touched, then dropped)."""
    t0 = time.perf_counter()
    tiles = 0
    for batch in loader:
        tiles += batch["image"].shape[0]  # (B, C, h, w)
    return time.perf_counter() - t0, tiles


def train_pass(loader: Iterable[dict[str, Any]], task: Any, optimizer: torch.optim.Optimizer,
               device: torch.device) -> tuple[float, int]:
    """(seconds, images) of one epoch of DataLoader + training step: what an epoch of ``weakseg train`` costs."""
    synchronize(device)
    t0 = time.perf_counter()
    images = 0
    for batch in loader:
        step(task, optimizer, batch, device)
        images += batch["image"].shape[0]
    synchronize(device)
    return time.perf_counter() - t0, images


def timed(fn: Callable[[Any], float], reader: Any) -> Callable[[], tuple[float, int]]:
    """A (seconds, tiles) pass from one of ``tile_store.py``'s passes, which return seconds over the split."""
    return lambda: (fn(reader), len(reader))


# ---- one dataset ------------------------------------------------------------------------------------------------
def bench(kind: str, root: Path, split: str, args: argparse.Namespace, work: Path, device: torch.device
          ) -> dict[str, Any]:
    from weakseg.data import open_dataset
    from weakseg.data.datamodule import WeakSegDataModule  # noqa: F401 - imported (lightning) before the timings
    from weakseg.data.tile_store import prepare_store

    cfg = train_config(args)
    modality = args.modality
    files = open_dataset(kind, root, split, modality=modality, store=False)
    first = files.read_image(0)  # (C, H, W) float32
    store_path = work / f"{root.name}-{split}-{modality}-float16"
    t0 = time.perf_counter()
    prepared = prepare_store(files, store_path, kind=kind, root=root, dtype="float16", progress=lambda *a: None)
    prepare_s = time.perf_counter() - t0
    store = open_dataset(kind, root, split, modality=modality, store=store_path)
    read_pass(store)  # maps every page once (the store was just written: warm page cache)
    t0 = time.perf_counter()
    transform = train_transform(cfg, kind, root, split, modality)
    screen_s = time.perf_counter() - t0
    # (c), (d), (f) read through their own readers, with the training transform.
    samples = {"files": open_dataset(kind, root, split, modality=modality, store=False),
               "store float16": open_dataset(kind, root, split, modality=modality, store=store_path),
               "memory cache": open_dataset(kind, root, split, modality=modality, store=False, cache=True)}
    read_pass(samples["memory cache"])  # fills the float32 dict (--cache_data) before the workers fork
    for reader in samples.values():
        reader.transform = transform
    torch.manual_seed(args.seed)
    task, optimizer = build_task(cfg, files, device)
    params = sum(p.numel() for p in task.model.parameters())
    print(f"\n== {root} split {split!r}, {modality}: {len(files)} tiles of {tuple(first.shape)} "
          f"({first.nbytes * len(files) / 1e6:.0f} MB as float32); float16 store written in {prepare_s:.1f}s "
          f"({prepared.written} tiles), data module screening + band statistics {screen_s:.1f}s")
    print(f"   model input {cfg.imgsize[0]}x{cfg.imgsize[1]}, transform {transform!r}, batch {args.batch_size}, "
          f"{cfg.arch} classifier (dim {cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, "
          f"{params / 1e6:.2f} M parameters, prune {cfg.prune}) on {device}, {torch.get_num_threads()} thread(s); "
          f"weakseg train's default num_workers here: {cfg.num_workers}")

    loaders = {(source, w): make_loader(reader, args.batch_size, w, args.seed)
               for source, reader in samples.items() for w in WORKERS}
    # Real batches for the step: an epoch's worth (at most MAX_STEP_BATCHES), each stepped once per pass, so (e)
    # is the steps of an epoch without its loading.
    batches = list(itertools.islice(loaders[("store float16", 0)], MAX_STEP_BATCHES))
    steps = max(args.steps, len(loaders[("store float16", 0)]))
    measures = [Measure("(a) read_image+read_mask", "files", timed(read_pass, files)),
                Measure("(b) read_image+read_mask", "store float16", timed(read_pass, store))]
    measures += [Measure("(c) training sample", source, timed(sample_pass, reader))
                 for source, reader in samples.items()]
    measures += [Measure(f"(d) DataLoader, {w} worker{'s' * (w != 1)}", source, lambda ld=ld: loader_pass(ld), w)
                 for (source, w), ld in loaders.items()]
    measures.append(Measure("(e) training step", f"{len(batches)} batch{'es' * (len(batches) != 1)} in memory",
                            lambda: step_pass(task, optimizer, batches, steps, device)))
    measures += [Measure(f"(f) DataLoader, {w} worker{'s' * (w != 1)} + step", source,
                         lambda ld=ld: train_pass(ld, task, optimizer, device), w)
                 for (source, w), ld in loaders.items()]

    warnings.filterwarnings("ignore", message=".*self.trainer.*")  # the task logs; there is no Trainer here
    t0 = time.perf_counter()
    for m in measures:  # warm-up: starts the persistent workers, the thread pools, the optimiser states
        m.run()
    for r in range(args.repeats):
        for m in measures[r % len(measures):] + measures[: r % len(measures)]:
            seconds, tiles = m.run()
            m.seconds.append(seconds)
            m.tiles.append(tiles)
    elapsed = time.perf_counter() - t0
    for ld in loaders.values():
        ld._iterator = None  # noqa: SLF001 - stops the persistent workers now, not at exit
    result = print_table(measures, args)
    epoch = next(m for m in measures if m.workers is not None).tiles[0]
    print(f"   {args.repeats} repeat(s) after a warm-up pass in {elapsed:.0f}s; (e): {steps} step(s) per pass; "
          f"(d) and (f): {epoch} tiles per epoch (drop_last)")
    return {"root": str(root), "split": split, "modality": modality, "tiles": len(files),
            "tile_shape": list(first.shape), "model_input": list(cfg.imgsize), "batch_size": args.batch_size,
            "device": str(device), "threads": torch.get_num_threads(), "parameters": params,
            "prepare_seconds": prepare_s, "steps_per_pass": steps, **result}


def print_table(measures: list[Measure], args: argparse.Namespace) -> dict[str, Any]:
    """The table (source, tiles/s, headroom, predicted and measured epoch / step time); returns the numbers."""
    step_rate = next(m for m in measures if m.stage.startswith("(e)")).rate()
    loader_rate = {(m.source, m.workers): m.rate() for m in measures if m.stage.startswith("(d)")}
    print(f"   {'stage':<33} {'source':<22} {'tiles/s':>9} {'min':>8} {'max':>8} {'headroom':>9} "
          f"{'epoch/step':>11} {'measured':>9}")
    rows = {}
    for m in measures:
        rate, rates = m.rate(), m.rates()
        row: dict[str, Any] = {"stage": m.stage, "source": m.source, "workers": m.workers, "seconds": m.seconds,
                               "tiles": m.tiles, "tiles_per_s": rate}
        headroom = predicted = measured = ""
        if m.stage.startswith("(e)"):
            headroom = "(images/s)"
        elif m.stage.startswith("(f)"):
            data = loader_rate[(m.source, m.workers)]
            row["predicted_epoch_over_step"] = serial_or_overlapped(step_rate, data, m.workers)
            row["measured_epoch_over_step"] = step_rate / rate
            predicted = f"{row['predicted_epoch_over_step']:11.2f}"
            measured = f"{row['measured_epoch_over_step']:9.2f}"
        else:
            row["headroom"] = rate / step_rate
            row["predicted_epoch_over_step"] = serial_or_overlapped(step_rate, rate, m.workers)
            headroom = f"{row['headroom']:9.2f}"
            predicted = f"{row['predicted_epoch_over_step']:11.2f}"
        print(f"   {m.stage:<33} {m.source:<22} {rate:9.0f} {min(rates):8.0f} {max(rates):8.0f} {headroom:>9} "
              f"{predicted:>11} {measured:>9}")
        rows[m.key] = row
    print("   headroom = data tiles/s / step images/s (> 1: the data keeps up); epoch/step = predicted epoch time / "
          "time of its steps alone:\n   1 + step/data in the training process (a-c, 0 workers), max(1, step/data) "
          "with workers (overlapped, given a free core each); measured = step images/s / (f) images/s")
    return {"step_images_per_s": step_rate, "rows": rows}


def serial_or_overlapped(step_rate: float, data_rate: float, workers: int | None) -> float:
    """Predicted epoch / steps time: loading adds to the step in-process, overlaps it in workers."""
    return max(1.0, step_rate / data_rate) if workers else 1.0 + step_rate / data_rate


# ---- main -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=200, help="tiles to generate per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="tile sides to generate")
    parser.add_argument("--modality", choices=("s2", "s1s2"), default="s2")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=16,
                        help="training batch (weakseg train's default 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the step runs")
    parser.add_argument("--repeats", type=int, default=3, help="passes per figure (the median is printed)")
    parser.add_argument("--steps", type=int, default=5, help="at least this many steps per (e) pass "
                                                             "(default: one epoch's worth, at least 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, shuffling and augmentation")
    parser.add_argument("--workdir", type=Path, default=None, help="where data and stores go (default: a temp folder)")
    parser.add_argument("--datadir", type=Path, default=None, help="benchmark this dataset instead of generating")
    parser.add_argument("--dataset", default="dfc2020", help="with --datadir: dfc2020, folder or voc")
    parser.add_argument("--split", default="validation", help="with --datadir: the (whole) split to read")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also save the numbers as JSON")
    args = parser.parse_args(argv)
    for name in ("tiles", "batch_size", "threads", "repeats", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.datadir is None and args.tiles < args.batch_size:
        parser.error(f"--tiles {args.tiles} is less than one batch (--batch_size {args.batch_size})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build or machine has no CUDA device")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    work = Path(tempfile.mkdtemp(prefix="weakseg_data_bench_", dir=args.workdir))
    print(f"data pipeline benchmark: {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.2f}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, torch {torch.__version__} "
          f"({args.threads} thread(s)), numpy {np.__version__}, python {sys.version.split()[0]}, work folder {work}")
    results = []
    try:
        for kind, root, split in datasets(args, work):
            results.append(bench(kind, root, split, args, work, device))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "cpus": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__,
                "datasets": results}
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
