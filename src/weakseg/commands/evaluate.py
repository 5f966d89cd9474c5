"""``weakseg evaluate``: score one or several prediction folders against a split's ground truth.

Prints OA, AA (the official DFC2020 score), mIoU, coverage and per-class IoU as a table, one row per folder,
and writes every number (confusion matrices included) to a JSON file. Metric conventions: ``datasets.md``
section 4 and :mod:`weakseg.evaluation.metrics` (pseudomasks of Hanna, Mommert and Borth, "Sparse Multimodal
Vision Transformer for Weakly Supervised Semantic Segmentation", CVPRW 2023, or any other method).

Example::

    weakseg evaluate --predictions runs/a/pseudomasks runs/b/pseudomasks --names attention gradcam \\
        --datadir data/DFC2020 --split validation --output runs/scores_validation.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from weakseg.errors import ConfigError
from weakseg.evaluation.compare import compare_folders
from weakseg.evaluation.metrics import format_scores_table
from weakseg.io import atomic_write_json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``evaluate`` sub-command; the CLI dispatches with ``args.run(args)``."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score prediction folders against ground-truth masks (OA, AA, mIoU, per-class IoU)",
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
        "--dataset", choices=("dfc2020", "folder"), default="dfc2020", help="dataset layout (default dfc2020)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="scores JSON to write (default: scores.json beside the first prediction folder)",
    )
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
    parser.set_defaults(run=run)


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

    from weakseg.data import open_dataset  # imported here so this module loads without the dataset readers

    ground_truth = open_dataset(args.dataset, Path(args.datadir), args.split)
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
    print(f"{args.dataset} {args.split} split of {args.datadir}; tiles evaluated: {tiles}")
    print(format_scores_table(results))

    output = Path(args.output) if args.output is not None else folders[0].resolve().parent / "scores.json"
    atomic_write_json(
        output,
        {
            "dataset": args.dataset,
            "datadir": str(args.datadir),
            "split": args.split,
            "results": results,
        },
    )
    print(f"wrote {output}")
    return 0
