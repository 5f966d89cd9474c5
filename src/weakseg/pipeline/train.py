"""Stage 1 of every pipeline: train a (gated) ViT classifier on image-level labels, as ``weakseg train`` does.

:func:`train` is the whole run: data module, model of the chosen architecture (:mod:`weakseg.models.architectures`),
Lightning trainer, checkpoints, ``metrics.csv``, ``config.yaml`` and ``summary.json``. The command
(:mod:`weakseg.commands.train`) only resolves the settings.

**Which checkpoint.** By default the classifier trains on the training split without its holdout
(``validation:train`` for DFC2020, ``all:train`` for a folder dataset) and ``best.ckpt`` is the epoch with the best
macro F1 of the image labels of the holdout (``validation:holdout``; :mod:`weakseg.data.splits`). No mask and no
tile of a reported split takes part in the choice. ``summary.json`` describes that checkpoint (epoch, score, heads
pruned), so every number reported next to its pseudomasks belongs to one checkpoint.

**Settings** are checked before anything is read (:data:`TRAIN_CHECKS`, applied by :func:`weakseg.config.resolve`
for the command and by :func:`validate_train_config` for callers that build a :class:`TrainConfig` in code), and so
are the tiles' files (:meth:`weakseg.data.datamodule.WeakSegDataModule.check_tiles`: every file of every tile
exists and has the expected bands and size), so a mistake ends the run at start-up, not at batch N of epoch M.

**last.ckpt and --resume.** ``checkpoints/last.ckpt`` is written at the end of *every* epoch by its own checkpoint
callback (Lightning's ``save_last=True`` on the best-checkpoint callback only wrote it together with a new best, so
``--resume`` went back to the best epoch). Checkpoints are written atomically (:func:`atomic_checkpoint_io`): a run
killed while saving keeps the previous complete ``last.ckpt``. ``--resume`` continues from it and keeps
``metrics.csv``: Lightning's CSV logger starts a new file, so the rows logged up to the checkpoint are read first
and written back before the resumed run appends its own (:func:`rows_before_checkpoint`); rows of an epoch the
kill interrupted after the checkpoint are dropped, because the resumed run logs that epoch again. Every epoch then
appears exactly once.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from contextlib import ExitStack
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weakseg.config import (
    Check,
    at_least,
    between,
    each,
    length,
    non_empty,
    one_of,
    positive,
    save_resolved,
    validate,
)
from weakseg.errors import ConfigError, WeaksegError
from weakseg.io import atomic_path, atomic_write_json, folder_lock, make_dir, process_rank
from weakseg.pipeline.run_figures import write_train_figures
from weakseg.runtime import default_num_workers

log = logging.getLogger("weakseg")

DEFAULT_SYNTHETIC_DIR = Path("weakseg_data/synthetic_dfc2020")
#: Default training / validation splits per dataset kind: the training split without / with only its holdout.
DEFAULT_SPLITS = {"dfc2020": ("validation:train", "validation:holdout"), "folder": ("all:train", "all:holdout"),
                  "voc": ("train:train", "train:holdout")}
#: Pruning defaults (README "Pruning"; ``benchmarks/pruning.py``). With ``--prune`` half of the heads are pruned,
#: the ones whose gates the task lowered most, ramped in over the first half of the run, whatever its length. The
#: gates start open at log alpha 3 (a head is dropped in 5 % of the training steps, sigmoid(-3)), all alike, so no
#: head is pruned by its initial value (the paper's Xavier init starts about half of them at log alpha <= 0).
DEFAULT_TARGET_PRUNED_FRACTION = 0.5
OPEN_GATE_INIT = 3.0
#: lambda of the paper's plain L0 penalty (``--target_pruned_fraction none``) when ``--pr_rate`` is not given.
PAPER_PR_RATE = 0.2


@dataclass
class TrainConfig:
    """Every setting of a training run (the YAML keys and the flag names are the same).

    ``train_split`` / ``val_split`` None take :data:`DEFAULT_SPLITS` of the dataset kind (the training split
    without and with only its holdout). ``num_register_tokens``, ``class_token_head`` and ``token_mask_rate``
    None take the architecture's defaults (:mod:`weakseg.models.architectures`), and so does ``final_norm``
    None (on, except for ``weaktr``, whose heads read the tokens before the final norm). ``aaf``,
    ``aaf_reduction``, ``aaf_pool`` and ``cam_fusion`` configure ``--arch weaktr`` (:mod:`weakseg.models.weaktr`);
