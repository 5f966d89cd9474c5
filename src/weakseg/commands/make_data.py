"""``weakseg make-data``: write the built-in synthetic Sentinel-1/2 dataset in the DFC2020 layout."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from weakseg.commands import command_help


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "make-data",
        help=command_help("make-data"),
        description=__doc__,
    )
    p.add_argument("output", type=Path, help="dataset root to write")
    p.add_argument("--train_tiles", type=int, default=256, help="tiles in ROIs0000_validation (the training split)")
    p.add_argument("--test_tiles", type=int, default=64, help="tiles in ROIs0000_test")
    p.add_argument("--tile_size", type=int, default=64, help="tile side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a dataset written with other settings")
    p.set_defaults(run=run, uses_lightning=False)


def run(args: argparse.Namespace) -> int:
    from weakseg.data.synthetic import generate_synthetic_dfc2020

    summary = generate_synthetic_dfc2020(
        args.output,
        num_tiles={"validation": args.train_tiles, "test": args.test_tiles},
        tile_size=args.tile_size,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(f"synthetic DFC2020 data in {args.output}:")
    for key in ("num_tiles", "tile_size", "seed"):
        if key in summary:
            print(f"  {key}: {summary[key]}")
    return 0
