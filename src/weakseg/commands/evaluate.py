"""``weakseg evaluate``: score one or several prediction folders against a split's ground truth.

Prints OA, AA (the official DFC2020 score), mIoU, coverage and per-class IoU as a table, one row per folder,
and writes every number (confusion matrices included) to a JSON file. Metric conventions: ``datasets.md``
section 4 and :mod:`weakseg.evaluation.metrics` (pseudomasks of Hanna, Mommert and Borth, "Sparse Multimodal
Vision Transformer for Weakly Supervised Semantic Segmentation", CVPRW 2023, or any other method).

Example::

    weakseg evaluate --predictions runs/a/pseudomasks runs/b/pseudomasks --names attention gradcam \\
        --datadir data/DFC2020 --split validation --output runs/scores_validation.json

**Which reader.** ``--dataset`` defaults to the one the predictions were made for (the ``dataset`` of a
``weakseg pseudomasks`` folder's ``run.json``), else ``folder`` when ``--datadir`` holds a ``classes.txt``, else
``dfc2020``; the choice is printed.

**Where the scores go.** ``--output`` (default: ``<first folder>_scores_<split>.json`` beside the first prediction
folder, named after it, so scoring another folder never replaces these scores) with the figures beside it
(``<stem>_confusion.png``: row-normalised confusion matrices; ``<stem>_iou.png``: IoU per class; ``--no-figures``
to skip). An existing scores file is never replaced silently: ``--overwrite`` replaces it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from weakseg.commands import command_help
from weakseg.errors import ConfigError
from weakseg.evaluation.compare import compare_folders
from weakseg.evaluation.metrics import format_scores_table
from weakseg.io import atomic_write_json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``evaluate`` sub-command; the CLI dispatches with ``args.run(args)``."""
    parser = subparsers.add_parser(
        "evaluate",
        help=command_help("evaluate"),
        description=(
            "Score one or several folders of <id>.tif / <id>.png prediction masks (255 = unlabelled) against "
            "the ground truth of a split. Unlabelled pixels count as wrong and are reported as coverage. "
            "A mask holding any other value outside the class ids (e.g. a negative id) is an error naming "
            "the file."
        ),
    )
    parser.add_argument(
        "--predictions", type=Path, nargs="+", required=True, metavar="DIR",
        help="prediction folders to score"
    )
    parser.add_argument(
        "--names", nargs="+", metavar="NAME", help="one name per prediction folder (default: folder names)"
    )
    parser.add_argument("--datadir", type=Path, required=True, metavar="ROOT", help="dataset root folder")
    parser.add_argument(
        "--split", required=True, help="split whose ground truth is used (DFC2020: validation or test; folder: all or a split list)"
    )
    parser.add_argument(
        "--dataset", choices=("dfc2020", "folder", "voc"), default=None,
        help="dataset layout (default: the one the predictions were made for, else folder when --datadir has a "
             "classes.txt, else dfc2020)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="scores JSON to write (default: <first folder>_scores_<split>.json beside the first prediction folder)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing scores file")
    parser.add_argument("--no-figures", dest="figures", action="store_false",
                        help="do not draw the confusion matrices and IoU bars")
    parser.add_argument(
        "--allow_missing",
        action="store_true",
        help="evaluate only the tiles that have a mask instead of failing when some are missing",
    )
    parser.add_argument(
        "--allow_extra",
        action="store_true",
        help="ignore masks of tiles that are not in the split instead of failing",
    )
    parser.set_defaults(run=run, uses_lightning=False)


def _method_names(folders: list[Path], names: list[str] | None) -> list[str]:
    """The row names: ``--names`` if given, else folder names (full paths where two folder names collide)."""
    if names is not None:
        if len(names) != len(folders):
            raise ConfigError(f"--names gives {len(names)} names for {len(folders)} --predictions folders")
        if len(set(names)) != len(names):
            raise ConfigError(f"--names must be unique, got {names}")
        return list(names)
    base_names = [folder.resolve().name or str(folder) for folder in folders]
    if len(set(base_names)) == len(base_names):
        return base_names
    paths = [str(folder) for folder in folders]
    if len(set(paths)) != len(paths):
        raise ConfigError(f"a prediction folder is given twice: {paths}")
    return paths


def run(args: argparse.Namespace) -> int:
    """Score ``args.predictions`` on ``args.split`` of ``args.datadir``; print the table, write the JSON."""
    folders = [Path(folder) for folder in args.predictions]
    names = _method_names(folders, args.names)

    from weakseg.data import guess_dataset_kind, open_dataset  # here: the module loads without the readers

    output = default_output(folders[0], args.split) if args.output is None else Path(args.output)
    if output.exists() and not getattr(args, "overwrite", False):
        raise ConfigError(f"{output} exists (scores of an earlier evaluation): pass --overwrite to replace it, or "
                          "--output another file")
    kind, why = (args.dataset, "--dataset") if args.dataset else guess_dataset_kind(Path(args.datadir), folders[0])
    if not args.dataset:
        print(f"dataset layout: {kind} ({why}; --dataset to choose)")
    ground_truth = open_dataset(kind, Path(args.datadir), args.split, modality=recorded_modality(folders[0]))
    results = compare_folders(
        dict(zip(names, folders, strict=True)),
        ground_truth,
        allow_missing=args.allow_missing,
        allow_extra=getattr(args, "allow_extra", False),
    )

    for result in results.values():
        for message in result["warnings"]:
            print(f"warning: {message}", file=sys.stderr)
    tiles = ", ".join(f"{name}: {result['tiles_evaluated']}" for name, result in results.items())
    print(f"{kind} {args.split} split of {args.datadir}; tiles evaluated: {tiles}")
    print(format_scores_table(results))

    atomic_write_json(
        output,
        {
            "dataset": kind,
            "datadir": str(args.datadir),
            "split": args.split,
            "results": results,
        },
    )
    print(f"wrote {output}")
    if getattr(args, "figures", True):
        for figure in write_figures(results, output):
            print(f"wrote {figure}")
    return 0


def recorded_modality(folder: Path) -> str:
    """The input modality the masks of ``folder`` were made from (its ``summary.json``), so pixels without data
    in any input band (S1 in ``s1s2``) are left out of the scores as they were out of the masks; ``s2`` else."""
    import json

    try:
        modality = json.loads((folder / "summary.json").read_text()).get("modality")
    except (OSError, ValueError, AttributeError):
        modality = None
    return modality if modality in ("s2", "s1s2") else "s2"


def default_output(first_folder: Path, split: str) -> Path:
    """``<folder>_scores_<split>.json`` beside ``first_folder`` (``:`` of a split part becomes ``-``)."""
    folder = first_folder.resolve()
    return folder.parent / f"{folder.name}_scores_{split.replace(':', '-').replace('/', '-')}.json"


def write_figures(results: dict, output: Path) -> list[Path]:
    """Confusion matrices and IoU bars beside ``output``; a drawing failure is a warning, never a failed run
    (the scores are written already)."""
    from weakseg.viz.evaluation import plot_confusion_matrices, plot_iou_bars

    stem = output.with_suffix("")
    try:
        return [plot_confusion_matrices(results, f"{stem}_confusion.png"), plot_iou_bars(results, f"{stem}_iou.png")]
    except Exception as e:  # noqa: BLE001 - figures are a convenience; the numbers are out
        print(f"warning: figures not drawn ({type(e).__name__}: {e})", file=sys.stderr)
        return []
