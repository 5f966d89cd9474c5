"""``weakseg prepare``: write a split's tiles once into a memory-mapped tile store, so every later run reads arrays
instead of decoding GeoTIFFs (:mod:`weakseg.data.tile_store`).

Example::

    weakseg prepare --datadir /data/DFC2020 --split validation test       # float16, S2: what `train` reads
    weakseg prepare --datadir /data/DFC2020 --modality s1s2                # for `train --multimodal`

The store goes to ``<datadir>/.weakseg_store/<dataset>-<split>-<modality>/`` (``--store DIR`` elsewhere, for one
split). Every command that opens the split (``train``, ``pseudomasks``, ``evaluate``, ``refine``) then reads it
from there while its source files are unchanged; a changed file makes the store stale (a warning says so and the
files are read). The store holds one modality: run ``prepare`` once per modality training reads (``--multimodal``
reads ``s1s2``). An up-to-date store is reused and nothing is rewritten; an interrupted ``prepare`` continues
where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from weakseg.commands import command_help

#: The split ``prepare`` writes when ``--split`` is not given, per dataset kind.
DEFAULT_SPLITS = {"dfc2020": "validation", "folder": "all", "voc": "train"}


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("prepare", help=command_help("prepare"), description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datadir", type=Path, required=True, metavar="ROOT", help="dataset root folder")
    p.add_argument("--dataset", choices=("dfc2020", "folder", "voc"), default=None,
                   help="dataset layout (default: folder when --datadir has a classes.txt, voc when it has "
                        "JPEGImages/, else dfc2020)")
    p.add_argument("--split", nargs="+", default=None, metavar="SPLIT",
                   help="split(s) to store (default: validation for DFC2020, all for a folder, train for VOC); a "
                        "part such as validation:train stores its whole split. `train` also reads its validation "
                        "split (DFC2020: test): pass --split validation test to store both")
    p.add_argument("--modality", choices=("s2", "s1s2"), default="s2",
                   help="channels stored: s2 (13 bands) or s1s2 (S2 then S1, 15 bands: what train --multimodal "
                        "reads). Run prepare once per modality used")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="float16 (default: half the disk and memory; the rounding error is measured and printed) "
                        "or float32 (bit-identical to reading the files)")
    p.add_argument("--store", type=Path, default=None, metavar="DIR",
                   help="store folder (default <datadir>/.weakseg_store/<dataset>-<split>-<modality>); one split "
                        "only. Readers find a store here only through open_dataset(store=DIR)")
    p.add_argument("--overwrite", action="store_true", help="rebuild even an up-to-date store")
    p.add_argument("--flush_every", type=int, default=32, metavar="N",
                   help="tiles between two progress checkpoints (what an interrupted run redoes at most)")
    p.set_defaults(run=run, uses_lightning=False)


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def run(args: argparse.Namespace) -> int:
    from weakseg.data import guess_dataset_kind, open_dataset
    from weakseg.data.splits import parse_split
    from weakseg.data.tile_store import default_store_path, prepare_store
    from weakseg.errors import ConfigError

    if args.flush_every < 1:
        raise ConfigError(f"--flush_every must be >= 1, got {args.flush_every}")
    kind = args.dataset
    if kind is None:
        kind, why = guess_dataset_kind(args.datadir)
        print(f"dataset: {kind} ({why}; --dataset to choose)")
    if args.modality != "s2" and kind != "dfc2020":
        raise ConfigError(f"--modality {args.modality} applies to DFC2020; a {kind} dataset is stored with its "
                          "images' own bands (--modality s2)")
    splits = list(dict.fromkeys(parse_split(s)[0] for s in (args.split or [DEFAULT_SPLITS[kind]])))
    for name in args.split or ():
        if parse_split(name)[1] is not None:
            print(f"note: a store holds the whole split {parse_split(name)[0]!r}; {name!r} reads it by tile id")
    if args.store is not None and len(splits) > 1:
        raise ConfigError(f"--store names one store folder, but {len(splits)} splits were given ({', '.join(splits)}): "
                          "run prepare once per split, or leave --store out")
    for split in splits:
        reader = open_dataset(kind, args.datadir, split, modality=args.modality, store=False)
        path = args.store if args.store is not None else default_store_path(kind, args.datadir, split, args.modality)
        print(f"tile store of split {split!r} ({kind}, {args.modality}, {args.dtype}, {len(reader)} tiles): {path}")
        result = prepare_store(reader, path, kind=kind, root=args.datadir, dtype=args.dtype,
                               overwrite=args.overwrite, flush_every=args.flush_every)
        _print_summary(result)
    if args.store is not None:
        print("note: a store outside the default location is read only through open_dataset(..., store=DIR)")
    sys.stdout.flush()
    return 0


def _print_summary(result: Any) -> None:
    meta = result.meta
    if result.status == "up to date":
        print(f"  up to date: {result.reused} tiles stored ({meta.get('dtype')}), sources unchanged; nothing "
              f"rewritten ({_size(result.bytes_on_disk)} on disk; --overwrite to rebuild)")
    else:
        if result.note:
            print(f"  rebuilt: {result.note}")
        print(f"  {result.status}: {result.written} tiles written, {len(result.skipped)} skipped, {result.reused} "
              f"reused in {result.seconds:.1f}s ({result.tiles_per_second:.1f} tiles/s); "
              f"{_size(result.bytes_on_disk)} on disk")
        if meta.get("dtype") == "float16":
            worst = max(meta["band_stats"], key=lambda b: b["max_abs_rounding_error"])
            values = f", values {worst['min']:.4g}..{worst['max']:.4g}" if worst["min"] is not None else ""
            print(f"  float16 rounding: max abs error {worst['max_abs_rounding_error']:.3g} (band {worst['band']}"
                  f"{values}); per band in {result.path / 'meta.json'}")
    for s in result.skipped[:20]:
        print(f"  skipped tile {s.id}: {s.reason}")
    if len(result.skipped) > 20:
        print(f"  ... and {len(result.skipped) - 20} more (all in {result.path / 'skipped_tiles.csv'})")
