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
from typing import Any

from weakseg import __version__
from weakseg.commands import COMMANDS
from weakseg.errors import WeaksegError
from weakseg.runtime import configure_threads

def build_parser(command: str | None = "all") -> argparse.ArgumentParser:
    """The ``weakseg`` parser with every sub-command listed.

    Args:
        command: the sub-command whose full parser is built (its module imported); the others get a stub that
            only lists them in ``weakseg --help``. "all" builds every command (tests, documentation); None none.
    """
    parser = argparse.ArgumentParser(
        prog="weakseg",
        description="Weakly supervised semantic segmentation with Vision Transformers (sparse gated ViT, DFC2020).",
    )
    parser.add_argument("--version", action="version", version=f"weakseg {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", default=False, help="only warnings and results")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, (module_name, summary) in COMMANDS.items():
        if command in ("all", name):
            importlib.import_module(f"weakseg.commands.{module_name}").add_parser(sub)
            add_threads_flag(sub.choices[name])
        else:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the message names the value)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    """``--threads`` on a sub-command (every one has it; :mod:`weakseg.runtime` explains the default). Absent from
    the namespace unless given, since a command turns its other arguments into its configuration."""
    parser.add_argument("--threads", type=positive_int, default=argparse.SUPPRESS, metavar="N",
                        help="CPU threads for the whole command, shared by its DDP ranks (default: OMP_NUM_THREADS "
                             "when set, else the CPUs this process may use)")


def chosen_command(argv: Sequence[str]) -> str | None:
    """The sub-command named in ``argv`` (the first argument that is not an option), or None."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def setup_logging(quiet: bool, lightning: bool = True) -> None:
    """weakseg's log lines on stderr; Lightning's loggers quietened when the command uses Lightning."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[CurrentStderrHandler()], force=True)
    logging.getLogger("weakseg").setLevel(logging.WARNING if quiet else logging.INFO)
    if lightning:
        quiet_lightning()
    # Plain GeoTIFFs/PNGs (the real DFC2020 sample, folder datasets) have no geotransform; weakseg never reads it.
    from rasterio.errors import NotGeoreferencedWarning

    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)


class CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is *now*, not the stream it saw when created.

    A handler bound to the ``sys.stderr`` of its creation kept writing to it after it was replaced and closed (by
    pytest's capture between tests, or an application embedding ``main``): "Logging error: I/O operation on
    closed file".
    """

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it; the current stderr is used instead
        pass


def quiet_lightning() -> None:
    """Lightning's tips (worker counts, GPU availability, cloud loggers) are noise for a CPU run of a small model.
    It sets its loggers to INFO when imported, so it is imported first and then quietened."""
    import lightning  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # A small holdout may lack a class; torchmetrics then warns once per epoch that its average precision is
    # undefined (it is reported as such); the macro F1 that chooses the checkpoint is unaffected.
    warnings.filterwarnings("ignore", message=".*No positive samples found in target.*")
    # config.yaml is written into the run folder before the CSV logger starts; nothing of ours is deleted.
    warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(chosen_command(argv))
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    # Before Lightning (and so torch) is imported by setup_logging: torch sizes its pool from OMP_NUM_THREADS.
    # Popped: commands turn their remaining arguments into their configuration, and threads are not a result's.
    configure_threads(vars(args).pop("threads", None), num_processes=getattr(args, "num_devices", None) or 1)
    setup_logging(args.quiet, lightning=getattr(args, "uses_lightning", True))
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
