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
``summary.json``. Re-running skips finished iterations.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from weakseg.config import explicit_args, load_yaml, resolve
from weakseg.errors import ConfigError
from weakseg.pipeline.refine import (
    DEFAULT_EPOCHS,
    DEFAULT_ITERATIONS,
    DEFAULT_LR,
    DEFAULT_LR_SCHEDULE,
    DEFAULT_MIN_CONFIDENCE,
    LR_SCHEDULES,
    RefineConfig,
    refine,
)

#: Keys of a classifier's ``data_config`` that the refinement reuses.
CHECKPOINT_DATA_KEYS = ("dataset", "modality", "normalization", "band_stats")
#: Flag names that differ from the RefineConfig field they set.
_FLAG_TO_FIELD = {"output": "output_dir", "learning_rate": "lr"}


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "refine",
        help="refine pseudomasks with a UNet (or train the fully supervised upper bound)",
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
    p.add_argument("--dataset", choices=["dfc2020", "folder"], help="reader (default: dfc2020)")
    p.add_argument("--multimodal", action=bool_flag, help="Sentinel-1 + Sentinel-2 inputs (15 channels)")
    p.add_argument("--normalization", choices=["none", "per_image_max", "standardize"])
    p.add_argument("--iterations", type=int, help=f"refinement iterations after iteration 0 (default {DEFAULT_ITERATIONS})")
    p.add_argument("--epochs", type=int, help=f"training epochs per iteration (default {DEFAULT_EPOCHS})")
    p.add_argument("--batch_size", type=int, help="training batch per device (default 16)")
    p.add_argument("--learning_rate", type=float, help=f"AdamW learning rate (default {DEFAULT_LR:g})")
    p.add_argument("--lr_schedule", choices=list(LR_SCHEDULES),
                   help=f"learning rate over each iteration: cosine decay to 0 or constant "
                        f"(default {DEFAULT_LR_SCHEDULE})")
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
    p.add_argument("--accelerator", help="auto, cpu, gpu")
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
    """Defaults < classifier checkpoint < ``--config`` YAML < explicit flags."""
    flags = explicit_args(args, exclude=("config", "model_checkpoint", "multimodal"))
    flags = {_FLAG_TO_FIELD.get(key, key): value for key, value in flags.items()}
    if "multimodal" in args:
        flags["modality"] = "s1s2" if args.multimodal else "s2"
    if flags.get("eval_split") in ("none", "None", ""):
        flags["eval_split"] = None
    checkpoint = getattr(args, "model_checkpoint", None)
    checkpoint_layer = {**checkpoint_data_settings(checkpoint), "classifier": str(checkpoint)} if checkpoint else {}
    config_file = getattr(args, "config", None)
    yaml_layer = load_yaml(config_file) if config_file else {}
    base = {"datadir": None, "pseudomasks": None, "output_dir": None}
    cfg = resolve(RefineConfig, base, checkpoint_layer, yaml_layer, flags,
                  source_names=["defaults", f"checkpoint {checkpoint}", f"config file {config_file}",
                                "flags"])
    if not cfg.datadir:
        raise ConfigError("refine needs a dataset folder (--datadir)")
    if not cfg.output_dir:
        raise ConfigError("refine needs an output folder (--output)")
    return cfg


def run(args: argparse.Namespace) -> int:
    refine(resolve_refine_config(args))
    return 0
