"""``weakseg refine``: stage 3, train a UNet on the pseudomasks; its predictions become the next ones.

Hanna, Mommert and Borth (CVPRW 2023) refine their attention pseudomasks by training "a standard UNet" on them
for a few epochs, twice. Example (after ``weakseg pseudomasks --output runs/pm``)::

    weakseg refine --datadir DATA --pseudomasks runs/pm --output runs/refine --eval_split test \\
        --model_checkpoint runs/train/checkpoints/best.ckpt

``--model_checkpoint`` takes the classifier's input settings (dataset, modality, normalisation, band
statistics) so the UNet sees the inputs the ViT saw (flags given explicitly win), and its image-label
probabilities: every UNet prediction is weighted by them (``--no-label_weighting`` for the UNet alone), the
held-out split is also scored with the UNet alone. ``--min_confidence`` makes
the loss ignore target pixels whose confidence (``<pseudomasks>/confidence/<id>.tif``, then each iteration's
own softmax probability) is below it. ``--supervised`` trains the same UNet on the ground-truth masks instead
(the fully supervised upper bound) into ``<output>/supervised``. Outputs: ``<output>/iter{i}/masks/<id>.tif``
(the refined pseudomasks) with ``masks/confidence/``, ``eval_masks/``, ``scores.json`` per iteration and
``summary.json``, and ``figures/`` (``--no-figures`` to skip). Re-running skips finished iterations.

``--model segmenter --loss clip`` is WeakTr's phase 2 (Segmenter with the gradient-clipping loss). The optimiser
defaults are per model (:data:`weakseg.pipeline.refine.MODEL_RECIPES`): both train with AdamW 3e-3 and cosine
decay, Segmenter's encoder at the full lr (measured from scratch); WeakTr's fine-tuning recipe for a pretrained
encoder is ``--optimizer sgd --lr_schedule poly --learning_rate 1e-4 --encoder_lr_scale 0.1``. YAML and flags
override either. ``--encoder_checkpoint`` starts Segmenter's encoder from a weakseg classifier's backbone (the
encoder takes its patch size, width, depth and heads).

``--model vit_linear``, ``setr_naive`` or ``setr_pup`` put a head on the patch tokens of the same ViT encoder
(:mod:`weakseg.models.seg_heads`; Zheng et al., SETR, CVPR 2021): a per-token linear map to its p x p block, SETR's
naive 1x1-conv decoder, or SETR's progressive upsampling (patch size a power of two). They take the encoder flags,
``--pretrained`` and ``--encoder_checkpoint`` as Segmenter does; ``--freeze_encoder`` trains the head (or
Segmenter's decoder) only, with the encoder in eval mode, e.g. a linear probe of a pretrained encoder::

    weakseg refine --datadir DATA --supervised --output runs/probe --model vit_linear --freeze_encoder \\
        --encoder_checkpoint runs/train/checkpoints/best.ckpt

Every setting is type- and range-checked (:data:`REFINE_CHECKS` via :func:`weakseg.config.resolve`), flags and
YAML alike, before the classifier checkpoint or any data is read.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from weakseg.commands import command_help
from weakseg.config import (
    FLAGS,
    Check,
    at_least,
    between,
    check_layer,
    each,
    explicit_args,
    length,
    load_yaml,
    non_empty,
    one_of,
    positive,
    resolve,
)
from weakseg.errors import ConfigError
from weakseg.pipeline.refine import (
    DEFAULT_EPOCHS,
    DEFAULT_ITERATIONS,
    DEFAULT_LR,
    DEFAULT_LR_SCHEDULE,
    DEFAULT_MIN_CONFIDENCE,
    LR_SCHEDULES,
    MODEL_RECIPES,
    RefineConfig,
    model_recipe,
    refine,
)
from weakseg.tasks.segmentation import SEGMENTATION_MODELS, VIT_ENCODER_MODELS

#: Keys of a classifier's ``data_config`` that the refinement reuses.
CHECKPOINT_DATA_KEYS = ("dataset", "modality", "normalization", "band_stats")
#: Flag names that differ from the RefineConfig field they set.
_FLAG_TO_FIELD = {"output": "output_dir", "learning_rate": "lr"}
#: The other way round, for messages (``modality`` is set by ``--multimodal``).
_FIELD_TO_FLAG = {**{field: flag for flag, field in _FLAG_TO_FIELD.items()}, "modality": "multimodal"}


def _normalizations() -> list[str]:
    from weakseg.data.normalization import NORMALIZATION_MODES

    return list(NORMALIZATION_MODES)


def _dataset_kinds() -> list[str]:
    from weakseg.data import DATASET_KINDS

    return list(DATASET_KINDS)


def _accelerators() -> list[str]:
    from weakseg.pipeline.train import accelerator_values

    return accelerator_values()


def _split_name(value: str) -> str | None:
    from weakseg.pipeline.train import split_name

    return split_name(value)


#: Range checks of the :class:`RefineConfig` settings (types come from its annotations). The same bounds as
#: ``weakseg.pipeline.refine``'s own check of a config built in code, applied here to each layer, so a wrong flag
#: or YAML value is named with its source before the classifier checkpoint or any tile is read.
REFINE_CHECKS: dict[str, Check | list[Check]] = {
    "datadir": non_empty,
    "pseudomasks": non_empty,
    "output_dir": non_empty,
    "dataset": one_of(_dataset_kinds),
    "split": [non_empty, _split_name],
    "eval_split": _split_name,
    "modality": one_of(["s2", "s1s2"]),
    "normalization": one_of(_normalizations),
    "band_stats": length(2),
    "iterations": at_least(0),
    "epochs": at_least(1, "an iteration of 0 epochs trains nothing"),
    "batch_size": at_least(1),
    "lr": positive(),
    "lr_schedule": one_of(LR_SCHEDULES),
    "widths": [lambda widths: None if widths else "needs at least one UNet stage width", each(at_least(1))],
    "seed": between(0, 2**32 - 1),
    "num_workers": at_least(0),
    "accelerator": one_of(_accelerators),
    "num_devices": at_least(1),
    "num_nodes": at_least(1),
    "min_confidence": between(0, 1),
    "classifier": non_empty,
    "figure_tiles": at_least(1),
    "model": one_of(list(SEGMENTATION_MODELS)),
    "loss": one_of(["ce", "clip"]),
    "clip_start": positive(),
    "clip_window": at_least(1),
    "optimizer": one_of(["adamw", "sgd"]),
    "encoder_lr_scale": positive(),
    "patch_size": at_least(1),
    "embed_dim": at_least(1),
    "depth": at_least(1),
    "num_heads": at_least(1),
    "decoder_depth": at_least(0),
    "pretrained": non_empty,
    "encoder_checkpoint": non_empty,
    "window": at_least(1),
    "stride": at_least(1),
    "predict_scales": [length(1, 8), each(positive())],
}


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "refine",
        help=command_help("refine"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    bool_flag = argparse.BooleanOptionalAction
    p.add_argument("--config", help="YAML file of settings (keys as the RefineConfig fields)")
    p.add_argument("--datadir", help="dataset root")
    p.add_argument("--pseudomasks", help="iteration-0 mask folder (weakseg pseudomasks --output)")
    p.add_argument("--output", help="output folder")
    p.add_argument("--model_checkpoint", type=Path,
                   help="the classifier that made the pseudomasks: its data settings (modality, normalisation, "
                        "stats) and image-label probabilities are used")
    p.add_argument("--label_weighting", action=bool_flag,
                   help="weight the UNet's class probabilities by the classifier's image-label probabilities "
                        "(default on when --model_checkpoint is given)")
    p.add_argument("--split", help="pseudo-labelled split to train on (default: validation)")
    p.add_argument("--eval_split", help="held-out split to predict and score after each iteration (test)")
    p.add_argument("--dataset", choices=["dfc2020", "folder", "voc"], help="reader (default: dfc2020)")
    p.add_argument("--multimodal", action=bool_flag, help="Sentinel-1 + Sentinel-2 inputs (15 channels)")
    p.add_argument("--normalization", choices=["none", "per_image_max", "standardize"])
    p.add_argument("--iterations", type=int, help=f"refinement iterations after iteration 0 (default {DEFAULT_ITERATIONS})")
    p.add_argument("--epochs", type=int, help=f"training epochs per iteration (default {DEFAULT_EPOCHS})")
    p.add_argument("--batch_size", type=int, help="training batch per device (default 16)")
    segmenter_recipe = MODEL_RECIPES["segmenter"]
    p.add_argument("--learning_rate", type=float,
                   help=f"base learning rate (default per --model: unet {DEFAULT_LR:g}, segmenter "
                        f"{segmenter_recipe['lr']:g})")
    p.add_argument("--lr_schedule", choices=list(LR_SCHEDULES),
                   help=f"learning rate over each iteration: cosine decay to 0, poly (WeakTr's phase 2) or constant "
                        f"(default per --model: unet {DEFAULT_LR_SCHEDULE}, segmenter {segmenter_recipe['lr_schedule']})")
    p.add_argument("--min_confidence", type=float,
                   help="in [0, 1]: target pixels whose confidence is below it are ignored by the loss, in "
                        "every iteration (iteration 1 reads <pseudomasks>/confidence/; a folder without it "
                        f"counts every pixel as confident) (default {DEFAULT_MIN_CONFIDENCE:g}: keep all)")
    p.add_argument("--widths", type=int, nargs="+", help="UNet stage widths (default 16 32 64 128)")
    p.add_argument("--seed", type=int, help="iteration i uses seed + i (default 0)")
    p.add_argument("--augment", action=bool_flag, help="joint random flips and 90-degree rotations (on)")
    p.add_argument("--supervised", action=bool_flag, help="train on the ground-truth masks (upper bound)")
    p.add_argument("--num_workers", type=int)
    p.add_argument("--num_devices", type=int, help="devices; >1 trains with DDP")
    p.add_argument("--num_nodes", type=int, help="machines, each with --num_devices devices (SLURM or torchrun)")
    p.add_argument("--accelerator", help="auto, cpu, gpu")
    p.add_argument("--figures", action=bool_flag,
                   help="draw <output>/figures/: per-iteration panels of --figure_tiles sampled tiles and the mIoU "
                        "per iteration (default on; --no-figures skips them)")
    p.add_argument("--figure_tiles", type=int, help="tiles drawn in the panels (default 4, a fixed seeded sample)")
    g = p.add_argument_group("network and loss (WeakTr's phase 2: --model segmenter --loss clip --optimizer sgd "
                             "--lr_schedule poly; ViT models: " + ", ".join(VIT_ENCODER_MODELS) + ")")
    g.add_argument("--model", choices=list(SEGMENTATION_MODELS),
                   help="segmentation network: unet (default), segmenter (ViT encoder + mask transformer), or a head "
                        "on the ViT encoder's patch tokens: vit_linear (linear per token -> its p x p block), "
                        "setr_naive (SETR: 1x1 conv, BN, ReLU, 1x1 conv, bilinear up), setr_pup (SETR's progressive "
                        "upsampling: log2(patch size) stages of 3x3 conv, BN, ReLU, x2 up)")
    g.add_argument("--loss", choices=["ce", "clip"],
                   help="ce: cross-entropy ignoring 255 (default); clip: WeakTr's gradient-clipping loss")
    g.add_argument("--clip_start", type=float, help="clip: no clipping while the batch-mean loss is above it (1.2)")
    g.add_argument("--clip_window", type=int,
                   help="clip: window side in pixels (default: a quarter of the tile side, WeakTr's 4 x 4 grid)")
    g.add_argument("--optimizer", choices=["adamw", "sgd"],
                   help="adamw (default) or sgd (Nesterov, momentum 0.9, no weight decay: WeakTr's phase 2 for a "
                        "pretrained encoder)")
    g.add_argument("--encoder_lr_scale", type=float,
                   help="ViT models: encoder learning-rate multiplier (default "
                        f"{segmenter_recipe['encoder_lr_scale']:g}; WeakTr fine-tunes a pretrained encoder at 0.1)")
    g.add_argument("--freeze_encoder", action=bool_flag,
                   help="ViT models: train the decoder / head only; the encoder is not trained and stays in eval "
                        "mode (a linear probe with vit_linear) (off)")
    g.add_argument("--patch_size", type=int, help="ViT models: encoder patch size (8; setr_pup: a power of two)")
    g.add_argument("--embed_dim", type=int, help="ViT models: encoder width (96)")
    g.add_argument("--depth", type=int, help="ViT models: encoder blocks (4)")
    g.add_argument("--num_heads", type=int, help="ViT models: attention heads (6)")
    g.add_argument("--decoder_depth", type=int, help="segmenter: mask-transformer blocks (2)")
    g.add_argument("--pretrained", help="ViT models: local timm / DeiT / DINO ViT checkpoint for the encoder")
    g.add_argument("--encoder_checkpoint",
                   help="ViT models: a weakseg classifier checkpoint whose backbone initialises the encoder (its patch "
                        "size, width, depth and heads become the encoder's; its pruned heads start switched off)")
    g.add_argument("--window", type=int, help="ViT models: sliding-window side for prediction (default: whole tile)")
    g.add_argument("--stride", type=int, help="ViT models: sliding-window stride (default: the window)")
    g.add_argument("--predict_scales", type=float, nargs="+",
                   help="prediction scales whose softmax is averaged (default 1)")
    g.add_argument("--predict_flip", action=bool_flag, help="add each prediction scale's flipped view (off)")
    p.set_defaults(run=run)


def checkpoint_data_settings(path: Path) -> dict[str, Any]:
    """The classifier checkpoint's input settings (dataset, modality, normalisation, band stats) as fields."""
    from weakseg.tasks import classification

    data_config = classification.load_classifier(path).hparams.get("data_config")
    if not data_config:
        raise ConfigError(
            f"checkpoint {path} records no data_config (--model_checkpoint); pass the settings as flags"
        )
    settings = {key: data_config[key] for key in CHECKPOINT_DATA_KEYS if data_config.get(key) is not None}
    if settings.get("band_stats") is not None:
        settings["band_stats"] = [list(map(float, values)) for values in settings["band_stats"]]
    return settings


