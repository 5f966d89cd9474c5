"""Self-supervised pretraining of the ViT backbone with Barlow Twins, as ``weakseg pretrain`` runs it.

Tiles of any reader (DFC2020, a folder dataset, VOC, or a folder of unlabelled images: ``dataset="images"``) are
read without their labels; every tile is read once at start-up and one that cannot be used is skipped with its
reason (``skipped_tiles.csv``; no readable tile at all is an error naming the folder). Views and loss:
:mod:`weakseg.data.ssl_views`, :mod:`weakseg.tasks.pretraining`.

Outputs (``output_dir``)::

    backbone.pth                     the backbone's state dict in timm's layout: weakseg train --pretrained FILE
    checkpoints/last.ckpt            every epoch (backbone + projector + optimiser): --resume continues from it
    metrics.csv                      train_loss (per step and epoch), train_diag_mean, train_offdiag_rms, lr
    figures/cross_correlation_epochNNN.png   the mean C of the epoch's batches, every figures_every epochs
    config.yaml                      the resolved settings, the backbone's ViTConfig and the data settings
    skipped_tiles.csv, summary.json

The backbone's size settings are those of ``weakseg train`` (the defaults are its ``cpu`` preset), so the
classifier trained from ``backbone.pth`` with the same flags gets every tensor.
"""

from __future__ import annotations

import logging
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weakseg.config import Check, at_least, non_empty, one_of, save_resolved
from weakseg.data.ssl_views import VIEW_MODES
from weakseg.errors import ConfigError
from weakseg.io import atomic_path, atomic_write_csv, atomic_write_json, folder_lock, make_dir, process_rank
from weakseg.pipeline.train import TRAIN_CHECKS, TrainConfig
from weakseg.runtime import default_num_workers

log = logging.getLogger("weakseg")

#: ``--dataset`` of pretraining: every reader of the other commands, and a plain folder of images.
PRETRAIN_DATASETS = ("dfc2020", "folder", "voc", "images")
#: The split pretrained on by default: the whole training split of the dataset (labels are not read, so its
#: holdout's images may take part; the reported test split never does).
DEFAULT_PRETRAIN_SPLITS = {"dfc2020": "validation", "folder": "all", "voc": "train", "images": "all"}


@dataclass
class PretrainConfig:
    """Settings of one Barlow Twins pretraining (``weakseg pretrain``).

    Attributes:
        datadir: dataset root (None: the built-in synthetic data, generated once).
        dataset: ``dfc2020``, ``folder``, ``voc`` or ``images`` (a folder of images, nothing else).
        split: the split read (default :data:`DEFAULT_PRETRAIN_SPLITS`); ``images`` reads every image.
        multimodal: DFC2020 Sentinel-1 + Sentinel-2 tiles. views: ``augment`` or ``cross_modal`` (S2 vs S1 of a
            tile; needs ``multimodal`` and the summed fusion).
        fusion: the multimodal patch embedding (``sum`` = separate S2 and S1 embeddings, required by cross-modal).
        imgsize, patch_size, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the backbone (as ``weakseg train``).
        normalization: of the tiles (``standardize``: band statistics of the pretraining tiles).
        projector_dim, projector_layers: the projector. lambd: off-diagonal weight (None: 5e-3 x 512 / P).
        crop_scale: area range of the random resized crops.
        batch_size: the loss batch per device (C comes from it). accumulate_grad: optimiser steps every N
            batches (does not enlarge the loss batch).
        epochs, learning_rate, weight_decay, warmup_epochs: AdamW, linear warm-up then cosine per step.
        figures_every: a C heatmap every N epochs (and at the end); 0 none.
    """

    datadir: str | None = None
    dataset: str = "dfc2020"
    split: str | None = None
    output_dir: str = "runs/pretrain"
    multimodal: bool = False
    views: str = "augment"
    # the backbone and the tiles' normalisation default to weakseg train's (its cpu preset), so a classifier
    # trained from backbone.pth with the same flags gets every tensor
    fusion: str = TrainConfig.fusion
    imgsize: list[int] = field(default_factory=lambda: list(TrainConfig().imgsize))
    patch_size: int = TrainConfig.patch_size
    embed_dim: int = TrainConfig.embed_dim
    depth: int = TrainConfig.depth
    num_heads: int = TrainConfig.num_heads
    mlp_ratio: float = TrainConfig.mlp_ratio
    qkv_bias: bool = TrainConfig.qkv_bias
    normalization: str = TrainConfig.normalization
    projector_dim: int = 512
    projector_layers: int = 3
    lambd: float | None = None
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    batch_size: int = 64
    accumulate_grad: int = 1
    epochs: int = 100
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    warmup_epochs: float = 10.0
    num_workers: int = field(default_factory=default_num_workers)  # from the machine (weakseg.runtime)
    seed: int = 0
    accelerator: str = "auto"
    num_devices: int = 1
    num_nodes: int = 1
    precision: str = "32-true"
    figures_every: int = 10
    resume: bool = False


