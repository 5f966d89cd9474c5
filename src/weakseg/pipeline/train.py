"""Stage 1 of every pipeline: train a (gated) ViT classifier on image-level labels, as ``weakseg train`` does.

:func:`train` is the whole run: data module, model of the chosen architecture (:mod:`weakseg.models.architectures`),
Lightning trainer, checkpoints, ``metrics.csv``, ``config.yaml`` and ``summary.json``. The command
(:mod:`weakseg.commands.train`) only resolves the settings.

**Which checkpoint.** By default the classifier trains on the training split without its holdout
(``validation:train`` for DFC2020, ``all:train`` for a folder dataset) and ``best.ckpt`` is the epoch with the best
macro F1 of the image labels of the holdout (``validation:holdout``; :mod:`weakseg.data.splits`). No mask and no
tile of a reported split takes part in the choice. ``summary.json`` describes that checkpoint (epoch, score, heads
pruned), so every number reported next to its pseudomasks belongs to one checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weakseg.config import save_resolved
from weakseg.errors import ConfigError
from weakseg.io import atomic_write_json

log = logging.getLogger("weakseg")

DEFAULT_SYNTHETIC_DIR = Path("weakseg_data/synthetic_dfc2020")
#: Default training / validation splits per dataset kind: the training split without / with only its holdout.
DEFAULT_SPLITS = {"dfc2020": ("validation:train", "validation:holdout"), "folder": ("all:train", "all:holdout")}


@dataclass
class TrainConfig:
    """Every setting of a training run (the YAML keys and the flag names are the same).

    ``train_split`` / ``val_split`` None take :data:`DEFAULT_SPLITS` of the dataset kind (the training split
    without and with only its holdout). ``num_register_tokens``, ``class_token_head`` and ``token_mask_rate``
    None take the architecture's defaults (:mod:`weakseg.models.architectures`).
    """

    datadir: str | None = None
    dataset: str = "dfc2020"
    output_dir: str = "runs/train"
    train_split: str | None = None
    val_split: str | None = None
    arch: str = "vit"
    multimodal: bool = False
    fusion: str = "sum"
    imgsize: list[int] = field(default_factory=lambda: [64, 64])
    patch_size: int = 8
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 6
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    num_register_tokens: int | None = None
    class_token_head: str | None = None
    final_norm: bool = True
    token_mask_rate: float | None = None
    diversity_weight: float = 0.0
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
    from weakseg.models.architectures import get_architecture
    from weakseg.models.vit import ViTConfig
    from weakseg.pipeline.progress import EpochLog, show_progress_bar
    from weakseg.tasks.classification import ClassificationTask

    datadir = ensure_data(cfg)
    arch = get_architecture(cfg.arch)
    train_split, val_split = resolve_splits(cfg)
    out = Path(cfg.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    modality = "s1s2" if cfg.multimodal else "s2"
    dm = WeakSegDataModule(
        datadir, dataset=cfg.dataset, modality=modality, img_size=cfg.imgsize, train_split=train_split,
        val_split=val_split, batch_size=cfg.train_batch_size, eval_batch_size=cfg.eval_batch_size,
        num_workers=cfg.num_workers, normalization=cfg.normalization, augmentations=cfg.augmentations,
        label_threshold=cfg.label_threshold, cache=cfg.cache_data or not cfg.datadir,
    )
    dm.prepare_stats()
    reader = dm.open(train_split, "val")
    if val_split is not None:
        overlap = set(reader.ids) & set(dm.open(val_split, "val").ids)
        if overlap:
            raise ConfigError(
                f"--val_split {val_split!r} shares {len(overlap)} tile(s) with --train_split {train_split!r} (e.g. "
                f"{sorted(overlap)[0]!r}): checkpoint selection would see training tiles. Use '<split>:train' and "
                "'<split>:holdout' (the default) or two different splits"
            )
    in_chans = int(reader.read_image(0).shape[0])
    num_classes = len(reader.class_names)
    model_cfg = ViTConfig(
        img_size=tuple(cfg.imgsize), patch_size=cfg.patch_size, in_chans=in_chans,
        s1_chans=2 if cfg.multimodal else 0, fusion=cfg.fusion, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, num_classes=num_classes,
        final_norm=cfg.final_norm, gated=cfg.prune, gate_init=cfg.gate_init,
        **arch.model_fields(num_classes, cfg.class_token_head, cfg.num_register_tokens),
    )
    token_mask_rate = (arch.default_token_mask_rate(cfg.class_token_head) if cfg.token_mask_rate is None
                       else cfg.token_mask_rate)
    task = ClassificationTask(
        model=model_cfg.to_dict(), prune=cfg.prune, pr_rate=cfg.pr_rate, l0_normalize=cfg.l0_normalize,
        l0_warmup_steps=cfg.l0_warmup_steps, optimizer=cfg.optimizer, lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay, gate_lr_scale=cfg.gate_lr_scale, lr_scheduler=cfg.lr_scheduler,
        warmup_epochs=cfg.warmup_epochs, class_names=list(reader.class_names), data_config=dm.data_config,
        pretrained=cfg.pretrained, token_mask_rate=token_mask_rate, diversity_weight=cfg.diversity_weight,
        arch=arch.name,
    )
    n_params = sum(p.numel() for p in task.model.parameters())
    h, w = model_cfg.grid_size
    log.info(
        "train (%s): %d tiles in %r, checkpoint chosen on %r | %d channels, %d classes | ViT %d blocks x %d heads "
        "(%s gated), dim %d, %d tokens/image (%d prefix), %s head, token masking %.2f, %.2fM params | "
        "effective batch %d x %d x %d device(s) = %d",
        arch.name, len(reader), train_split, val_split, in_chans, model_cfg.num_classes, cfg.depth, cfg.num_heads,
        "all" if cfg.prune else "none", cfg.embed_dim, h * w + model_cfg.num_prefix_tokens,
        model_cfg.num_prefix_tokens, model_cfg.head_type, token_mask_rate, n_params / 1e6,
        cfg.train_batch_size, cfg.accumulate_grad, cfg.num_devices,
        cfg.train_batch_size * cfg.accumulate_grad * cfg.num_devices,
    )
    monitor = "val_macro_f1" if val_split else "train_macro_f1"
    best = ModelCheckpoint(
        dirpath=out / "checkpoints", filename="best", monitor=monitor, mode="max", save_last=True,
        auto_insert_metric_name=False, enable_version_counter=False,
    )
    best.CHECKPOINT_NAME_LAST = "last"
    callbacks: list[Any] = [best, EpochLog(f"{arch.name} classifier", ("train_loss", "val_loss", "val_macro_f1"))]
    loggers: list[Any] = [CSVLogger(save_dir=str(out), name="", version="")]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

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
        enable_progress_bar=show_progress_bar(),
    )
    if trainer.is_global_zero:
        save_resolved(cfg, out, model=model_cfg.to_dict(), data=dm.data_config, datadir=str(datadir),
                      splits={"train": train_split, "val": val_split})
    ckpt_path = out / "checkpoints" / "last.ckpt"
    if cfg.resume and not ckpt_path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
    t0 = time.time()
    trainer.fit(task, datamodule=dm, ckpt_path=str(ckpt_path) if cfg.resume else None)
    elapsed = time.time() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    summary = {
        "output_dir": str(out),
        "arch": arch.name,
        "train_split": train_split,
        "val_split": val_split,
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
        "best": describe_checkpoint(best.best_model_path) if best.best_model_path else None,
    }
    if trainer.is_global_zero:
        atomic_write_json(out / "summary.json", summary)
        print_summary(summary)
    return summary


def resolve_splits(cfg: TrainConfig) -> tuple[str, str | None]:
    """(train split, validation split or None) with the dataset kind's defaults filled in."""
    if cfg.dataset not in DEFAULT_SPLITS:
        raise ConfigError(f"unknown dataset {cfg.dataset!r} (--dataset); choose from {sorted(DEFAULT_SPLITS)}")
    default_train, default_val = DEFAULT_SPLITS[cfg.dataset]
    train_split = cfg.train_split or default_train
    if cfg.val_split is None:
        # The holdout of the training split, unless the user trains on a split that is not a ':train' part.
        val_split = default_val if cfg.train_split is None else (
            f"{train_split.split(':')[0]}:holdout" if train_split.endswith(":train") else None)
    else:
        val_split = None if cfg.val_split in ("none", "None", "") else cfg.val_split
    return train_split, val_split


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """What one checkpoint is: its epoch, the monitored validation score and its pruned heads.

    Read from the file itself, so a table row that reports masks made from it reports its own classifier.
    """
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    score = None
    for key, state in (ckpt.get("callbacks") or {}).items():
        if key.startswith("ModelCheckpoint") and state.get("current_score") is not None:
            score = float(state["current_score"])
    log_alpha = [v.flatten() for k, v in ckpt["state_dict"].items() if k.endswith("log_alpha")]
    hp = ckpt.get("hyper_parameters", {})
    model = hp.get("model", {})
    total = int(model.get("depth", 0)) * int(model.get("num_heads", 0))
    pruned = [int((a <= 0).sum()) for a in log_alpha]
    return {
        "path": str(path), "epoch": int(ckpt.get("epoch", -1)), "val_score": score,
        "arch": hp.get("arch"), "pruned_heads": sum(pruned), "num_heads_total": total,
        "pruned_heads_per_layer": pruned,
    }


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
    best = s.get("best")
    if best:
        print(f"  best checkpoint  {s['best_checkpoint']}: epoch {best['epoch']}, {s['monitor']} = "
              f"{best['val_score']:.3f} on {s['val_split'] or s['train_split']!r}, heads pruned "
              f"{best['pruned_heads']}/{best['num_heads_total']}")
    print(f"  metrics          {s['metrics_csv']}")


