"""``weakseg pretrain``: Barlow Twins pretraining of the ViT backbone on unlabelled tiles.

Two augmentations of each tile (``--views augment``; per-band brightness/contrast, band mean, blur, flips, 90-degree
rotations, resized crops) or its Sentinel-2 and Sentinel-1 bands as the two views (``--views cross_modal
--multimodal``: separate patch embeddings, one transformer). Labels are never read: any reader works, and
``--dataset images`` takes a plain folder of images. The backbone lands in ``<output_dir>/backbone.pth``, which
``weakseg train --pretrained`` loads into every classifier architecture (the same size flags)::

    weakseg pretrain --output_dir runs/pretrain
    weakseg train --pretrained runs/pretrain/backbone.pth --arch class_tokens --output_dir runs/train

Settings: defaults < ``--config FILE.yaml`` < flags, each checked before any tile is read
(:data:`weakseg.pipeline.pretrain.PRETRAIN_CHECKS`). The run itself is :func:`weakseg.pipeline.pretrain.pretrain`.
"""

from __future__ import annotations

import argparse
from typing import Any

from weakseg.commands import command_help
from weakseg.config import FLAGS, explicit_args, load_yaml, resolve
from weakseg.pipeline.pretrain import (
    DEFAULT_PRETRAIN_SPLITS,
    PRETRAIN_CHECKS,
    PRETRAIN_DATASETS,
    PretrainConfig,
    pretrain,
)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("pretrain", help=command_help("pretrain"), description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              argument_default=argparse.SUPPRESS)
    bool_flag = argparse.BooleanOptionalAction
    p.add_argument("--config", help="YAML file of settings (keys as the flags without dashes)")
    g = p.add_argument_group("data")
    g.add_argument("--datadir", help="dataset root; default: built-in synthetic data in weakseg_data/")
    g.add_argument("--dataset", choices=list(PRETRAIN_DATASETS),
                   help="reader (default dfc2020); images: a folder of images (or its images/ folder), nothing else")
    g.add_argument("--split", help="split to read (default: the whole training split, "
                                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_PRETRAIN_SPLITS.items()) + ")")
    g.add_argument("--multimodal", action=bool_flag, help="Sentinel-1 + Sentinel-2 tiles (DFC2020)")
    g.add_argument("--views", choices=["augment", "cross_modal"],
                   help="augment: two augmentations of a tile (default); cross_modal: its S2 and S1 bands")
    g.add_argument("--fusion", choices=["sum", "concat"], help="multimodal patch embedding (default sum)")
    g.add_argument("--imgsize", type=int, nargs="+", help="model input H [W] (default 64)")
    g.add_argument("--normalization", choices=["none", "per_image_max", "standardize"],
                   help="of the tiles (default standardize: band statistics of the pretraining tiles)")
    g.add_argument("--crop_scale", type=float, nargs=2, help="area range of the resized crops (0.08 1)")
    g.add_argument("--num_workers", type=int)
    g = p.add_argument_group("backbone (as weakseg train)")
    for name in ("patch_size", "embed_dim", "depth", "num_heads"):
        g.add_argument(f"--{name}", type=int)
    g.add_argument("--mlp_ratio", type=float)
    g = p.add_argument_group("Barlow Twins")
    g.add_argument("--projector_dim", type=int, help="projector width P (512)")
    g.add_argument("--projector_layers", type=int, help="projector linear layers (3)")
    g.add_argument("--lambd", type=float, help="off-diagonal weight (default 5e-3 x 512 / P)")
    g.add_argument("--batch_size", type=int, help="the loss batch per device (64): C is computed on it")
    g.add_argument("--accumulate_grad", type=int,
                   help="optimiser step every N batches (does not enlarge the Barlow Twins batch)")
    g.add_argument("--epochs", type=int, help="(100)")
    g.add_argument("--learning_rate", type=float, help="AdamW peak learning rate (1e-3)")
    g.add_argument("--weight_decay", type=float, help="(1e-5)")
    g.add_argument("--warmup_epochs", type=float, help="linear warm-up before the cosine decay (10)")
    g.add_argument("--figures_every", type=int, help="a C heatmap PNG every N epochs and at the end (10; 0 none)")
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", help="where backbone.pth, checkpoints/, metrics.csv, figures/ go "
                                        "(default runs/pretrain)")
    g.add_argument("--resume", action=bool_flag, help="continue from output_dir/checkpoints/last.ckpt")
    g.add_argument("--seed", type=int)
    g.add_argument("--accelerator", help="auto, cpu, gpu")
    g.add_argument("--num_devices", type=int)
    g.add_argument("--num_nodes", type=int, help="machines, each with --num_devices devices (SLURM or torchrun)")
    g.add_argument("--precision", help="32-true, bf16-mixed")
    p.set_defaults(run=run)


def resolve_pretrain_config(args: argparse.Namespace) -> PretrainConfig:
    """Defaults < ``--config`` YAML < flags, every value checked."""
    flags = explicit_args(args, exclude=("config",))
    config_file = getattr(args, "config", None)
    yaml_layer = load_yaml(config_file) if config_file else {}
    return resolve(PretrainConfig, yaml_layer, flags, checks=PRETRAIN_CHECKS,
                   source_names=[f"config file {config_file}", FLAGS])


def run(args: argparse.Namespace) -> int:
    pretrain(resolve_pretrain_config(args))
    return 0
