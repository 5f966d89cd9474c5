"""Quality benchmark: every pseudomask method on the same classifiers, over several seeds, with mean and spread.

Runs :func:`weakseg.pipeline.comparison.run_comparison` (what ``weakseg demo`` runs once) for each seed on the
built-in synthetic data (256 training tiles split into 204 ``validation:train`` + 52 ``validation:holdout``, 64
``test`` tiles of 64 x 64; data seed 0), each seed in its own process with one thread (several seeds run at
once; the default thread count made concurrent runs 10x slower on 2 cores). Then it prints, per classifier and
method, the mean and standard deviation over seeds of the pseudomask mIoU on the ``validation:train`` tiles (and
on the holdout), the refined rows of each seed's best pipeline, and the checks of the class-attention issue:

- class attention >= Grad-CAM + 3 mIoU on the same classifier (pruned and unpruned), predicted labels;
- attention clustering's default assignment > the paper's rank rule;
- refinement iteration 1 above its input masks on the pseudo-labelled tiles, and its test mIoU at least the input
  masks' mIoU.

Every table row is one checkpoint per seed (the classifier's ``best.ckpt``, chosen on the holdout's image
labels). Usage::

    python benchmarks/quality.py --seeds 0 1 2 --jobs 2 --output runs/quality
    python benchmarks/quality.py --aggregate runs/quality   # print the table of finished seeds again
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _seeds import mean_sd as _mean_sd
from _seeds import add_seed_arguments, seed_benchmark_main


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_seed_arguments(p, "runs/quality", tiles=True)
    p.add_argument("--vit_epochs", type=int, default=30)
    p.add_argument("--unet_epochs", type=int, default=30)
    p.add_argument("--iterations", type=int, default=1, help="refinement iterations of each seed's best pipeline")
    return p


def run_one_seed(args: argparse.Namespace) -> None:
    """One seed, in this process (called through a subprocess by :func:`main`)."""
    import torch

    torch.set_num_threads(args.threads)
    from weakseg.cli import setup_logging
    from weakseg.pipeline.comparison import CLASSIFIERS, ComparisonConfig, run_comparison

    setup_logging(quiet=True)
    seed = args.seed_run
    out = args.output / f"seed{seed}"
    cfg = ComparisonConfig(datadir=str(args.output / "data"), output_dir=str(out), seed=seed,
                           vit_epochs=args.vit_epochs, unet_epochs=args.unet_epochs, iterations=args.iterations,
                           classifiers=tuple(c.name for c in CLASSIFIERS), refine_best_of=("weaktr", "pcm"),
                           oracle_holdout=True)
    run_comparison(cfg, progress=lambda line: print(f"[seed {seed}] {line}", flush=True))


def aggregate(folder: Path) -> str:
    """The table over every ``seed*/results.json`` in ``folder``, and the issue's checks."""
    results = {int(p.parent.name[4:]): json.loads(p.read_text()) for p in sorted(folder.glob("seed*/results.json"))}
    if not results:
        raise SystemExit(f"no finished seed in {folder}")
    seeds = sorted(results)
    keys: list[tuple[str, str]] = []
    labels: dict[tuple[str, str], tuple[str, str]] = {}
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    for seed in seeds:
        for r in results[seed]["rows"]:
            if r["method"].startswith(("refined", "supervised")):
                continue
            key = (r["classifier"], r["method"])
            if key not in values:
                keys.append(key)
                labels[key] = (r["classifier_label"], r["label"])
                values[key] = {"train": [], "holdout": [], "test": [], "oracle": []}
            values[key]["train"].append(r["train"]["miou"])
            values[key]["holdout"].append(r["holdout"]["miou"])
            if r.get("holdout_oracle"):
                values[key]["oracle"].append(r["holdout_oracle"]["miou"])
            if r.get("test"):
                values[key]["test"].append(r["test"]["miou"])
    lines = [f"mIoU (%) over seeds {seeds}: mean ± standard deviation; predicted labels; pseudomasks of the "
             "'validation:train' tiles, of the 'validation:holdout' tiles and of the 'test' tiles; last column: the "
             "holdout with the ground-truth image labels (the map stage's bound, never used to choose)",
             "", f"{'classifier':<24} {'method':<46} {'train tiles':>13} {'holdout':>13} {'test':>13} "
                 f"{'holdout, GT labels':>19}", "-" * 133]
    for key in keys:
        clf, method = labels[key]
        oracle = _mean_sd(values[key]["oracle"]) if values[key]["oracle"] else "-"
        lines.append(f"{clf:<24} {method:<46} {_mean_sd(values[key]['train']):>13} "
                     f"{_mean_sd(values[key]['holdout']):>13} {_mean_sd(values[key]['test']):>13} {oracle:>19}")

    def diffs(classifier: str, a: str, b: str, part: str = "train") -> list[float]:
        out = []
        for seed in seeds:
            rows = {(r["classifier"], r["method"]): r for r in results[seed]["rows"]}
            if (classifier, a) in rows and (classifier, b) in rows:
                out.append(rows[(classifier, a)][part]["miou"] - rows[(classifier, b)][part]["miou"])
        return out

    rates: dict[tuple[str, str], list[float]] = {}
    for seed in seeds:
        for r in results[seed]["rows"]:
            a = r.get("assignment")
            if a and a.get("checked"):
                rates.setdefault((r["classifier_label"], r["label"]), []).append(a["best"] / a["checked"])
    if rates:
        lines += ["", "attention clustering: share of multi-label train tiles whose cluster -> label assignment is "
                  "the best possible one (checked against the ground truth):"]
        lines += [f"  {clf:<24} {method:<46} {_mean_sd(v):>13}" for (clf, method), v in rates.items()]
    lines += ["", "checks of the class-attention issue (train tiles, mean over seeds):"]
    for clf in ("class_tokens_pruned", "class_tokens_unpruned"):
        d = diffs(clf, "class_attention", "gradcam")
        if d:
            ok = statistics.fmean(d) >= 0.03
            lines.append(f"  {clf}: class attention - Grad-CAM = {_mean_sd(d)} mIoU (need >= +3.0): "
                         f"{'PASS' if ok else 'FAIL'}")
    for clf in ("vit_pruned", "vit_unpruned"):
        d = diffs(clf, "attention", "attention_rank")
        if d:
            ok = statistics.fmean(d) > 0
            lines.append(f"  {clf}: attention default rule - rank rule = {_mean_sd(d)} mIoU (need > 0): "
                         f"{'PASS' if ok else 'FAIL'}")
    weaktr_pairs = [("weaktr_released", "gradcam"), ("weaktr_fused", "gradcam"), ("weaktr_coarse", "gradcam"),
                    ("weaktr_fused", "weaktr_released"), ("weaktr_coarse", "weaktr_fused"),
                    ("class_attention", "weaktr_fused")]

    def paired_lines(classifiers: tuple[str, ...], pairs: list[tuple[str, str]]) -> list[str]:
        """Method a - method b on the same classifier, paired by seed, on the holdout and the train tiles."""
        out = []
        for clf in classifiers:
            for a, b in pairs:
                d_hold, d_train = diffs(clf, a, b, "holdout"), diffs(clf, a, b)
                if d_hold:
                    out.append(f"  {clf:<16} {a + ' - ' + b:<36} holdout {_mean_sd(d_hold):>13}   "
                               f"train tiles {_mean_sd(d_train):>13}")
        return out

    weaktr_lines = paired_lines(("weaktr_pruned", "weaktr_unpruned"), weaktr_pairs)
    if weaktr_lines:
        lines += ["", "WeakTr: paired differences on the same classifier (mIoU points, mean ± sd over seeds):",
                  *weaktr_lines]
    pcm_pairs = [("pcm", "gradcam"), ("pcm_hires", "pcm"), ("pcm_all", "pcm")]
    pcm_lines = paired_lines(("pcm_pruned", "pcm_unpruned"), pcm_pairs)
    for a, b in (("pcm_unpruned", "class_tokens_unpruned"), ("pcm_pruned", "class_tokens_pruned")):
        d = []
        for seed in seeds:
            rows = {(r["classifier"], r["method"]): r for r in results[seed]["rows"]}
            if (a, "pcm") in rows and (b, "class_attention") in rows:
                d.append(rows[(a, "pcm")]["holdout"]["miou"] - rows[(b, "class_attention")]["holdout"]["miou"])
        if d:
            pcm_lines.append(f"  {a + ' pcm - ' + b + ' class_attention':<53} holdout {_mean_sd(d):>13}")
    if pcm_lines:
        lines += ["", "ViT-PCM: paired differences (mIoU points, mean ± sd over seeds):", *pcm_lines]
    for family, name in (("weaktr", "WeakTr"), ("pcm", "ViT-PCM")):
        refined = [(seed, r) for seed in seeds for r in results[seed]["rows"] if r["method"] == f"refined_{family}_1"]
        if not refined:
            continue
        lines += ["", f"refinement of each seed's best {name} pipeline (chosen on the holdout among the {name} "
                  "classifiers' methods): input masks and iteration 1 on the train tiles, on 'test' (UNet x labels):"]
        gains = []
        for seed, r in refined:
            src = next(x for x in results[seed]["rows"] if x["classifier"] == r["classifier"]
                       and x["method"] == r["refines"])
            gains.append(r["train"]["miou"] - src["train"]["miou"])
            lines.append(f"  {seed:<5} {r['classifier_label'] + ' + ' + src['label']:<62} "
                         f"{100 * src['train']['miou']:6.1f} {100 * r['train']['miou']:7.1f} "
                         f"{100 * r['test']['miou']:6.1f}")
        lines.append(f"  iteration 1 - input masks on the train tiles: {_mean_sd(gains)}")
    lines += ["", "refinement of each seed's best pipeline (chosen on the holdout): mIoU of the input masks and of "
              "iteration 1 on the train tiles, on 'test' (UNet x classifier labels) and the UNet alone on 'test':",
              f"  {'seed':<5} {'pipeline':<62} {'input':>6} {'iter 1':>7} {'test':>6} {'alone':>6} "
              f"{'method on test':>15}"]
    gains, test_gaps, like_for_like = [], [], []
    for seed in seeds:
        res = results[seed]
        best = res["best"]
        input_row = next(r for r in res["rows"] if r["classifier"] == best["classifier"]
                         and r["method"] == best["method"])
        it1 = next((r for r in res["rows"] if r["method"] == "refined_1"), None)
        if it1 is None:
            continue
        gains.append(it1["train"]["miou"] - input_row["train"]["miou"])
        test_gaps.append(it1["test"]["miou"] - input_row["train"]["miou"])
        if input_row.get("test"):
            like_for_like.append(it1["test"]["miou"] - input_row["test"]["miou"])
        alone = (it1.get("test_unet_alone") or {}).get("miou")
        direct = (input_row.get("test") or {}).get("miou")
        lines.append(f"  {seed:<5} {best['label']:<62} {100 * input_row['train']['miou']:6.1f} "
                     f"{100 * it1['train']['miou']:7.1f} {100 * it1['test']['miou']:6.1f} "
                     f"{'-' if alone is None else f'{100 * alone:6.1f}'} "
                     f"{'-' if direct is None else f'{100 * direct:15.1f}'}")
    if gains:
        lines.append(f"  iteration 1 - input masks on the train tiles: {_mean_sd(gains)} (need > 0): "
                     f"{'PASS' if statistics.fmean(gains) > 0 else 'FAIL'}")
        lines.append(f"  iteration 1 test mIoU - input masks' mIoU (train tiles): {_mean_sd(test_gaps)} (need >= 0): "
                     f"{'PASS' if statistics.fmean(test_gaps) >= 0 else 'FAIL'}")
    if like_for_like:
        lines.append(f"  like for like on 'test': iteration 1 - the same method applied to the test tiles: "
                     f"{_mean_sd(like_for_like)}")
    sup = [r for seed in seeds for r in results[seed]["rows"] if r["method"] == "supervised"]
    if sup:
        alone = [r["test_unet_alone"]["miou"] for r in sup if r.get("test_unet_alone")]
        lines.append(f"  supervised UNet (upper bound): train tiles {_mean_sd([r['train']['miou'] for r in sup])}, "
                     f"test {_mean_sd([r['test']['miou'] for r in sup])}, test UNet alone {_mean_sd(alone)}")
    seconds = [results[s]["seconds"] for s in seeds]
    lines.append(f"\nseconds per seed: {', '.join(f'{s:.0f}' for s in seconds)}")
    return "\n".join(lines)


def main() -> None:
    args = get_args_parser().parse_args()
    forwarded = ["--vit_epochs", str(args.vit_epochs), "--unet_epochs", str(args.unet_epochs),
                 "--iterations", str(args.iterations)]
    seed_benchmark_main(args, __file__, forwarded, run_one_seed, aggregate, "quality.txt",
                        tiles=(args.train_tiles, args.test_tiles))


if __name__ == "__main__":
    main()
