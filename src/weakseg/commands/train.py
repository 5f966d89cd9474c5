"""``weakseg train``: stage 1, the (gated) ViT on image-level labels.

Accepts the sparse-vit-wsss README command as written::

    weakseg train --prune --train_batch_size 2 --accumulate_grad 4 --optimizer adamw --lr_scheduler \\
        --learning_rate 0.001 --depth 12 --patch_size 14 --imgsize 224 224

Settings resolve as defaults (a small ViT that trains on a CPU) < ``--preset`` < ``--config FILE.yaml`` <
flags. Without ``--datadir`` the built-in synthetic Sentinel-1/2 data is generated (once) and used.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weakseg.config import explicit_args, load_yaml, resolve, save_resolved
from weakseg.errors import ConfigError
from weakseg.io import atomic_write_json

log = logging.getLogger("weakseg")

DEFAULT_SYNTHETIC_DIR = Path("weakseg_data/synthetic_dfc2020")


@dataclass
class TrainConfig:
    """Every setting of a training run (the YAML keys and the flag names are the same)."""

    datadir: str | None = None
    dataset: str = "dfc2020"
    output_dir: str = "runs/train"
    train_split: str = "validation"
    val_split: str | None = "test"
    multimodal: bool = False
    fusion: str = "sum"
    imgsize: list[int] = field(default_factory=lambda: [64, 64])
    patch_size: int = 8
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 6
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    num_cls_tokens: int = 1
    num_register_tokens: int = 0
    prune: bool = False
    pr_rate: float = 0.2
    l0_normalize: bool = False
    l0_warmup_steps: int = 0
    gate_lr_scale: float = 1.0
    gate_init: float | None = None
    optimizer: str = "adamw"
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    lr_scheduler: bool = True
    warmup_epochs: float = 1.0
    train_batch_size: int = 16
    eval_batch_size: int | None = None
    accumulate_grad: int = 1
    num_epochs: int = 10
    max_steps: int = -1
    num_devices: int = 1
    accelerator: str = "auto"
    precision: str = "32-true"
    num_workers: int = 0
    normalization: str = "standardize"
    augmentations: list[str] = field(default_factory=lambda: ["fliprot"])
    label_threshold: float = 0.10
    pretrained: str | None = None
    seed: int = 42
    resume: bool = False
    synthetic_tiles: list[int] = field(default_factory=lambda: [256, 64])
    synthetic_tile_size: int = 64
    cache_data: bool = False


PRESETS: dict[str, dict[str, Any]] = {
    # The defaults: a small ViT on 64x64 built-in tiles that trains in about a minute on 2 CPU cores. Per-band
    # standardisation and lr 2e-3 (measured on the built-in data: val macro F1 0.61 after 12 epochs, against 0.28
    # with unstandardised [0, 1] reflectances and lr 1e-3).
    "cpu": {},
    # The sparse ViT paper's configuration (sparse_vit.md 1 and 2): ViT-L-like width, 224 crops of 256 tiles,
    # patch 14, 12 x 16 gated heads, lambda 0.2 summed penalty, AdamW 1e-3, batch 2 x 4, 20 epochs, per-image
    # max normalisation and the affine augmentation. Needs the real DFC2020 and a GPU.
    "paper": {
        "imgsize": [224, 224], "patch_size": 14, "embed_dim": 1024, "depth": 12, "num_heads": 16,
        "mlp_ratio": 2.0, "qkv_bias": False, "prune": True, "pr_rate": 0.2, "optimizer": "adamw",
        "learning_rate": 1e-3, "weight_decay": 0.01, "train_batch_size": 2, "accumulate_grad": 4,
        "num_epochs": 20, "normalization": "per_image_max", "augmentations": ["affine"], "lr_scheduler": False,
    },
}


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the (gated) ViT on image-level labels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    add_train_arguments(p)
    p.set_defaults(run=run)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    bool_flag = argparse.BooleanOptionalAction
    p.add_argument("--config", help="YAML file of settings (keys as the flags without dashes)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset: cpu (default) or paper")
    g = p.add_argument_group("data")
    g.add_argument("--datadir", help="dataset root; default: built-in synthetic data in weakseg_data/")
    g.add_argument("--dataset", choices=["dfc2020", "folder"], help="reader (default dfc2020)")
    g.add_argument("--train_split", help="split to train on (DFC2020: validation)")
    g.add_argument("--val_split", help="split to validate on (DFC2020: test); 'none' to skip")
    g.add_argument("--multimodal", action=bool_flag, help="Sentinel-1 + Sentinel-2 (early fusion)")
    g.add_argument("--fusion", choices=["sum", "concat"], help="multimodal fusion: sum of two patch embeddings (paper) or 15-channel concat")
    g.add_argument("--imgsize", type=int, nargs="+", help="model input H [W]; tiles are randomly cropped to it")
    g.add_argument("--normalization", choices=["none", "per_image_max", "standardize"])
    g.add_argument("--augmentations", nargs="*", help="fliprot and/or affine (joint on S1, S2 and mask)")
    g.add_argument("--num_workers", type=int)
    g.add_argument("--cache_data", action=bool_flag, help="keep tiles in memory (default on for built-in data)")
    g = p.add_argument_group("model")
    g.add_argument("--patch_size", type=int)
    g.add_argument("--embed_dim", type=int)
    g.add_argument("--depth", type=int)
    g.add_argument("--num_heads", type=int)
    g.add_argument("--mlp_ratio", type=float)
    g.add_argument("--pretrained", help="local timm/DeiT/DINO ViT checkpoint to start from")
    g = p.add_argument_group("pruning")
    g.add_argument("--prune", action=bool_flag, help="Hard Concrete gate per head + L0 penalty")
    g.add_argument("--pr_rate", type=float, help="lambda, the L0 weight (paper 0.2)")
    g.add_argument("--l0_normalize", action=bool_flag, help="divide the L0 penalty by the number of heads (ours)")
    g.add_argument("--l0_warmup_steps", type=int, help="ramp lambda from 0 over N steps (ours)")
    g.add_argument("--gate_lr_scale", type=float, help="learning-rate multiplier of the gates (ours; paper 1)")
    g.add_argument("--gate_init", type=float, help="initial log alpha of every gate (ours; paper: Xavier-uniform)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=["adamw", "adam", "sgd"])
    g.add_argument("--learning_rate", type=float)
    g.add_argument("--weight_decay", type=float)
    g.add_argument("--lr_scheduler", action=bool_flag, help="cosine schedule with linear warm-up")
    g.add_argument("--warmup_epochs", type=float)
    g.add_argument("--train_batch_size", type=int)
    g.add_argument("--accumulate_grad", type=int)
    g.add_argument("--num_epochs", type=int)
    g.add_argument("--max_steps", type=int, help="stop after N optimiser steps (-1: num_epochs decides)")
    g.add_argument("--num_devices", type=int, help="devices; >1 trains with DDP")
    g.add_argument("--accelerator", help="auto, cpu, gpu")
    g.add_argument("--precision", help="32-true, bf16-mixed, 16-mixed")
    g.add_argument("--seed", type=int)
    g.add_argument("--output_dir", help="where checkpoints, metrics.csv and config.yaml go")
    g.add_argument("--resume", action=bool_flag, help="continue from output_dir/checkpoints/last.ckpt")


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    flags = explicit_args(args, exclude=("config", "preset"))
    if flags.get("val_split") in ("none", "None", ""):
        flags["val_split"] = None
    preset = PRESETS[getattr(args, "preset", None) or "cpu"]
    yaml_layer = load_yaml(args.config) if getattr(args, "config", None) else {}
    if "preset" in yaml_layer:
        preset = PRESETS[yaml_layer.pop("preset")]
    cfg = resolve(TrainConfig, preset, yaml_layer, flags, source_names=["preset", str(getattr(args, "config", "")), "flags"])
    if len(cfg.imgsize) == 1:
        cfg.imgsize = [cfg.imgsize[0], cfg.imgsize[0]]
    if len(cfg.imgsize) != 2:
        raise ConfigError(f"--imgsize takes one or two integers, got {cfg.imgsize}")
    return cfg


def ensure_data(cfg: TrainConfig) -> Path:
    """The dataset root; generates the built-in synthetic data when no --datadir is given."""
    if cfg.datadir:
        return Path(cfg.datadir)
    from weakseg.data.synthetic import generate_synthetic_dfc2020

    root = DEFAULT_SYNTHETIC_DIR
    summary = generate_synthetic_dfc2020(
        root,
        num_tiles={"validation": cfg.synthetic_tiles[0], "test": cfg.synthetic_tiles[1]},
        tile_size=cfg.synthetic_tile_size,
        seed=0,
    )
    log.info("built-in synthetic data: %s (%s)", root, summary.get("num_tiles", ""))
    return root


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training; returns the summary (also written to output_dir/summary.json)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from weakseg.data.datamodule import WeakSegDataModule
    from weakseg.models.vit import ViTConfig
    from weakseg.tasks.classification import ClassificationTask

    datadir = ensure_data(cfg)
    out = Path(cfg.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    modality = "s1s2" if cfg.multimodal else "s2"
    dm = WeakSegDataModule(
        datadir, dataset=cfg.dataset, modality=modality, img_size=cfg.imgsize, train_split=cfg.train_split,
        val_split=cfg.val_split, batch_size=cfg.train_batch_size, eval_batch_size=cfg.eval_batch_size,
        num_workers=cfg.num_workers, normalization=cfg.normalization, augmentations=cfg.augmentations,
        label_threshold=cfg.label_threshold, cache=cfg.cache_data or not cfg.datadir,
    )
    dm.prepare_stats()
    reader = dm.open(cfg.train_split, "val")
    in_chans = int(reader.read_image(0).shape[0])
    model_cfg = ViTConfig(
        img_size=tuple(cfg.imgsize), patch_size=cfg.patch_size, in_chans=in_chans,
        s1_chans=2 if cfg.multimodal else 0, fusion=cfg.fusion, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        num_classes=len(reader.class_names), num_cls_tokens=cfg.num_cls_tokens,
        num_register_tokens=cfg.num_register_tokens, gated=cfg.prune, gate_init=cfg.gate_init,
    )
    task = ClassificationTask(
        model=model_cfg.to_dict(), prune=cfg.prune, pr_rate=cfg.pr_rate, l0_normalize=cfg.l0_normalize,
        l0_warmup_steps=cfg.l0_warmup_steps, optimizer=cfg.optimizer, lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay, gate_lr_scale=cfg.gate_lr_scale, lr_scheduler=cfg.lr_scheduler, warmup_epochs=cfg.warmup_epochs,
        class_names=list(reader.class_names), data_config=dm.data_config, pretrained=cfg.pretrained,
    )
    n_params = sum(p.numel() for p in task.model.parameters())
    h, w = model_cfg.grid_size
    log.info(
        "train: %d tiles in %r, %d channels, %d classes | ViT %d blocks x %d heads (%s gated), dim %d, "
        "%d tokens/image, %.2fM params | effective batch %d x %d x %d device(s) = %d",
        len(reader), cfg.train_split, in_chans, model_cfg.num_classes, cfg.depth, cfg.num_heads,
        "all" if cfg.prune else "none", cfg.embed_dim, h * w + model_cfg.num_prefix_tokens, n_params / 1e6,
        cfg.train_batch_size, cfg.accumulate_grad, cfg.num_devices,
        cfg.train_batch_size * cfg.accumulate_grad * cfg.num_devices,
    )
    monitor = "val_macro_f1" if cfg.val_split else "train_macro_f1"
    best = ModelCheckpoint(
        dirpath=out / "checkpoints", filename="best", monitor=monitor, mode="max", save_last=True,
        auto_insert_metric_name=False, enable_version_counter=False,
    )
    best.CHECKPOINT_NAME_LAST = "last"
    callbacks: list[Any] = [best]
    loggers: list[Any] = [CSVLogger(save_dir=str(out), name="", version="")]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(save_dir=str(out), name="tensorboard", version=""))
    except ImportError:
        pass
    if cfg.lr_scheduler:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.precision.startswith("bf16") and not torch.cuda.is_available():
        log.warning("--precision %s on CPU: torch's CPU bf16 attention backward is several times slower than "
                    "fp32 (benchmarks/train_step.py --bf16); prefer 32-true here", cfg.precision)
    strategy = "ddp" if cfg.num_devices > 1 else "auto"
    trainer = L.Trainer(
        max_epochs=cfg.num_epochs, max_steps=cfg.max_steps, accelerator=cfg.accelerator,
        devices=cfg.num_devices, strategy=strategy, precision=cfg.precision,
        accumulate_grad_batches=cfg.accumulate_grad, callbacks=callbacks, logger=loggers,
        log_every_n_steps=1, deterministic=False, enable_model_summary=False,
    )
    if trainer.is_global_zero:
        save_resolved(cfg, out, model=model_cfg.to_dict(), data=dm.data_config, datadir=str(datadir))
    ckpt_path = out / "checkpoints" / "last.ckpt"
    if cfg.resume and not ckpt_path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
    t0 = time.time()
    trainer.fit(task, datamodule=dm, ckpt_path=str(ckpt_path) if cfg.resume else None)
    elapsed = time.time() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    summary = {
        "output_dir": str(out),
        "best_checkpoint": best.best_model_path,
        "last_checkpoint": str(ckpt_path),
        "metrics_csv": str(out / "metrics.csv"),
        "best_score": float(best.best_model_score) if best.best_model_score is not None else None,
        "monitor": monitor,
        "seconds": round(elapsed, 1),
        "pruned_fraction": task.model.pruned_fraction(),
        "pruned_heads_per_layer": task.model.pruned_heads_per_layer(),
        "num_heads_total": cfg.depth * cfg.num_heads,
        "final_metrics": metrics,
    }
    if trainer.is_global_zero:
        atomic_write_json(out / "summary.json", summary)
        print_summary(summary)
    return summary


def print_summary(s: dict[str, Any]) -> None:
    m = s["final_metrics"]
    print(f"\ntraining finished in {s['seconds']:.0f}s")
    for key in ("val_macro_f1", "val_map", "val_hamming_acc", "train_macro_f1"):
        if key in m:
            print(f"  {key:<16} {m[key]:.3f}")
    print(
        f"  heads pruned     {round(s['pruned_fraction'] * s['num_heads_total'])}/{s['num_heads_total']} "
        f"({100 * s['pruned_fraction']:.0f}%), per layer {s['pruned_heads_per_layer']}"
    )
    print(f"  best checkpoint  {s['best_checkpoint']}  ({s['monitor']} = {s['best_score']})")
    print(f"  metrics          {s['metrics_csv']}")


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    train(cfg)
    return 0
