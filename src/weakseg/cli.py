"""The ``weakseg`` command: one sub-command per module in :mod:`weakseg.commands`.

User mistakes (:class:`~weakseg.errors.WeaksegError`) print ``error: <message>`` and exit with status 2;
everything else keeps its traceback, because it is a bug to report.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from weakseg import __version__
from weakseg.errors import WeaksegError

#: sub-command modules, in the order ``weakseg --help`` lists them.
COMMANDS = ("demo", "make_data", "train", "pseudomasks", "evaluate", "refine")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weakseg",
        description="Weakly supervised semantic segmentation with Vision Transformers (sparse gated ViT, DFC2020).",
    )
    parser.add_argument("--version", action="version", version=f"weakseg {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", default=False, help="only warnings and results")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"weakseg.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("weakseg.commands"):
                continue  # a command not built yet
            raise
        module.add_parser(sub)
    return parser


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    logging.getLogger("weakseg").setLevel(logging.WARNING if quiet else logging.INFO)
    # Lightning's tips (worker counts, GPU availability, cloud loggers) are noise for a CPU run of a small model.
    # It sets its loggers to INFO when imported, so import it first and then quieten them.
    import lightning  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # Plain GeoTIFFs/PNGs (the real DFC2020 sample, folder datasets) have no geotransform; weakseg never reads it.
    from rasterio.errors import NotGeoreferencedWarning

    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # A small holdout may lack a class; torchmetrics then warns once per epoch that its average precision is
    # undefined (it is reported as such); the macro F1 that chooses the checkpoint is unaffected.
    warnings.filterwarnings("ignore", message=".*No positive samples found in target.*")
    # config.yaml is written into the run folder before the CSV logger starts; nothing of ours is deleted.
    warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    setup_logging(args.quiet)
    try:
        return int(args.run(args) or 0)
    except WeaksegError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