def _crop_scale(value: list[float]) -> str | None:
    if len(value) != 2 or not 0 < value[0] <= value[1] <= 1:
        return "must be two numbers 0 < low <= high <= 1"
    return None


PRETRAIN_CHECKS: dict[str, Check | list[Check]] = {
    "dataset": one_of(PRETRAIN_DATASETS),
    "split": non_empty,
    "output_dir": non_empty,
    "views": one_of(VIEW_MODES),
    # the backbone and data settings share weakseg train's checks
    **{key: TRAIN_CHECKS[key] for key in ("fusion", "imgsize", "patch_size", "embed_dim", "depth", "num_heads",
                                          "mlp_ratio", "normalization", "learning_rate", "weight_decay",
                                          "warmup_epochs", "num_workers", "seed", "num_devices", "num_nodes", "accumulate_grad",
                                          "accelerator", "precision")},
    "projector_dim": at_least(2),
    "projector_layers": at_least(1),
    "lambd": at_least(0),
    "crop_scale": _crop_scale,
    "batch_size": at_least(2, "Barlow Twins standardises over the batch"),
    "epochs": at_least(1),
    "figures_every": at_least(0),
}


def open_pretrain_reader(cfg: PretrainConfig, datadir: Path) -> Any:
    """The reader of the tiles to pretrain on (labels never read)."""
    if cfg.dataset == "images":
        if cfg.multimodal:
            raise ConfigError("--multimodal reads DFC2020's separate S1 and S2 files; a folder of images is read "
                              "with all its bands (--dataset images)")
        from weakseg.data.unlabelled import UnlabelledImageFolder

        return UnlabelledImageFolder(datadir)
    from weakseg.data import open_dataset

    split = cfg.split or DEFAULT_PRETRAIN_SPLITS[cfg.dataset]
    return open_dataset(cfg.dataset, datadir, split, modality="s1s2" if cfg.multimodal else "s2")