the ``pcm_*`` settings configure ``--arch pcm`` (:mod:`weakseg.models.pcm`; ``pcm_head`` None: the architecture's default, linear).
``frozen_epochs``, ``trainable_blocks`` and ``frozen_lr`` are the two-stage schedule of any architecture
(:class:`~weakseg.tasks.classification.ClassificationTask`).

    Pruning (with ``prune``): ``target_pruned_fraction`` (ours) prunes that fraction of the heads, reached over the
    first ``target_warmup`` of the run; None uses the paper's ``pr_rate * L0`` instead (``pr_rate`` None = 0.2),
    with ``l0_normalize`` and ``l0_warmup_steps``, which a target refuses (:func:`check_pruning_settings`).
    ``gate_init`` None is the paper's Xavier-uniform init.
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
    final_norm: bool | None = None
    aaf: str = "v2"
    aaf_reduction: int | None = None
    aaf_pool: str = "max"
    cam_fusion: str = "fused"
    pcm_head: str | None = None
    pcm_lstm_hidden: int | None = None
    pcm_dropout: float = 0.2
    pcm_l2: float = 0.01
    pcm_et_weight: float = 1.0
    pcm_et_crop: float = 0.3
    frozen_epochs: int = 0
    trainable_blocks: int | None = None
    frozen_lr: float | None = None
    token_mask_rate: float | None = None
    diversity_weight: float = 0.0
    prune: bool = False
    target_pruned_fraction: float | None = DEFAULT_TARGET_PRUNED_FRACTION
    target_warmup: float = 0.5
    pr_rate: float | None = None
    l0_normalize: bool = False
    l0_warmup_steps: int = 0
    gate_lr_scale: float = 1.0
    gate_init: float | None = OPEN_GATE_INIT
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
    num_nodes: int = 1
    accelerator: str = "auto"
    precision: str = "32-true"
    num_workers: int = field(default_factory=default_num_workers)  # from the machine (weakseg.runtime)
    normalization: str = "standardize"
    augmentations: list[str] = field(default_factory=lambda: ["fliprot"])
    label_threshold: float = 0.10
    pretrained: str | None = None
    seed: int = 42
    resume: bool = False
    checkpoint_metric: str = "map"
    synthetic_tiles: list[int] = field(default_factory=lambda: [256, 64])
    synthetic_tile_size: int = 64
    cache_data: bool = False
    store: str | None = None
    figures: bool = True
    strict_data: bool = False


PRESETS: dict[str, dict[str, Any]] = {
    # The defaults: a small ViT on 64x64 built-in tiles that trains in about a minute on 2 CPU cores. Per-band
    # standardisation and lr 2e-3 (measured on the built-in data: val macro F1 0.61 after 12 epochs, against 0.28
    # with unstandardised [0, 1] reflectances and lr 1e-3).
    "cpu": {},
    # The sparse ViT paper's configuration (sparse_vit.md 1 and 2): ViT-L-like width, 224 crops of 256 tiles,
    # patch 14, 12 x 16 gated heads with Xavier-uniform log alpha and lambda 0.2 on the summed L0 penalty (no
    # target, no normalisation, no warm-up, gate lr = lr), AdamW 1e-3, batch 2 x 4, 20 epochs, per-image max
    # normalisation and the affine augmentation. Needs the real DFC2020 and a GPU. configs/paper.yaml holds the same.
    "paper": {
        "imgsize": [224, 224], "patch_size": 14, "embed_dim": 1024, "depth": 12, "num_heads": 16,
        "mlp_ratio": 2.0, "qkv_bias": False, "prune": True, "target_pruned_fraction": None, "gate_init": None,
        "pr_rate": 0.2, "l0_normalize": False, "l0_warmup_steps": 0, "gate_lr_scale": 1.0, "optimizer": "adamw",
        "learning_rate": 1e-3, "weight_decay": 0.01, "train_batch_size": 2, "accumulate_grad": 4,
        "num_epochs": 20, "normalization": "per_image_max", "augmentations": ["affine"], "lr_scheduler": False,
    },
}


#: Settings of one architecture only: given with another ``--arch`` (a value other than the default) they are an
#: error rather than silently ignored.
WEAKTR_SETTINGS = ("aaf", "aaf_reduction", "aaf_pool", "cam_fusion")
PCM_SETTINGS = ("pcm_head", "pcm_lstm_hidden", "pcm_dropout", "pcm_l2", "pcm_et_weight", "pcm_et_crop")


def _architectures() -> list[str]:
    from weakseg.models.architectures import ARCHITECTURES

    return sorted(ARCHITECTURES)


def _augmentations() -> list[str]:
    from weakseg.data.transforms import AUGMENTATIONS

    return sorted(AUGMENTATIONS)


def _normalizations() -> list[str]:
    from weakseg.data.normalization import NORMALIZATION_MODES

    return list(NORMALIZATION_MODES)


def _dataset_kinds() -> list[str]:
    from weakseg.data import DATASET_KINDS

    return list(DATASET_KINDS)


def precision_values() -> list[Any]:
    """What Lightning's Trainer accepts as ``precision`` (its own list, so a new Lightning adds its new modes)."""
    import typing

    try:
        from lightning.fabric.connector import _PRECISION_INPUT  # private: a later Lightning may move it
    except ImportError:
        return ["64-true", "32-true", "16-true", "16-mixed", "bf16-true", "bf16-mixed", "64", "32", "16", "bf16"]

    def flat(t: Any) -> list[Any]:
        args = typing.get_args(t)
        return [v for a in args for v in flat(a)] if args else [t]

    return [str(v) for v in flat(_PRECISION_INPUT)]


def accelerator_values() -> list[str]:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]


