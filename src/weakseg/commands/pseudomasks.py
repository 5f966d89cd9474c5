"""``weakseg pseudomasks``: stage 2, one label image per tile from a trained classifier.

Methods: ``attention`` (the sparse ViT paper: clustered CLS attention of the last block's kept heads; on a model
trained without ``--prune`` this is the "attention without pruning" baseline), ``gradcam`` (Grad-CAM on the same
ViT) and ``top_class`` (the floor: every pixel = the top predicted class). ``--oracle`` uses the ground-truth image
labels instead of the predicted ones. Output: ``<output>/<id>.tif`` (uint8, GeoTIFF with the input's georeference),
``manifest.csv`` (one row per tile), ``summary.json`` and ``run.json``. Re-running resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("pseudomasks", help="generate pseudomasks from a trained classifier",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_checkpoint", type=Path, required=True, help="classifier checkpoint (weakseg train)")
    p.add_argument("--datadir", type=Path, required=True, help="dataset root")
    p.add_argument("--split", default="validation", help="split to pseudo-label (default: validation, the training split)")
    p.add_argument("--dataset", choices=["dfc2020", "folder"], help="reader (default: the one the model was trained on)")
    p.add_argument("--method", choices=["attention", "gradcam", "top_class"], default="attention")
    p.add_argument("--oracle", action="store_true", help="use ground-truth image labels instead of predictions")
    p.add_argument("--relabel", action="store_true",
                   help="re-label each region by the classifier (paper step 8), restricted to the image's labels")
    p.add_argument("--threshold", type=float, default=0.5, help="probability above which a label is predicted")
    p.add_argument("--seed", type=int, default=24, help="k-means++ seed (the original's random_state)")
    p.add_argument("--output", type=Path, required=True, help="folder for the masks and the manifest")
    p.add_argument("--overwrite", action="store_true", help="replace the masks of another run in --output")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--num_devices", type=int, default=1)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                   help="score the masks when the split has ground-truth masks (default on)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from weakseg.data import open_dataset
    from weakseg.evaluation.compare import evaluate_folder
    from weakseg.evaluation.metrics import format_scores_table
    from weakseg.io import atomic_write_json
    from weakseg.pseudolabels.generate import generate_pseudomasks, print_summary

    summary = generate_pseudomasks(
        args.model_checkpoint, args.datadir, args.split, args.output, args.method, dataset=args.dataset,
        oracle=args.oracle, relabel=args.relabel, threshold=args.threshold, seed=args.seed,
        batch_size=args.batch_size, num_workers=args.num_workers, num_devices=args.num_devices,
        accelerator=args.accelerator, overwrite=args.overwrite,
    )
    if not summary:  # a non-zero DDP rank
        return 0
    print_summary(summary, args.output)
    if args.evaluate:
        reader = open_dataset(summary["dataset"], args.datadir, args.split)
        if getattr(reader, "has_masks", False) and not summary["skipped"]:
            scores = evaluate_folder(args.output, reader)
            atomic_write_json(args.output / "scores.json", scores)
            print()
            print(format_scores_table({args.method: scores}))
    return 0