def resolve_refine_config(args: argparse.Namespace) -> RefineConfig:
    """Defaults < classifier checkpoint < ``--config`` YAML < explicit flags, every value checked.

    The YAML file and the flags are checked before the checkpoint is read, so a wrong value fails at once.
    """
    flags = explicit_args(args, exclude=("config", "model_checkpoint", "multimodal"))
    flags = {_FLAG_TO_FIELD.get(key, key): value for key, value in flags.items()}
    if "multimodal" in args:
        flags["modality"] = "s1s2" if args.multimodal else "s2"
    config_file = getattr(args, "config", None)
    yaml_layer = load_yaml(config_file) if config_file else {}
    for layer in (yaml_layer, flags):  # 'none' is the spelling of "no held-out split" in both
        if isinstance(layer.get("eval_split"), str) and layer["eval_split"].strip() in ("none", "None", ""):
            layer["eval_split"] = None
    yaml_source, flag_source = f"config file {config_file}", FLAGS
    check_layer(RefineConfig, yaml_layer, yaml_source, REFINE_CHECKS)
    check_layer(RefineConfig, flags, flag_source, REFINE_CHECKS, _FIELD_TO_FLAG)
    for key, flag, what in (("datadir", "datadir", "a dataset folder"), ("output_dir", "output", "an output folder")):
        if not (flags.get(key) or yaml_layer.get(key)):
            raise ConfigError(f"refine needs {what} (--{flag})")
    checkpoint = getattr(args, "model_checkpoint", None)
    checkpoint_layer = {**checkpoint_data_settings(checkpoint), "classifier": str(checkpoint)} if checkpoint else {}
    model = flags.get("model") or yaml_layer.get("model") or "unet"
    encoder = flags.get("encoder_checkpoint") or yaml_layer.get("encoder_checkpoint")
    encoder_layer = encoder_shape(Path(encoder), yaml_layer, yaml_source, flags) if encoder else {}
    base = {"pseudomasks": None}
    return resolve(RefineConfig, base, model_recipe(model), checkpoint_layer, encoder_layer, yaml_layer, flags,
                   checks=REFINE_CHECKS, flag_names=_FIELD_TO_FLAG,
                   source_names=["defaults", f"the {model} recipe", f"checkpoint {checkpoint}",
                                 f"encoder checkpoint {encoder}", yaml_source, flag_source])


