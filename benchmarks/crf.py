"""Do a dense CRF and multi-scale + flip inference improve the pseudomasks? Each method with and without them,
on the same classifiers.

Reuses the classifiers that ``benchmarks/quality.py`` trained (one folder per seed under its ``--output``, default
``runs/quality``) and the same built-in data, so the masks without CRF are those of the quality table. For every
seed, classifier and method below it writes the pseudomasks of ``validation:holdout`` (where a default would be
chosen) and of ``validation:train`` (the reported tiles), with predicted labels, without and with the CRF
(:mod:`weakseg.masks.crf`, WeakTr's phase-1 settings on the Sentinel-2 true-colour composite) or with the
class-map methods' multi-scale + flip inference (``--variants multiscale``: scales 1 and 1.5, each with its flip;
:func:`weakseg.methods.base.multiscale_class_maps`), and prints mIoU mean ± standard deviation over the seeds and
the paired difference variant - none::

    python benchmarks/quality.py --seeds 0 1 2 --jobs 2        # first, if runs/quality does not exist
    python benchmarks/crf.py --quality runs/quality             # the CRF, about 2 min on 2 cores
    python benchmarks/crf.py --quality runs/quality --variants multiscale --output runs/multiscale
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _seeds import mean_sd

from weakseg.cli import setup_logging
from weakseg.data import open_dataset
from weakseg.evaluation.compare import evaluate_folder
from weakseg.masks.crf import CRFSettings
from weakseg.pipeline.pseudomasks import generate_pseudomasks

#: (classifier folder, method, label) of the quality benchmark's default methods.
CASES = [
    ("class_tokens_unpruned", "class_attention", "class tokens, unpruned + class attention"),
    ("class_tokens_pruned", "class_attention", "class tokens, pruned + class attention"),
    ("vit_unpruned", "gradcam", "ViT (1 CLS), unpruned + Grad-CAM"),
    ("vit_unpruned", "attention", "ViT (1 CLS), unpruned + attention clustering"),
]
SPLITS = ("validation:holdout", "validation:train")
#: variant -> (CRF settings or None, extra method options, methods it applies to or None for all)
VARIANTS: dict[str, tuple[CRFSettings | None, dict[str, str], tuple[str, ...] | None]] = {
    "crf": (CRFSettings(), {}, None),
    "multiscale": (None, {"scales": "1,1.5", "flip": "on"}, ("class_attention", "gradcam")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", type=Path, default=Path("runs/quality"), help="output folder of quality.py")
    parser.add_argument("--output", type=Path, default=Path("runs/crf"), help="where the masks go")
    parser.add_argument("--variants", nargs="+", default=["crf"], choices=sorted(VARIANTS),
                        help="what is compared with the plain masks (default crf)")
    args = parser.parse_args()
    setup_logging(quiet=True)  # Lightning's per-run banners would bury the lines below
    data = args.quality / "data"
    seeds = sorted(p for p in args.quality.glob("seed*") if (p / "classifiers").is_dir())
    if not seeds or not data.is_dir():
        raise SystemExit(f"no seed folders or data in {args.quality}: run benchmarks/quality.py first")
    t0 = time.time()
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for seed_dir in seeds:
        for classifier, method, label in CASES:
            variants = [v for v in args.variants if VARIANTS[v][2] is None or method in VARIANTS[v][2]]
            if not variants:
                continue
            ckpt = seed_dir / "classifiers" / classifier / "checkpoints" / "best.ckpt"
            for split in SPLITS:
                truth = open_dataset("dfc2020", data, split)
                for name in ["none", *variants]:
                    crf, options, _ = VARIANTS.get(name, (None, {}, None))
                    out = args.output / seed_dir.name / classifier / f"{method}_{split.replace(':', '-')}_{name}"
                    generate_pseudomasks(ckpt, data, split, out, method, method_options=options, progress=False,
                                         overwrite=True, batch_size=64, figures=False, crf=crf)
                    miou = evaluate_folder(out, truth)["miou"]
                    results.setdefault(label, {}).setdefault(split, {}).setdefault(name, []).append(miou)
            print(f"[{time.time() - t0:5.0f}s] {seed_dir.name} {label}: " + ", ".join(
                f"{s} " + " / ".join(f"{n} {100 * v[-1]:.1f}" for n, v in results[label][s].items())
                for s in SPLITS), flush=True)
    lines = [f"mIoU (%) without and with {', '.join(args.variants)}, mean ± sd over {[p.name for p in seeds]}; "
             "predicted labels; paired difference variant - none", "",
             f"{'pipeline':<48} {'split':<20} {'none':>12} " + " ".join(f"{v:>12} {v + ' - none':>14}"
                                                                       for v in args.variants)]
    for label, by_split in results.items():
        for split, v in by_split.items():
            cells = []
            for name in args.variants:
                if name in v:
                    diff = [c - n for c, n in zip(v[name], v["none"], strict=True)]
                    cells.append(f"{mean_sd(v[name]):>12} {mean_sd(diff):>14}")
                else:
                    cells.append(f"{'':>12} {'':>14}")
            lines.append(f"{label:<48} {split:<20} {mean_sd(v['none']):>12} " + " ".join(cells))
    lines.append(f"\ntotal {time.time() - t0:.0f}s")
    text = "\n".join(lines)
    print("\n" + text)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.txt").write_text(text + "\n")
    (args.output / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