def check_pretrain_config(cfg: PretrainConfig) -> PretrainConfig:
    """Settings that only make sense together."""
    if len(cfg.imgsize) == 1:
        cfg.imgsize = [cfg.imgsize[0], cfg.imgsize[0]]
    if cfg.views == "cross_modal":
        if not cfg.multimodal:
            raise ConfigError("--views cross_modal pairs the Sentinel-1 and Sentinel-2 bands of each tile: add "
                              "--multimodal")
        if cfg.fusion != "sum":
            raise ConfigError("--views cross_modal embeds S2 and S1 through their own patch embeddings: it needs "
                              "--fusion sum (not concat)")
    if cfg.embed_dim % cfg.num_heads:
        raise ConfigError(f"--embed_dim {cfg.embed_dim} is not divisible by --num_heads {cfg.num_heads}")
    return cfg


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run one pretraining; returns the summary (also ``output_dir/summary.json``). Holds a lock on the folder."""
    cfg = check_pretrain_config(cfg)
    with ExitStack() as stack:
        if process_rank() == 0:
            make_dir(Path(cfg.output_dir), "output folder (--output_dir)")
            stack.enter_context(folder_lock(Path(cfg.output_dir), "weakseg pretrain"))
        return _pretrain(cfg)


def _pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from torch.utils.data import DataLoader

    from weakseg.data.normalization import BandStats, Normalize
    from weakseg.data.ssl_views import TwoViewDataset
    from weakseg.data.unlabelled import check_readable
    from weakseg.models.barlow_twins import default_lambda
    from weakseg.models.vit import ViTConfig
    from weakseg.pipeline.progress import EpochLog, csv_logger, show_progress_bar
    from weakseg.pipeline.train import (
        TrainConfig,
        atomic_checkpoint_io,
        ensure_data,
        restore_metrics,
        rows_before_checkpoint,
    )
    from weakseg.tasks.classification import read_checkpoint
    from weakseg.tasks.pretraining import BarlowTwinsTask, CrossCorrelationLog

    started = time.time()
    out = Path(cfg.output_dir)
    ckpt_path = out / "checkpoints" / "last.ckpt"
    resume_from = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = read_checkpoint(ckpt_path, "--resume", mmap=True)
        resume_from = {"epoch": ckpt.get("epoch", -1), "global_step": ckpt.get("global_step", 0)}
        del ckpt
    datadir = Path(cfg.datadir) if cfg.datadir else ensure_data(TrainConfig())
    reader = open_pretrain_reader(cfg, datadir)
    root = Path(getattr(reader, "root", datadir))
    stats = BandStats() if cfg.normalization == "standardize" else None
    t0 = time.time()
    usable, skipped = check_readable(reader, root, stats)
    for tile, path, reason in skipped[:20]:
        log.warning("warning: tile %s (%s) is skipped: %s", tile, path, reason)
    reader.restrict(usable)
    log.info("read %d tile(s) in %.1fs: %d usable, %d skipped", len(usable) + len(skipped), time.time() - t0,
             len(usable), len(skipped))
    first = reader.read_image(0)
    in_chans, (H, W) = int(first.shape[0]), first.shape[-2:]
    if H < cfg.imgsize[0] or W < cfg.imgsize[1]:
        log.info("tiles of %dx%d are smaller than --imgsize %s: the resized crops upsample them", H, W, cfg.imgsize)
    band_stats = stats.result() if stats is not None else None
    data_config = {"dataset": cfg.dataset, "modality": "s1s2" if cfg.multimodal else "s2",
                   "normalization": cfg.normalization, "band_stats": band_stats}
    s1_chans = 2 if cfg.multimodal else 0
    if cfg.views == "cross_modal" and in_chans <= s1_chans:
        raise ConfigError(f"tiles of {root} have {in_chans} bands: no S2 bands besides S1")
    model_cfg = ViTConfig(img_size=tuple(cfg.imgsize), patch_size=cfg.patch_size, in_chans=in_chans,
                          s1_chans=s1_chans, fusion=cfg.fusion, embed_dim=cfg.embed_dim, depth=cfg.depth,
                          num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, num_classes=1,
                          gated=False, final_norm=True)
    lambd = default_lambda(cfg.projector_dim) if cfg.lambd is None else float(cfg.lambd)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dataset = TwoViewDataset(reader, cfg.views, cfg.imgsize, Normalize(cfg.normalization, *(band_stats or (None, None))),
                             s1_chans=s1_chans, crop_scale=cfg.crop_scale)
    if len(dataset) < cfg.batch_size:
        log.warning("warning: %d tiles are fewer than --batch_size %d: the loss batch is %d", len(dataset),
                    cfg.batch_size, len(dataset))
    batch = min(cfg.batch_size, len(dataset))
    if batch < 2:
        raise ConfigError(f"{len(dataset)} usable tile: Barlow Twins needs at least 2 per batch")
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=cfg.num_workers,
                        persistent_workers=cfg.num_workers > 0)
    task = BarlowTwinsTask(model=model_cfg.to_dict(), views=cfg.views, projector_dim=cfg.projector_dim,
                           projector_layers=cfg.projector_layers, lambd=lambd, lr=cfg.learning_rate,
                           weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs, data_config=data_config)
    n_params = sum(p.numel() for p in task.backbone.parameters())
    log.info("pretrain (Barlow Twins, %s views): %d tiles, %d channels | ViT %d blocks x %d heads, dim %d, "
             "%.2fM params | projector %d x %d, lambda %.3g", cfg.views, len(dataset), in_chans, cfg.depth,
             cfg.num_heads, cfg.embed_dim, n_params / 1e6, cfg.projector_layers, cfg.projector_dim, lambd)
    log.info("Barlow Twins loss batch: %d tiles per device (C and the standardisation come from it)%s%s", batch,
             f"; --accumulate_grad {cfg.accumulate_grad} makes each optimiser step see {batch * cfg.accumulate_grad}"
             " tiles but does NOT enlarge the loss batch" if cfg.accumulate_grad > 1 else "",
             f"; {cfg.num_devices} devices each compute C on their own batch" if cfg.num_devices > 1 else "")
    if batch < 64:
        log.warning("warning: a loss batch of %d makes C noisy; the reference uses 64-256 or more (--batch_size)",
                    batch)
    last = ModelCheckpoint(dirpath=out / "checkpoints", filename="last", monitor=None, save_top_k=1,
                           every_n_epochs=1, auto_insert_metric_name=False, enable_version_counter=False)
    correlation = CrossCorrelationLog(out, cfg.figures_every or 1, enabled=cfg.figures_every > 0)
    callbacks: list[Any] = [last, correlation, EpochLog("pretrain", ("train_loss_epoch", "train_diag_mean",
                                                                     "train_offdiag_rms")),
                            LearningRateMonitor(logging_interval="step")]
    metrics_csv = out / "metrics.csv"
    kept = rows_before_checkpoint(metrics_csv, resume_from) if resume_from is not None else None
    metrics_logger = csv_logger(out)
    trainer = L.Trainer(max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.num_devices,
                        num_nodes=cfg.num_nodes, strategy="ddp" if cfg.num_devices * cfg.num_nodes > 1 else "auto",
                        precision=cfg.precision,
                        accumulate_grad_batches=cfg.accumulate_grad, callbacks=callbacks, logger=[metrics_logger],
                        log_every_n_steps=1, enable_model_summary=False, enable_progress_bar=show_progress_bar(),
                        plugins=[atomic_checkpoint_io()], limit_val_batches=0)
    if trainer.is_global_zero:
        save_resolved(cfg, out, model=model_cfg.to_dict(), data=data_config, datadir=str(datadir),
                      lambd_used=lambd, loss_batch=batch)
        write_skipped(out / "skipped_tiles.csv", skipped)
    if kept is not None and trainer.is_global_zero:
        restore_metrics(metrics_logger, metrics_csv, *kept)
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
        warnings.filterwarnings("ignore", message=r".*You defined a `validation_step`.*")
        trainer.fit(task, train_dataloaders=loader, ckpt_path=str(ckpt_path) if cfg.resume else None)
    elapsed = time.time() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    summary = {"output_dir": str(out), "backbone": str(out / "backbone.pth"), "last_checkpoint": str(ckpt_path),
               "views": cfg.views, "tiles": len(dataset), "loss_batch": batch, "lambd": lambd,
               "epochs": cfg.epochs, "seconds": round(elapsed, 1),
               "tiles_per_second": round(len(dataset) * cfg.epochs / max(elapsed, 1e-9), 1),
               "final_metrics": metrics, "figures": [str(p) for p in correlation.written],
               "skipped_tiles": {"count": len(skipped), "file": "skipped_tiles.csv"}}
    if trainer.is_global_zero:
        with atomic_path(out / "backbone.pth") as tmp:
            torch.save(task.backbone_state_dict(), tmp)
        summary["seconds_with_setup"] = round(time.time() - started, 1)
        atomic_write_json(out / "summary.json", summary)
        print(f"pretrained {len(dataset)} tiles x {cfg.epochs} epochs in {elapsed:.0f}s "
              f"({summary['tiles_per_second']} tiles/s): loss {metrics.get('train_loss_epoch', float('nan')):.2f}, "
              f"mean diag(C) {metrics.get('train_diag_mean', float('nan')):.3f}, off-diagonal RMS "
              f"{metrics.get('train_offdiag_rms', float('nan')):.3f}\nbackbone: {out / 'backbone.pth'} "
              f"(weakseg train --pretrained {out / 'backbone.pth'})")
    return summary


def write_skipped(path: Path, skipped: list[tuple[str, str, str]]) -> None:
    """``skipped_tiles.csv``: id, file, reason per skipped tile (a header alone when none)."""
    atomic_write_csv(path, ["id", "file", "reason"], skipped)