def split_name(value: str) -> str | None:
    """A split name that :func:`weakseg.data.splits.parse_split` accepts ('none' skips validation)."""
    from weakseg.data.splits import parse_split

    if value in ("none", "None", ""):
        return None
    try:
        parse_split(value)
    except WeaksegError as e:
        return str(e)
    return None


def max_steps_check(value: int) -> str | None:
    if value == -1 or value >= 1:
        return None
    return f"must be -1 (no limit: num_epochs decides) or at least 1, got {value}"


def target_fraction_check(value: float) -> str | None:
    """``target_pruned_fraction`` in [0, 1): pruning every head leaves the classifier nothing to attend with."""
    if 0 <= value < 1:
        return None
    return f"must be in [0, 1) (a fraction of the heads; 1 would prune all of them), got {value!r}"


#: ``checkpoint_metric`` -> (logged metric without its ``val_``/``train_`` prefix, better when "max" or "min").
#: mAP by default: threshold-free, so it tracks a classifier that ranks images better while its macro F1 at the
#: fixed 0.5 threshold stays flat (measured on real street scenes: F1 0.494 for 10 epochs while mAP rose 0.62 ->
#: 0.74, and the F1 criterion kept the untrained epoch 0).
CHECKPOINT_METRICS: dict[str, tuple[str, str]] = {"map": ("map", "max"), "loss": ("loss", "min"),
                                                  "macro_f1": ("macro_f1", "max")}


#: Range checks of every :class:`TrainConfig` setting (types come from the annotations; see :mod:`weakseg.config`).
#: ``num_epochs`` 0 is refused rather than given a meaning: Lightning would "finish" at once, without a checkpoint.
#: ``label_threshold`` 0 is refused too: a class covering 0 % of a crop would be a label, so every tile would carry
#: every label.
TRAIN_CHECKS: dict[str, Check | list[Check]] = {
    "dataset": one_of(_dataset_kinds),
    "output_dir": non_empty,
    "train_split": [non_empty, split_name],
    "val_split": split_name,
    "arch": one_of(_architectures),
    "fusion": one_of(["sum", "concat"]),
    "imgsize": [length(1, 2), each(at_least(1))],
    "patch_size": at_least(1),
    "embed_dim": at_least(1),
    "depth": at_least(1),
    "num_heads": at_least(1),
    "mlp_ratio": positive(),
    "num_register_tokens": at_least(0),
    "class_token_head": one_of(["per_class", "flatten", "mean"]),
    "aaf": one_of(["v2", "v1", "random"]),
    "aaf_reduction": at_least(1),
    "aaf_pool": one_of(["max", "avg"]),
    "cam_fusion": one_of(["fused", "coarse", "attention"]),
    "pcm_head": one_of(["linear", "bilstm"]),
    "pcm_lstm_hidden": at_least(1),
    "pcm_dropout": between(0, 1),
    "pcm_l2": at_least(0),
    "pcm_et_weight": at_least(0),
    "pcm_et_crop": between(0, 1),
    "frozen_epochs": at_least(0),
    "trainable_blocks": at_least(0),
    "frozen_lr": positive(),
    "token_mask_rate": between(0, 1),
    "diversity_weight": at_least(0),
    "target_pruned_fraction": target_fraction_check,
    "target_warmup": between(0, 1),
    "pr_rate": at_least(0),
    "l0_warmup_steps": at_least(0),
    "gate_lr_scale": positive(),
    "optimizer": one_of(["adamw", "adam", "sgd"]),
    "learning_rate": positive(),
    "weight_decay": at_least(0),
    "warmup_epochs": at_least(0),
    "train_batch_size": at_least(1),
    "eval_batch_size": at_least(1),
    "accumulate_grad": at_least(1),
    "num_epochs": at_least(1, "a run of 0 epochs trains nothing and writes no checkpoint"),
    "max_steps": max_steps_check,
    "num_devices": at_least(1),
    "num_nodes": at_least(1),
    "accelerator": one_of(accelerator_values),
    "precision": one_of(precision_values),
    "num_workers": at_least(0),
    "normalization": one_of(_normalizations),
    "augmentations": each(one_of(_augmentations)),
    "label_threshold": between(0, 1, low_open=True),
    "pretrained": non_empty,
    "seed": between(0, 2**32 - 1),
    "checkpoint_metric": one_of(list(CHECKPOINT_METRICS)),
    "synthetic_tiles": [length(2), each(at_least(1))],
    "synthetic_tile_size": at_least(1),
}