#: ViT-encoder settings an ``--encoder_checkpoint`` fixes (the classifier's ViTConfig fields of the same names).
ENCODER_SHAPE_KEYS = ("patch_size", "embed_dim", "depth", "num_heads")


def encoder_shape(path: Path, yaml_layer: dict[str, Any], yaml_source: str, flags: dict[str, Any]) -> dict[str, Any]:
    """The encoder shape of a classifier checkpoint (patch size, width, depth, heads), refusing a YAML or flag
    value that contradicts it before anything runs."""
    from weakseg.tasks import classification

    if not path.is_file():
        raise ConfigError(f"encoder checkpoint {path} does not exist (--encoder_checkpoint)")
    config = classification.load_classifier(path).model_config
    shape = {key: int(getattr(config, key)) for key in ENCODER_SHAPE_KEYS}
    for layer, source in ((yaml_layer, yaml_source), (flags, FLAGS)):
        for key, value in shape.items():
            if key in layer and int(layer[key]) != value:
                name = f"--{key}" if source == FLAGS else f"{key} ({source})"
                raise ConfigError(f"{name} is {layer[key]} but the classifier of --encoder_checkpoint {path} has "
                                  f"{key} {value}; an encoder initialised from it takes its shape")
    return shape


def run(args: argparse.Namespace) -> int:
    refine(resolve_refine_config(args))
    return 0
