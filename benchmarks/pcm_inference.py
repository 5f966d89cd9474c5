"""ViT-PCM inference settings: label masking x input scale on the quality benchmark's own PCM checkpoints.

``--method pcm`` has two choices the paper fixes for VOC with ground-truth labels: whether each pixel is
restricted to the image's labels (``--masking labels``, max-normalised per class) or takes the arg-max over
all classes (``--masking none``), and the input scale (the original infers at 2.5 x its training size,
``--scales 2.5``). This script scores every combination (and scale 2) on the ViT-PCM classifiers that
``benchmarks/quality.py`` trained (``<quality>/seed*/classifiers/pcm_*/checkpoints/best.ckpt``: the same
checkpoints as its table), with predicted labels on the ``validation:train`` tiles, the holdout and ``test``,
and on the holdout with ground-truth labels. The default is the combination with the best holdout mIoU over
the seeds (the holdout is part of the training split; nothing is chosen on ``test``). Usage::

    python benchmarks/pcm_inference.py --quality runs/quality_pcm
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _seeds import mean_sd

#: (label, --method pcm options) of every combination scored.
SETTINGS: list[tuple[str, dict[str, str]]] = [
    (f"masking {masking}, scale {scale}", {"masking": masking, "scales": scale})
    for masking in ("labels", "none") for scale in ("1", "2", "2.5")
]
PARTS = (("train", "validation:train"), ("holdout", "validation:holdout"), ("test", "test"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quality", type=Path, default=Path("runs/quality_pcm"), help="benchmarks/quality.py output")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from weakseg.cli import setup_logging
    from weakseg.data import open_dataset
    from weakseg.evaluation.compare import evaluate_folder
    from weakseg.pipeline.pseudomasks import generate_pseudomasks

    setup_logging(quiet=True)
    datadir = args.quality / "data"
    checkpoints = sorted(args.quality.glob("seed*/classifiers/pcm_*/checkpoints/best.ckpt"))
    if not checkpoints:
        raise SystemExit(f"no ViT-PCM checkpoint under {args.quality}/seed*/classifiers/pcm_*")
    out_root = args.quality / "pcm_inference"
    results: dict[str, dict[str, dict[str, float]]] = {}  # "seedS/classifier" -> setting -> part -> mIoU
    for ckpt in checkpoints:
        run = f"{ckpt.parents[3].name}/{ckpt.parents[1].name}"
        results[run] = {}
        for label, options in SETTINGS:
            scores = {}
            for part, split in (*PARTS, ("holdout_gt", "validation:holdout")):
                folder = out_root / run / f"{options['masking']}_{options['scales']}_{part}"
                generate_pseudomasks(ckpt, datadir, split, folder, "pcm", method_options=options,
                                     oracle=part == "holdout_gt", progress=False, overwrite=True, batch_size=64,
                                     figures=False)
                scores[part] = evaluate_folder(folder, open_dataset("dfc2020", datadir, split))["miou"]
            results[run][label] = scores
            print(f"{run:<24} {label:<26} " + "  ".join(f"{k} {100 * v:5.1f}" for k, v in scores.items()),
                  flush=True)
    (out_root / "results.json").write_text(json.dumps(results, indent=1))
    lines = [f"ViT-PCM inference settings over {len(results)} checkpoints ({', '.join(results)}), mIoU (%) mean ± "
             "sd: predicted labels on the train tiles, holdout and test; the holdout with ground-truth labels", "",
             f"{'classifier':<10} {'setting':<26} {'train tiles':>13} {'holdout':>13} {'test':>13} "
             f"{'holdout, GT':>13}", "-" * 93]
    best: dict[str, tuple[float, str]] = {}
    for clf in ("pcm_pruned", "pcm_unpruned"):
        runs = [r for r in results if r.endswith(clf)]
        for label, _ in SETTINGS:
            cells = [mean_sd([results[r][label][part] for r in runs]) for part in ("train", "holdout", "test",
                                                                                    "holdout_gt")]
            lines.append(f"{clf[4:]:<10} {label:<26} " + " ".join(f"{c:>13}" for c in cells))
            mean_holdout = statistics.fmean(results[r][label]["holdout"] for r in runs)
            if clf not in best or mean_holdout > best[clf][0]:
                best[clf] = (mean_holdout, label)
    lines.append("")
    lines += [f"best on the holdout ({clf}): {label} ({100 * v:.1f})" for clf, (v, label) in best.items()]
    table = "\n".join(lines)
    print("\n" + table)
    (out_root / "pcm_inference.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