def square_imgsize(cfg: TrainConfig) -> TrainConfig:
    """``imgsize`` [n] -> [n, n] (the flag and the YAML key take one or two integers)."""
    if len(cfg.imgsize) == 1:
        return dataclasses.replace(cfg, imgsize=[cfg.imgsize[0], cfg.imgsize[0]])
    return cfg


def validate_train_config(cfg: TrainConfig, source: str = "TrainConfig") -> TrainConfig:
    """``cfg`` type- and range-checked (:data:`TRAIN_CHECKS`) with ``imgsize`` made square; for settings built in
    code (the demo, the benchmarks), which do not pass through :func:`weakseg.config.resolve`."""
    return check_pruning_settings(square_imgsize(validate(cfg, TRAIN_CHECKS, source=source)))


def check_pruning_settings(cfg: TrainConfig) -> TrainConfig:
    """``cfg``, unless it combines a target with a setting of the paper's L0 penalty, which the target replaces.

    Called by :func:`validate_train_config` and by the command's resolution (:mod:`weakseg.commands.train`).

    Raises:
        ConfigError: ``pr_rate``, ``l0_normalize`` or ``l0_warmup_steps`` given together with
            ``target_pruned_fraction`` (they would be ignored silently).
    """
    if not cfg.prune or cfg.target_pruned_fraction is None:
        return cfg
    given = [name for name, value, unset in (("pr_rate", cfg.pr_rate, None), ("l0_normalize", cfg.l0_normalize, False),
                                             ("l0_warmup_steps", cfg.l0_warmup_steps, 0)) if value != unset]
    if given:
        raise ConfigError(
            f"--{given[0]}: a setting of the paper's L0 penalty, which pruning to a target replaces "
            f"(--target_pruned_fraction {cfg.target_pruned_fraction:g}; {DEFAULT_TARGET_PRUNED_FRACTION:g} by default "
            "with --prune): add --target_pruned_fraction none to train with the L0 penalty, or unset it to prune to "
            "the target (" + ", ".join({"pr_rate": "--pr_rate none", "l0_normalize": "--no-l0_normalize",
                                        "l0_warmup_steps": "--l0_warmup_steps 0"}[g] for g in given) + ")"
        )
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


