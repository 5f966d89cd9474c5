"""``weakseg train``: stage 1, the (gated) ViT on image-level labels.

Accepts the sparse-vit-wsss README command as written::

    weakseg train --prune --train_batch_size 2 --accumulate_grad 4 --optimizer adamw --lr_scheduler \\
        --learning_rate 0.001 --depth 12 --patch_size 14 --imgsize 224 224

``--arch class_tokens`` trains one class token per class with class-specific token masking (Hanna & Borth, ICCV
2025) for ``weakseg pseudomasks --method class_attention``. Settings resolve as defaults (a small ViT that trains on
a CPU) < ``--preset`` < ``--config FILE.yaml`` < flags. Without ``--datadir`` the built-in synthetic Sentinel-1/2
data is generated (once) and used. The run itself is :func:`weakseg.pipeline.train.train`.

Every setting is type- and range-checked before any data is read (:data:`weakseg.pipeline.train.TRAIN_CHECKS`
via :func:`weakseg.config.resolve`), flags and YAML alike; a wrong one ends the command with ``error:`` naming it
and where it came from.
"""

from __future__ import annotations

import argparse
from typing import Any

from weakseg.commands import command_help
from weakseg.config import FLAGS, explicit_args, load_yaml, resolve
from weakseg.errors import ConfigError
from weakseg.models.architectures import ARCHITECTURES
from weakseg.pipeline.train import (PRESETS, TRAIN_CHECKS, TrainConfig, check_pruning_settings, square_imgsize,
                                     train)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help=command_help("train"),
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
    g.add_argument("--dataset", choices=["dfc2020", "folder", "voc"], help="reader (default dfc2020)")
    g.add_argument("--train_split", help="split to train on (default: the training split without its holdout, "
                                         "validation:train for DFC2020, all:train for a folder)")
    g.add_argument("--val_split", help="split that chooses best.ckpt by image-label macro F1 (default: the "
                                       "holdout, e.g. validation:holdout); 'none' to skip")
    g.add_argument("--multimodal", action=bool_flag, help="Sentinel-1 + Sentinel-2 (early fusion)")
    g.add_argument("--fusion", choices=["sum", "concat"], help="multimodal fusion: sum of two patch embeddings (paper) or 15-channel concat")
    g.add_argument("--imgsize", type=int, nargs="+",
                   help="model input H [W]; in training, tiles are randomly cropped to it where labels come from "
                        "masks, resized whole to it where they come from labels.csv")
    g.add_argument("--normalization", choices=["none", "per_image_max", "standardize"])
    g.add_argument("--augmentations", nargs="*", help="fliprot and/or affine (joint on S1, S2 and mask)")
    g.add_argument("--num_workers", type=int)
    g.add_argument("--cache_data", action=bool_flag, help="keep tiles in memory (default on for built-in data)")
    g.add_argument("--store", metavar="DIR|none",
                   help="tile store of the training split (weakseg prepare --store DIR); default: the one at "
                        "<datadir>/.weakseg_store/ when complete and fresh; none: read the files")
    g.add_argument("--strict_data", action=bool_flag,
                   help="stop at start-up if a tile cannot be used (no valid pixel, unreadable pixels) instead of "
                        "skipping it; skipped tiles are listed in output_dir/skipped_tiles.csv")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=sorted(ARCHITECTURES),
                   help="; ".join(f"{a.name}: {a.summary}" for a in ARCHITECTURES.values()))
    g.add_argument("--class_token_head", choices=["per_class", "flatten", "mean"],
                   help="class_tokens: logit c from token c (default), or one linear layer over all class tokens "
                        "(as released with TokenMasking-WSSS); weaktr: mean of token c's channels (default, as "
                        "WeakTr) or per_class")
    g.add_argument("--aaf", choices=["v2", "v1", "random"],
                   help="weaktr: Adaptive Attention Fusion variant (default v2, the current release)")
    g.add_argument("--aaf_reduction", type=int, help="weaktr: SE reduction of AAF (default 8; v1: 4)")
    g.add_argument("--aaf_pool", choices=["max", "avg"], help="weaktr: token pooling of AAF v2 (default max)")
    g.add_argument("--cam_fusion", choices=["fused", "coarse", "attention"],
                   help="weaktr: CAM before patch-attention refinement: class attention x coarse CAM (fused, "
                        "default), the coarse CAM or the class attention alone")
    g.add_argument("--pcm_head", choices=["linear", "bilstm"],
                   help="pcm: patch classifier on the patch features (linear, default: measured better on the "
                        "holdout) or after the paper's H-V BiLSTM (bilstm)")
    g.add_argument("--pcm_lstm_hidden", type=int, help="pcm: BiLSTM units per direction (default embed_dim / 4)")
    g.add_argument("--pcm_dropout", type=float, help="pcm: dropout before the BiLSTM and the classifier (0.2)")
    g.add_argument("--pcm_l2", type=float, help="pcm: weight of the L2 term on the patch classifier (0.01; 0 off)")
    g.add_argument("--pcm_et_weight", type=float,
                   help="pcm: weight of the equivariance loss (2x2 mosaic student vs eval-mode teacher; 1; 0 off)")
    g.add_argument("--pcm_et_crop", type=float,
                   help="pcm: probability of the grid-aligned 1/3 crop in the equivariance loss's second view (0.3)")
    g.add_argument("--num_register_tokens", type=int, help="register tokens (default: class_tokens 1, vit 0)")
    g.add_argument("--token_mask_rate", type=float,
                   help="class_tokens: probability of masking an absent class's token in training (default: 0 with "
                        "the per_class head, 0.5 with the flatten head as the paper)")
    g.add_argument("--diversity_weight", type=float, help="class_tokens: weight of the class-map diversity loss (0)")
    g.add_argument("--final_norm", action=bool_flag, help="LayerNorm before the head (default on; weaktr off)")
    g.add_argument("--patch_size", type=int)
    g.add_argument("--embed_dim", type=int)
    g.add_argument("--depth", type=int)
    g.add_argument("--num_heads", type=int)
    g.add_argument("--mlp_ratio", type=float)
    g.add_argument("--pretrained", help="local timm/DeiT/DINO ViT checkpoint to start from")
    g.add_argument("--frozen_epochs", type=int,
                   help="two-stage schedule: epochs at the start in which only the heads learn (0; ViT-PCM: 1)")
    g.add_argument("--trainable_blocks", metavar="K|none",
                   help="two-stage schedule: only the last K blocks and the final norm of the backbone learn "
                        "(none: all; ViT-PCM: 5)")
    g.add_argument("--frozen_lr", metavar="LR|none",
                   help="learning rate of the --frozen_epochs (none: --learning_rate; ViT-PCM: 1e-3 then 1e-4)")
    g = p.add_argument_group("pruning")
    g.add_argument("--prune", action=bool_flag, help="Hard Concrete gate per head; prune to the target (default) "
                                                     "or with the paper's L0 penalty (--target_pruned_fraction none)")
    # No type=float on the optional numbers: "none" must reach weakseg.config, which reads it as null.
    g.add_argument("--target_pruned_fraction", metavar="FRACTION|none",
                   help="fraction of the heads to prune (default 0.5; ours): the heads whose gates the task lowered "
                        "most, ramped in over --target_warmup of the run; none: the paper's lambda * L0 (--pr_rate)")
    g.add_argument("--target_warmup", type=float, help="fraction of the run over which the target ramps from 0 (0.5)")
    g.add_argument("--pr_rate", metavar="LAMBDA|none",
                   help="lambda, the L0 weight, with --target_pruned_fraction none (default and paper 0.2)")
    g.add_argument("--l0_normalize", action=bool_flag,
                   help="divide the L0 penalty by the number of heads (ours; with --target_pruned_fraction none)")
    g.add_argument("--l0_warmup_steps", type=int,
                   help="ramp lambda from 0 over N steps (ours; with --target_pruned_fraction none)")
    g.add_argument("--gate_lr_scale", type=float, help="learning-rate multiplier of the gates (ours; paper 1)")
    g.add_argument("--gate_init", metavar="LOG_ALPHA|none",
                   help="initial log alpha of every gate (default 3: open; none: the paper's Xavier-uniform)")
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
    g.add_argument("--num_nodes", type=int,
                   help="machines, each with --num_devices devices (launched by SLURM or torchrun; README "
                        "'Performance and scale')")
    g.add_argument("--accelerator", help="auto, cpu, gpu")
    g.add_argument("--precision", help="32-true, bf16-mixed, 16-mixed")
    g.add_argument("--seed", type=int)
    g.add_argument("--checkpoint_metric", choices=["map", "loss", "macro_f1"],
                   help="what chooses best.ckpt on the validation split: map (default; threshold-free), loss (BCE) "
                        "or macro_f1 (at threshold 0.5); ties go to the later epoch")
    g.add_argument("--output_dir", help="where checkpoints, metrics.csv and config.yaml go")
    g.add_argument("--resume", action=bool_flag, help="continue from output_dir/checkpoints/last.ckpt")
    g.add_argument("--figures", action=bool_flag,
                   help="draw output_dir/figures/ at the end: training curves and, with --prune, the gate map of "
                        "best.ckpt (default on; --no-figures skips them)")


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < ``--preset`` (or the YAML's ``preset``) < ``--config`` YAML < flags, every value checked."""
    flags = explicit_args(args, exclude=("config", "preset"))
    config_file = getattr(args, "config", None)
    yaml_layer = load_yaml(config_file) if config_file else {}
    preset_name = yaml_layer.pop("preset", None) or "cpu"
    if not isinstance(preset_name, str) or preset_name not in PRESETS:
        raise ConfigError(f"preset in config file {config_file}: unknown preset {preset_name!r}; choose from "
                          f"{sorted(PRESETS)}")
    preset_name = getattr(args, "preset", None) or preset_name  # the flag wins, as every flag does
    cfg = resolve(TrainConfig, PRESETS[preset_name], yaml_layer, flags, checks=TRAIN_CHECKS,
                  source_names=[f"preset {preset_name!r}", f"config file {config_file}", FLAGS])
    return check_pruning_settings(square_imgsize(cfg))


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    train(cfg)
    return 0
