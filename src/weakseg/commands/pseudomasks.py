"""``weakseg pseudomasks``: stage 2, one label image per tile from a trained classifier.

Methods (``--method``, see ``weakseg.methods``): ``attention`` (the sparse ViT paper: k-means of the kept heads'
attention, clusters given classes by ``--assign``; ``--assign rank`` is the paper's rule), ``class_attention``
(class token c's attention is the map of class c; needs ``weakseg train --arch class_tokens``), ``gradcam``
(Grad-CAM on the same ViT) and ``top_class`` (the floor: every pixel = the top predicted class). ``--oracle`` uses
the ground-truth image labels instead of the predicted ones. Output: ``<output>/<id>.tif`` (uint8, GeoTIFF with
the input's georeference), ``<output>/confidence/<id>.tif`` (per-pixel confidence x 255), ``manifest.csv`` (one row
per tile, with each file's size and sha256), ``summary.json``, ``run.json`` and ``figures/`` (``--no-figures``
to skip). Re-running resumes: tiles whose files match their manifest row are kept, the rest redone. ``--output``
must not be inside ``--datadir``; a run holds a lock file (``.weakseg.lock``) in it, so a second run into the same
folder is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from weakseg.commands import command_help
from weakseg.errors import ConfigError
from weakseg.masks.crf import CRFSettings
from weakseg.methods import METHODS


def _method_option_fields() -> dict[str, tuple[dataclasses.Field, dict[str, Any]]]:
    """Every method option, once: flag name -> (a field defining it, {method: its default there})."""
    fields: dict[str, tuple[dataclasses.Field, dict[str, Any]]] = {}
    for name, cls in METHODS.items():
        for f in dataclasses.fields(cls.Options):
            fields.setdefault(f.name, (f, {}))[1][name] = f.default
    return fields


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("pseudomasks", help=command_help("pseudomasks"),
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_checkpoint", type=Path, required=True, help="classifier checkpoint (weakseg train)")
    p.add_argument("--datadir", type=Path, required=True, help="dataset root")
    p.add_argument("--split", default="validation",
                   help="split to pseudo-label (default: validation, the DFC2020 training split; "
                        "'validation:train' / 'validation:holdout' name its two parts)")
    p.add_argument("--dataset", choices=["dfc2020", "folder", "voc"], help="reader (default: the one the model was trained on)")
    p.add_argument("--method", choices=sorted(METHODS), default="attention",
                   help="; ".join(f"{n}: {c.summary}" for n, c in sorted(METHODS.items())))
    p.add_argument("--oracle", action="store_true", help="use ground-truth image labels instead of predictions")
    p.add_argument("--relabel", action="store_true",
                   help="re-label each region by the classifier (paper step 8), restricted to the image's labels")
    p.add_argument("--threshold", type=float, default=0.5, help="probability above which a label is predicted")
    g = p.add_argument_group("method options (each applies to the methods named in its help)")
    for flag, (f, defaults) in _method_option_fields().items():
        typ = f.type if isinstance(f.type, type) else {"int": int, "float": float}.get(str(f.type), str)
        where = "; ".join(f"{method}: default {value}" for method, value in defaults.items())
        g.add_argument(f"--{flag}", type=typ, default=argparse.SUPPRESS, choices=f.metadata.get("choices"),
                       help=f"[{where}] {f.metadata.get('help', '')}")
    p.add_argument("--output", type=Path, required=True, help="folder for the masks and the manifest")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another run's masks in --output (deletes only the files its manifest lists)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader workers per process (default: from the machine, 0 below 8 CPUs; weakseg.runtime)")
    p.add_argument("--store", metavar="DIR|none",
                   help="tile store of --split (weakseg prepare --store DIR); default: the one at "
                        "<datadir>/.weakseg_store/ when complete and fresh; none: read the files")
    p.add_argument("--num_devices", type=int, default=1)
    p.add_argument("--num_nodes", type=int, default=1,
                   help="machines, each with --num_devices devices (SLURM or torchrun; README 'Performance and scale')")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                   help="score the masks when the split has ground-truth masks (default on)")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                   help="draw <output>/figures/: image | ground truth | mask | confidence of --figure_tiles sampled "
                        "tiles and, for attention methods, the per-head maps of two of them (default on; "
                        "--no-figures skips)")
    p.add_argument("--figure_tiles", type=int, default=4, help="tiles drawn in the figures (default 4, seeded)")
    p.add_argument("--crf", action="store_true",
                   help="post-process every mask with a dense CRF on the tile's colours (Sentinel-2 true colour, RGB, "
                        "or bands 1-3); the classes of the mask only, unlabelled pixels stay unlabelled; needs the "
                        "optional extra: pip install 'weakseg[crf]'")
    p.add_argument("--crf_settings", nargs="+", default=[], metavar="KEY=VALUE",
                   help="CRF parameters other than WeakTr's phase-1 defaults ("
                        + ", ".join(f"{f.name}={f.default:g}" for f in dataclasses.fields(CRFSettings)) + ")")
    p.add_argument("--sweep_background", metavar="START:STOP:STEP",
                   help="instead of writing masks: score every background threshold t (e.g. 0.30:0.60:0.01) of "
                        "--rule background on the split's ground-truth masks and report the best (it uses masks: "
                        "sweep on a holdout such as train:holdout, report on another split); writes "
                        "<output>/background_sweep.json")
    p.set_defaults(run=run)


def crf_settings_from_args(args: argparse.Namespace) -> CRFSettings | None:
    """``--crf`` with its ``--crf_settings`` as :class:`CRFSettings`; None without ``--crf``."""
    if not getattr(args, "crf", False):
        if getattr(args, "crf_settings", None):
            raise ConfigError("--crf_settings needs --crf")
        return None
    fields = {f.name: f for f in dataclasses.fields(CRFSettings)}
    values: dict[str, Any] = {}
    for item in args.crf_settings:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"--crf_settings {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        cast = int if key == "iterations" else float
        try:
            values[key] = cast(text)
        except ValueError:
            raise ConfigError(f"--crf_settings {item!r}: {key} must be {'an integer' if cast is int else 'a number'}"
                              ) from None
    return CRFSettings(**values)


def method_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The method options given as flags; an option of another method is an error, not silently ignored."""
    given: dict[str, Any] = {}
    for flag, (_, defaults) in _method_option_fields().items():
        if flag in args:
            users = list(defaults)
            if args.method not in users:
                raise ConfigError(f"--{flag} applies to --method {' / '.join(users)}, not to --method {args.method}")
            given[flag] = getattr(args, flag)
    return given