def build_classifier_task(cfg: TrainConfig, arch: Any, in_chans: int, class_names: list[str],
                          data_config: dict[str, Any] | None = None, lr_scheduler: bool = True
                          ) -> Any:
    """The classifier ``weakseg train`` trains for ``cfg``: the ViT of ``arch`` (an
    :class:`~weakseg.models.architectures.Architecture`) with its heads, in a :class:`ClassificationTask` with
    every loss and optimiser setting of ``cfg``. ``lr_scheduler=False`` leaves the schedule out (it needs a
    Lightning trainer; ``benchmarks/data.py`` steps the task by hand)."""
    from weakseg.models.vit import ViTConfig
    from weakseg.tasks.classification import ClassificationTask

    num_classes = len(class_names)
    arch_fields = arch.model_fields(num_classes, cfg.class_token_head, cfg.num_register_tokens)
    if arch.aaf is not None:  # WeakTr's heads (models/weaktr.py)
        arch_fields.update(aaf=cfg.aaf, aaf_reduction=cfg.aaf_reduction, aaf_pool=cfg.aaf_pool,
                           cam_fusion=cfg.cam_fusion)
    if arch.patch_classifier is not None:  # ViT-PCM's patch classifier (models/pcm.py)
        arch_fields.update(patch_classifier=cfg.pcm_head or arch.patch_classifier,
                           pcm_lstm_hidden=cfg.pcm_lstm_hidden, pcm_dropout=cfg.pcm_dropout)
    model_cfg = ViTConfig(
        img_size=tuple(cfg.imgsize), patch_size=cfg.patch_size, in_chans=in_chans,
        s1_chans=2 if cfg.multimodal else 0, fusion=cfg.fusion, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, num_classes=num_classes,
        final_norm=arch.final_norm if cfg.final_norm is None else cfg.final_norm, gated=cfg.prune,
        gate_init=cfg.gate_init, **arch_fields,
    )
    token_mask_rate = (arch.default_token_mask_rate(cfg.class_token_head) if cfg.token_mask_rate is None
                       else cfg.token_mask_rate)
    task = ClassificationTask(
        model=model_cfg.to_dict(), prune=cfg.prune, target_pruned_fraction=cfg.target_pruned_fraction,
        target_warmup=cfg.target_warmup, pr_rate=PAPER_PR_RATE if cfg.pr_rate is None else cfg.pr_rate,
        l0_normalize=cfg.l0_normalize, l0_warmup_steps=cfg.l0_warmup_steps, optimizer=cfg.optimizer,
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay, gate_lr_scale=cfg.gate_lr_scale, lr_scheduler=cfg.lr_scheduler and lr_scheduler,
        warmup_epochs=cfg.warmup_epochs, class_names=class_names, data_config=data_config,
        pretrained=cfg.pretrained, token_mask_rate=token_mask_rate, diversity_weight=cfg.diversity_weight,
        arch=arch.name, pcm_l2=cfg.pcm_l2, pcm_et_weight=cfg.pcm_et_weight, pcm_et_crop=cfg.pcm_et_crop,
        frozen_epochs=cfg.frozen_epochs, trainable_blocks=cfg.trainable_blocks, frozen_lr=cfg.frozen_lr,
    )
    return task


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training; returns the summary (also written to output_dir/summary.json).

    The run holds :func:`weakseg.io.folder_lock` on ``output_dir`` (DDP rank 0 only), so a second run into the
    same folder is refused instead of interleaving checkpoints and ``metrics.csv``.
    """
    with ExitStack() as stack:
        if process_rank() == 0:
            make_dir(Path(cfg.output_dir), "output folder (--output_dir)")
            stack.enter_context(folder_lock(Path(cfg.output_dir), "weakseg train"))
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict[str, Any]:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from weakseg.data.base import shared_tiles
    from weakseg.data.datamodule import WeakSegDataModule
    from weakseg.models.architectures import get_architecture
    from weakseg.pipeline.progress import EpochLog, csv_logger, show_progress_bar
    from weakseg.tasks.classification import load_classifier, read_checkpoint

    started = time.time()
    cfg = validate_train_config(cfg)
    out = Path(cfg.output_dir)
    ckpt_path = out / "checkpoints" / "last.ckpt"
    resume_from: dict[str, Any] | None = None
    if cfg.resume:  # before any data is read: a missing or broken checkpoint is a start-up error
        if not ckpt_path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = read_checkpoint(ckpt_path, "--resume", mmap=True)  # mapped, not read: only its progress is needed
        resume_from = {"epoch": ckpt.get("epoch", -1), "global_step": ckpt.get("global_step", 0)}
        del ckpt
    arch = get_architecture(cfg.arch)
    defaults = TrainConfig()
    for names, applies, what in ((WEAKTR_SETTINGS, arch.aaf is not None, "configure WeakTr's heads and need --arch "
                                  "weaktr"),
                                 (PCM_SETTINGS, arch.patch_classifier is not None, "configure ViT-PCM and need --arch "
                                  "pcm")):
        given = [k for k in names if getattr(cfg, k) != getattr(defaults, k)]
        if given and not applies:
            raise ConfigError(f"--{' / --'.join(given)} {what} (--arch is {cfg.arch})")
    if cfg.trainable_blocks is not None and cfg.trainable_blocks > cfg.depth:
        raise ConfigError(f"--trainable_blocks {cfg.trainable_blocks} is more than the model's {cfg.depth} blocks "
                          "(--depth)")
    if cfg.frozen_epochs >= cfg.num_epochs:
        raise ConfigError(f"--frozen_epochs {cfg.frozen_epochs} leaves no epoch in which the backbone learns "
                          f"(--num_epochs {cfg.num_epochs})")
    if cfg.frozen_lr is not None and not cfg.frozen_epochs:
        raise ConfigError("--frozen_lr is the learning rate of the --frozen_epochs, which is 0")
    if arch.patch_classifier is not None and cfg.pcm_et_weight > 0:
        side = 2 * cfg.patch_size
        if any(s % side for s in cfg.imgsize):
            raise ConfigError(f"--arch pcm's equivariance loss tiles four half-size views into one input, so the "
                              f"image size {'x'.join(map(str, cfg.imgsize))} must be a multiple of 2 x the patch size "
                              f"({side}; --imgsize / --patch_size), or switch it off with --pcm_et_weight 0")
    datadir = ensure_data(cfg)
    train_split, val_split = resolve_splits(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    modality = "s1s2" if cfg.multimodal else "s2"
    dm = WeakSegDataModule(
        datadir, dataset=cfg.dataset, modality=modality, img_size=cfg.imgsize, train_split=train_split,
        val_split=val_split, batch_size=cfg.train_batch_size, eval_batch_size=cfg.eval_batch_size,
        num_workers=cfg.num_workers, normalization=cfg.normalization, augmentations=cfg.augmentations,
        label_threshold=cfg.label_threshold, cache=cfg.cache_data or not cfg.datadir, strict_data=cfg.strict_data,
        store=cfg.store,
    )
    dm.check_tiles()
    dm.screen_tiles()  # unusable tiles skipped with their reason (fatal with --strict_data)
    dm.prepare_stats()
    reader = dm.open(train_split, "val")
    if val_split is not None:
        overlap = shared_tiles(reader, dm.open(val_split, "val"))
        if overlap:
            raise ConfigError(
                f"--val_split {val_split!r} shares {len(overlap)} tile(s) with --train_split {train_split!r} (e.g. "
                f"{min(overlap)!r}): checkpoint selection would see training tiles. Use '<split>:train' and "
                "'<split>:holdout' (the default) or two different splits"
            )
    task = build_classifier_task(cfg, arch, int(reader.read_image(0).shape[0]), list(reader.class_names),
                                 data_config=dm.data_config)
    model_cfg = task.model_config
    in_chans, token_mask_rate = model_cfg.in_chans, float(task.hparams.token_mask_rate)
    n_params = sum(p.numel() for p in task.model.parameters())
    h, w = model_cfg.grid_size
    log.info(
        "train (%s): %d tiles in %r, checkpoint chosen on %r | %d channels, %d classes | ViT %d blocks x %d heads "
        "(%s gated), dim %d, %d tokens/image (%d prefix), %s head, token masking %.2f, %.2fM params | "
        "effective batch %d x %d x %d device(s) x %d node(s) = %d",
        arch.name, len(reader), train_split, val_split, in_chans, model_cfg.num_classes, cfg.depth, cfg.num_heads,
        "all" if cfg.prune else "none", cfg.embed_dim, h * w + model_cfg.num_prefix_tokens,
        model_cfg.num_prefix_tokens, model_cfg.head_type, token_mask_rate, n_params / 1e6,
        cfg.train_batch_size, cfg.accumulate_grad, cfg.num_devices, cfg.num_nodes,
        cfg.train_batch_size * cfg.accumulate_grad * cfg.num_devices * cfg.num_nodes,
    )
    monitor, mode = checkpoint_monitor(cfg.checkpoint_metric, val_split is not None)
    log.info("best.ckpt: the epoch with the %s %s on %r (ties go to the later epoch; --checkpoint_metric)",
             "highest" if mode == "max" else "lowest", monitor, val_split or train_split)
    best = LatestOnTieCheckpoint(
        dirpath=out / "checkpoints", filename="best", monitor=monitor, mode=mode,
        auto_insert_metric_name=False, enable_version_counter=False,
    )
    # last.ckpt: every epoch, by its own callback (monitor None, top 1 = the newest). Listed after `best`, so the
    # state it saves includes best's update of the same epoch and a resumed run knows its best score.
    last = ModelCheckpoint(
        dirpath=out / "checkpoints", filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
        auto_insert_metric_name=False, enable_version_counter=False,
    )
    callbacks: list[Any] = [best, last,
                            EpochLog(f"{arch.name} classifier",
                                     ("train_loss", "val_loss", "val_map", "val_macro_f1"))]
    metrics_csv = out / "metrics.csv"
    # Read before the CSV logger exists: its writer deletes metrics.csv when it starts.
    kept = rows_before_checkpoint(metrics_csv, resume_from) if resume_from is not None else None
    metrics_logger = csv_logger(out)
    loggers: list[Any] = [metrics_logger]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(out), name="tensorboard", version=""))
    except ImportError:
        dm.write_skipped_tiles(out)
    if cfg.lr_scheduler:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.precision.startswith("bf16") and not torch.cuda.is_available():
        log.warning("--precision %s on CPU: torch's CPU bf16 attention backward is several times slower than "
                    "fp32 (benchmarks/train_step.py --bf16); prefer 32-true here", cfg.precision)
    strategy = "ddp" if cfg.num_devices * cfg.num_nodes > 1 else "auto"
    trainer = L.Trainer(
        max_epochs=cfg.num_epochs, max_steps=cfg.max_steps, accelerator=cfg.accelerator,
        devices=cfg.num_devices, num_nodes=cfg.num_nodes, strategy=strategy, precision=cfg.precision,
        accumulate_grad_batches=cfg.accumulate_grad, callbacks=callbacks, logger=loggers,
        log_every_n_steps=1, deterministic=False, enable_model_summary=False,
        enable_progress_bar=show_progress_bar(), plugins=[atomic_checkpoint_io()],
    )
    if trainer.is_global_zero:
        save_resolved(cfg, out, model=model_cfg.to_dict(), data=dm.data_config, datadir=str(datadir),
                      splits={"train": train_split, "val": val_split})
        pass
    if kept is not None and trainer.is_global_zero:
        restore_metrics(metrics_logger, metrics_csv, *kept)
    t0 = time.time()
    with warnings.catch_warnings():
        # Resuming into the run's own folder: its checkpoints are meant to be there.
        warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
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
        "metrics_csv": str(metrics_csv),
        "best_score": float(best.best_model_score) if best.best_model_score is not None else None,
        "monitor": monitor,
        "seconds": round(elapsed, 1),
        "pruned_fraction": task.model.pruned_fraction(),
        "pruned_heads_per_layer": task.model.pruned_heads_per_layer(),
        "num_heads_total": cfg.depth * cfg.num_heads,
        "final_metrics": metrics,
        "best": describe_checkpoint(best.best_model_path) if best.best_model_path else None,
        "skipped_tiles": dm.skipped_summary(),
    }
    if trainer.is_global_zero:
        # best.ckpt read once, for the checks and the gate figure (a paper-size checkpoint is over a gigabyte)
        chosen = load_classifier(best.best_model_path) if best.best_model_path else None
        if chosen is not None:
            summary["sanity"] = check_classifier(chosen, best.best_model_path, dm, val_split,
                                                 task.train_label_frequency(), arch.name)
        summary["seconds_with_setup"] = round(time.time() - started, 1)
        summary["figures"] = write_train_figures(out, summary, cfg.figures,
                                                 model=chosen.model if chosen is not None else None)
        atomic_write_json(out / "summary.json", summary)
        print_summary(summary)
    return summary


def checkpoint_monitor(metric: str, has_val: bool) -> tuple[str, str]:
    """(logged metric name, "max"/"min") that chooses ``best.ckpt``: on the validation split when there is one,
    else on the training split (whose loss is the BCE alone: the L0 term changes with the gates, not the fit)."""
    name, mode = CHECKPOINT_METRICS[metric]
    if has_val:
        return f"val_{name}", mode
    return ("train_bce" if name == "loss" else f"train_{name}"), mode


def latest_on_tie_checkpoint() -> type:
    """Lightning's ModelCheckpoint whose ties go to the later epoch (built lazily: Lightning imports slowly).

    Lightning keeps the first of equal scores; a flat score (macro F1 stuck at its all-negative value, say) then
    keeps epoch 0, the untrained model. With ties to the later epoch a flat criterion keeps the most trained model.
    An epoch whose model has not reached its final pruning (``ClassificationTask.pruning_settled``: with
    ``--target_pruned_fraction``, the ramp still below the target) is not a candidate: measured, the best holdout
    mAP of a 1,000-step run was an epoch with 10 of the 12 target heads closed.
    """
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    class ModelCheckpointLatestOnTie(ModelCheckpoint):
        def check_monitor_top_k(self, trainer: Any, current: Any = None) -> bool:
            if current is None:
                return False
            settled = getattr(trainer.lightning_module, "pruning_settled", None)
            if settled is not None and not trainer.strategy.reduce_boolean_decision(bool(settled()), all=True):
                return False
            if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
                return True
            op = {"min": torch.le, "max": torch.ge}[self.mode]
            better = bool(op(current, self.best_k_models[self.kth_best_model_path]))
            return trainer.strategy.reduce_boolean_decision(better)

    return ModelCheckpointLatestOnTie


def LatestOnTieCheckpoint(**kwargs: Any) -> Any:  # noqa: N802 - reads as the class it builds
    return latest_on_tie_checkpoint()(**kwargs)


def check_classifier(task: Any, checkpoint: str | Path, dm: Any, val_split: str | None, train_frequency: Any,
                     arch: str) -> dict[str, Any]:
    """The sanity checks of :mod:`weakseg.pipeline.sanity` on ``task``, loaded from ``checkpoint``: its holdout
    predictions against the class-frequency baseline, and its gates against the blocks the pseudomask methods
    read. Logged as warnings."""
    import torch

    from weakseg.pipeline.sanity import classifier_checks, method_needs, pruning_checks, report

    result: dict[str, Any] = {"checkpoint": str(checkpoint)}
    if val_split is not None:
        probs, targets = [], []
        with torch.inference_mode():
            for batch in dm.val_dataloader():
                probs.append(torch.sigmoid(task(batch["image"])))
                targets.append(batch["label"])
        result["classifier"] = classifier_checks(torch.cat(probs), torch.cat(targets), train_frequency,
                                                 split=val_split)
    else:
        result["classifier"] = {"warnings": [], "skipped": "no validation split"}
    model = task.model
    result["pruning"] = pruning_checks(model.head_mask(), bool(model.cfg.gated), method_needs(arch, model.cfg.depth))
    report(result["classifier"]["warnings"] + result["pruning"], f"checkpoint {checkpoint}")
    return result


def atomic_checkpoint_io() -> Any:
    """Lightning's torch checkpoint writer, writing through :func:`weakseg.io.atomic_path`.

    Lightning writes a checkpoint in place, so a run killed while saving left a truncated ``last.ckpt`` that
    ``--resume`` cannot read; written to a temporary name and renamed, the previous checkpoint stays whole.
    """
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            with atomic_path(path) as tmp:
                super().save_checkpoint(checkpoint, tmp, storage_options)

    return AtomicCheckpointIO()


def rows_before_checkpoint(metrics_csv: Path, checkpoint: dict[str, Any]) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of an interrupted run's ``metrics.csv`` that belong to what ``checkpoint`` holds.

    A row logged with an epoch is kept when its epoch is at most the checkpoint's (rows of the epoch a kill
    interrupted are logged again by the resumed run); a row without one (the learning-rate monitor's) when its
    step is below the checkpoint's global step. No file: nothing to keep.
    """
    if not metrics_csv.is_file():
        return [], []
    epoch, step = int(checkpoint.get("epoch", -1)), int(checkpoint.get("global_step", 0))
    with metrics_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)

    def keep(row: dict[str, str]) -> bool:
        try:
            if row.get("epoch"):
                return int(float(row["epoch"])) <= epoch
            return int(float(row.get("step") or 0)) < step
        except ValueError:
            return False

    return header, [row for row in rows if keep(row)]


