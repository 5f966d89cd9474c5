"""Does a dense CRF improve the pseudomasks? Each method with and without ``--crf``, on the same classifiers.

Reuses the classifiers that ``benchmarks/quality.py`` trained (one folder per seed under its ``--output``, default
``runs/quality``) and the same built-in data, so the masks without CRF are those of the quality table. For every
seed, classifier and method below it writes the pseudomasks of ``validation:holdout`` (where a default would be
chosen) and of ``validation:train`` (the reported tiles), with predicted labels, without and with the CRF
(:mod:`weakseg.masks.crf`, WeakTr's phase-1 settings on the Sentinel-2 true-colour composite), and prints mIoU mean
± standard deviation over the seeds and the paired difference CRF - none::

    python benchmarks/quality.py --seeds 0 1 2 --jobs 2        # first, if runs/quality does not exist
    python benchmarks/crf.py --quality runs/quality             # about 3 min on 2 cores
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", type=Path, default=Path("runs/quality"), help="output folder of quality.py")
    parser.add_argument("--output", type=Path, default=Path("runs/crf"), help="where the masks go")
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
            ckpt = seed_dir / "classifiers" / classifier / "checkpoints" / "best.ckpt"
            for split in SPLITS:
                truth = open_dataset("dfc2020", data, split)
                for crf in (None, CRFSettings()):
                    name = "crf" if crf else "none"
                    out = args.output / seed_dir.name / classifier / f"{method}_{split.replace(':', '-')}_{name}"
                    generate_pseudomasks(ckpt, data, split, out, method, progress=False, overwrite=True,
                                         batch_size=64, figures=False, crf=crf)
                    miou = evaluate_folder(out, truth)["miou"]
                    results.setdefault(label, {}).setdefault(split, {}).setdefault(name, []).append(miou)
            print(f"[{time.time() - t0:5.0f}s] {seed_dir.name} {label}: " + ", ".join(
                f"{s} {100 * results[label][s]['none'][-1]:.1f} -> {100 * results[label][s]['crf'][-1]:.1f}"
                for s in SPLITS), flush=True)
    lines = [f"mIoU (%) without and with --crf, mean ± sd over {[p.name for p in seeds]}; predicted labels; "
             "paired difference CRF - none", "",
             f"{'pipeline':<48} {'split':<20} {'none':>12} {'crf':>12} {'crf - none':>12}"]
    for label, by_split in results.items():
        for split, v in by_split.items():
            diff = [c - n for c, n in zip(v["crf"], v["none"], strict=True)]
            lines.append(f"{label:<48} {split:<20} {mean_sd(v['none']):>12} {mean_sd(v['crf']):>12} "
                         f"{mean_sd(diff):>12}")
    lines.append(f"\ntotal {time.time() - t0:.0f}s")
    text = "\n".join(lines)
    print("\n" + text)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "crf.txt").write_text(text + "\n")
    (args.output / "crf.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