def run(args: argparse.Namespace) -> int:
    from weakseg.data import open_dataset
    from weakseg.data.tile_store import store_for_split
    from weakseg.evaluation.compare import evaluate_folder
    from weakseg.evaluation.metrics import format_scores_table
    from weakseg.io import atomic_write_json
    from weakseg.pipeline.pseudomasks import generate_pseudomasks, print_summary
    from weakseg.runtime import default_num_workers

    if args.num_workers is None:
        args.num_workers = default_num_workers(args.num_devices)
    if args.sweep_background:
        return run_sweep(args)
    summary = generate_pseudomasks(
        args.model_checkpoint, args.datadir, args.split, args.output, args.method,
        method_options=method_options_from_args(args), dataset=args.dataset, oracle=args.oracle,
        relabel=args.relabel, threshold=args.threshold, batch_size=args.batch_size, num_workers=args.num_workers,
        num_devices=args.num_devices, num_nodes=args.num_nodes, accelerator=args.accelerator, overwrite=args.overwrite,
        figures=args.figures, figure_tiles=args.figure_tiles, crf=crf_settings_from_args(args), store=args.store,
    )
    if not summary:  # a non-zero DDP rank
        return 0
    print_summary(summary, args.output)
    if args.evaluate:
        reader = open_dataset(summary["dataset"], args.datadir, args.split, modality=summary.get("modality", "s2"),
                              store=store_for_split(args.store, args.split))
        why_not = scores_not_computed_because(summary, reader)
        if why_not:
            print(f"\nscores not computed: {why_not}")
        else:
            scores = evaluate_folder(args.output, reader)
            atomic_write_json(args.output / "scores.json", scores)
            print()
            print(format_scores_table({args.method: scores}))
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    """``--sweep_background``: the background threshold chosen on the split's masks, no masks written."""
    from weakseg.pipeline.background_sweep import parse_sweep, print_sweep, sweep_background_threshold

    if args.crf or args.relabel or args.num_devices != 1:
        raise ConfigError("--sweep_background scores the method's own masks on one device: leave out --crf, "
                          "--relabel and --num_devices")
    options = method_options_from_args(args)
    if options.get("rule", "background") != "background" or "background_threshold" in options:
        raise ConfigError("--sweep_background sets --rule background and tries every --background_threshold itself")
    summary = sweep_background_threshold(
        args.model_checkpoint, args.datadir, args.split, args.output, args.method, parse_sweep(args.sweep_background),
        method_options=options, dataset=args.dataset, oracle=args.oracle, threshold=args.threshold,
        batch_size=args.batch_size, num_workers=args.num_workers,
    )
    print_sweep(summary, args.output)
    return 0


def scores_not_computed_because(summary: dict[str, Any], reader: Any) -> str:
    """Why the masks are not scored (``""``: they are), printed so a missing table is never a silent surprise.

    With skipped tiles the run still succeeds (exit 0): skipping an unreadable tile with its reason in the
    manifest is the designed behaviour, and the masks written are usable. It is not scored, because a score over
    the readable tiles only would be compared with other methods' scores over all tiles as if it were the same.
    """
    if not getattr(reader, "has_masks", False):
        return f"split {summary['split']!r} has no ground-truth masks"
    skipped = len(summary["skipped"])
    if skipped:
        return (f"{skipped} of {summary['tiles']} tile(s) were skipped (unreadable, see manifest.csv), and a score "
                "over the other tiles would not be comparable; fix or remove those tiles and run again to score")
    return ""