def restore_metrics(csv_logger: Any, metrics_csv: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    """Start ``csv_logger`` and put back the rows logged before the checkpoint, so the resumed run appends.

    Lightning's CSV writer deletes ``metrics.csv`` when it starts and then appends to the file it writes; told the
    columns already in the file (``metrics_keys``), it appends to the restored rows and rewrites the header when a
    new column appears, as it does within one run.
    """
    writer = csv_logger.experiment  # starts the writer: it deletes metrics.csv
    if not rows or not hasattr(writer, "metrics_keys"):
        return
    columns = sorted(header)
    with atomic_path(metrics_csv) as tmp, tmp.open("w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=columns)
        out.writeheader()
        out.writerows(rows)
    writer.metrics_keys = columns


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
    score, monitor = None, None
    for key, state in (ckpt.get("callbacks") or {}).items():
        # best.ckpt's own callback is the one with a monitor (last.ckpt's has none); its key is its class name.
        if "Checkpoint" in key and state.get("monitor") and state.get("current_score") is not None:
            score = float(state["current_score"])
            monitor = str(state["monitor"])
    log_alpha = [v.flatten() for k, v in ckpt["state_dict"].items() if k.endswith("log_alpha")]
    hp = ckpt.get("hyper_parameters", {})
    model = hp.get("model", {})
    total = int(model.get("depth", 0)) * int(model.get("num_heads", 0))
    pruned = [int((a <= 0).sum()) for a in log_alpha]
    return {
        "path": str(path), "epoch": int(ckpt.get("epoch", -1)), "val_score": score, "monitor": monitor,
        "arch": hp.get("arch"), "pruned_heads": sum(pruned), "num_heads_total": total,
        "pruned_heads_per_layer": pruned,
    }


def print_summary(s: dict[str, Any]) -> None:
    m = s["final_metrics"]
    setup = s.get("seconds_with_setup")
    print(f"\ntraining finished in {s['seconds']:.0f}s" + (f" ({setup:.0f}s with data checks, statistics and the "
                                                          "checkpoint checks)" if setup else ""))
    for key in ("val_macro_f1", "val_map", "val_hamming_acc", "train_macro_f1"):
        if key in m:
            print(f"  {key:<16} {m[key]:.3f}")
    print(
        f"  heads pruned     {round(s['pruned_fraction'] * s['num_heads_total'])}/{s['num_heads_total']} "
        f"({100 * s['pruned_fraction']:.0f}%), per layer {s['pruned_heads_per_layer']}"
    )
    best = s.get("best")
    if best:
        score = "-" if best["val_score"] is None else f"{best['val_score']:.3f}"
        print(f"  best checkpoint  {s['best_checkpoint']}: epoch {best['epoch']}, {s['monitor']} = {score} on {s['val_split'] or s['train_split']!r}, heads pruned "
              f"{best['pruned_heads']}/{best['num_heads_total']}")
    sanity = s.get("sanity") or {}
    checks = sanity.get("classifier") or {}
    warned = list(checks.get("warnings") or []) + list(sanity.get("pruning") or [])
    if warned:
        print(f"  WARNINGS         {len(warned)} (printed above, kept in summary.json under 'sanity')")
    elif "bce" in checks:
        print(f"  sanity           beats the class-frequency baseline: holdout BCE {checks['bce']:.3f} vs "
              f"{checks['baseline_bce']:.3f}, mAP {checks['map']:.3f} vs {checks['baseline_map']:.3f}")
    skipped = s.get("skipped_tiles") or {}
    if skipped.get("count"):
        print(f"  skipped tiles    {skipped['count']} {skipped['per_split']}: listed with their reason in "
              f"{skipped['file']}")
    print(f"  metrics          {s['metrics_csv']}")


