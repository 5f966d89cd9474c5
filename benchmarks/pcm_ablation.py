"""ViT-PCM ablation: which of its parts make the masks, over several seeds, on the same data and seeds.

Trains the unpruned ViT-PCM classifier (``weakseg train --arch pcm``) in four variants per seed: the paper's
model (H-V BiLSTM, L2 term, equivariance loss), the linear patch classifier (no BiLSTM; weakseg's default since
this benchmark), no equivariance loss (``--pcm_et_weight 0``) and neither L2 nor equivariance, the last two with
the BiLSTM. Every variant names its head, so the table does not change with the default. Each variant runs
:func:`weakseg.pipeline.comparison.run_comparison` on the built-in data (as ``benchmarks/quality.py``: 204
``validation:train`` + 52 ``validation:holdout`` tiles, 64 ``test``; no refinement), so every ``--method pcm``
mode is scored with predicted labels and, on the holdout, with the ground-truth labels (the map stage's bound).
Printed: mean ± sd over seeds per variant and mode, and each variant minus the paper's model, paired by seed, on
the holdout. Usage::

    python benchmarks/pcm_ablation.py --seeds 0 1 2 --jobs 2 --output runs/pcm_ablation
    python benchmarks/pcm_ablation.py --aggregate runs/pcm_ablation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _seeds import mean_sd as _mean_sd
from _seeds import add_seed_arguments, seed_benchmark_main

#: Variant name -> (label, TrainConfig overrides).
VARIANTS: dict[str, tuple[str, dict]] = {
    "paper": ("BiLSTM + L2 + ET (paper)", {"pcm_head": "bilstm"}),
    "linear": ("linear classifier + L2 + ET", {"pcm_head": "linear"}),
    "no_et": ("BiLSTM + L2, no ET", {"pcm_head": "bilstm", "pcm_et_weight": 0.0}),
    "plain": ("BiLSTM, no L2, no ET", {"pcm_head": "bilstm", "pcm_et_weight": 0.0, "pcm_l2": 0.0}),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_seed_arguments(p, "runs/pcm_ablation", tiles=True)
    p.add_argument("--vit_epochs", type=int, default=30)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    return p


def run_one_seed(args: argparse.Namespace) -> None:
    """Every variant of one seed, in this process (called through a subprocess by :func:`main`)."""
    import torch

    torch.set_num_threads(args.threads)
    from weakseg.cli import setup_logging
    from weakseg.io import atomic_write_json
    from weakseg.pipeline.comparison import ComparisonConfig, run_comparison

    setup_logging(quiet=True)
    seed = args.seed_run
    results = {}
    for name in args.variants:
        out = args.output / f"seed{seed}" / name
        cfg = ComparisonConfig(datadir=str(args.output / "data"), output_dir=str(out), seed=seed,
                               vit_epochs=args.vit_epochs, iterations=0, supervised=False,
                               classifiers=("pcm_unpruned",), train_overrides=VARIANTS[name][1],
                               oracle_holdout=True)
        res = run_comparison(cfg, progress=lambda line, n=name: print(f"[seed {seed} {n}] {line}", flush=True))
        results[name] = [{k: r.get(k) for k in ("method", "label", "train", "holdout", "test", "holdout_oracle",
                                                 "checkpoint_score")} for r in res["rows"]]
    atomic_write_json(args.output / f"seed{seed}" / "ablation.json", results)


def aggregate(folder: Path) -> str:
    """The table over every ``seed*/ablation.json`` in ``folder``."""
    results = {int(p.parent.name[4:]): json.loads(p.read_text()) for p in sorted(folder.glob("seed*/ablation.json"))}
    if not results:
        raise SystemExit(f"no finished seed in {folder}")
    seeds = sorted(results)
    lines = [f"ViT-PCM (unpruned) ablation, mIoU (%) over seeds {seeds}: mean ± sd; predicted labels on the "
             "'validation:train' tiles, the holdout and 'test'; the holdout with ground-truth labels; holdout mAP",
             "", f"{'variant':<30} {'method':<48} {'train tiles':>13} {'holdout':>13} {'test':>13} "
                 f"{'holdout, GT':>13} {'mAP':>13}", "-" * 149]
    names = [n for n in VARIANTS if all(n in results[s] for s in seeds)]

    def value(seed: int, name: str, method: str, part: str) -> float | None:
        row = next((r for r in results[seed][name] if r["method"] == method), None)
        if row is None:
            return None
        if part == "map":
            return row["checkpoint_score"]
        return (row.get(part) or {}).get("miou")

    methods = [(r["method"], r["label"]) for r in results[seeds[0]][names[0]]]
    for name in names:
        for method, label in methods:
            cells = []
            for part in ("train", "holdout", "test", "holdout_oracle", "map"):
                vals = [v for s in seeds if (v := value(s, name, method, part)) is not None]
                cells.append(_mean_sd(vals))
            lines.append(f"{VARIANTS[name][0]:<30} {label:<48} " + " ".join(f"{c:>13}" for c in cells))
    if "paper" in names:
        lines += ["", "paired by seed, variant - the paper's model, holdout mIoU (predicted labels / ground-truth "
                  "labels):"]
        for name in names:
            if name == "paper":
                continue
            for method, label in methods:
                if method == "top_class":
                    continue
                pred = [value(s, name, method, "holdout") - value(s, "paper", method, "holdout") for s in seeds]
                gt = [value(s, name, method, "holdout_oracle") - value(s, "paper", method, "holdout_oracle")
                      for s in seeds]
                lines.append(f"  {VARIANTS[name][0]:<30} {label:<48} {_mean_sd(pred):>13} {_mean_sd(gt):>13}")
    return "\n".join(lines)


def main() -> None:
    args = get_args_parser().parse_args()
    forwarded = ["--vit_epochs", str(args.vit_epochs), "--variants", *args.variants]
    seed_benchmark_main(args, __file__, forwarded, run_one_seed, aggregate, "pcm_ablation.txt",
                        tiles=(args.train_tiles, args.test_tiles))


if __name__ == "__main__":
    main()
