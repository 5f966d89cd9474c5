"""WeakTr's phase 2 on the quality benchmark's WeakTr masks: UNet + CE (the benchmark's own refinement) against
UNet + the gradient-clipping loss and Segmenter + the clipping loss, paired per seed.

For each seed of a finished ``benchmarks/quality.py`` folder, the masks of the best WeakTr pipeline (the one its
``refined_weaktr_1`` row refined, chosen on the holdout) are refined again with the same settings (30 epochs,
seed, the classifier's label weighting, ``test`` as the held-out split) but another loss or network. Segmenter's
encoder starts from scratch here (no ImageNet weights can be loaded on this machine), so it trains with the UNet's
optimiser (AdamW 3e-3, cosine) and ``--encoder_lr_scale 1``, not with WeakTr's fine-tuning recipe (SGD 1e-4,
encoder x 0.1), which assumes a pretrained encoder. Usage::

    python benchmarks/quality.py --seeds 0 1 2 --jobs 2 --output runs/quality_weaktr
    python benchmarks/weaktr_phase2.py --quality runs/quality_weaktr --jobs 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _seeds import mean_sd, run_seeds

VARIANTS = {
    "unet_clip": {"loss": "clip"},
    "segmenter_clip": {"model": "segmenter", "loss": "clip", "encoder_lr_scale": 1.0},
}


def run_one_seed(quality: Path, seed: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from weakseg.cli import setup_logging
    from weakseg.pipeline.comparison import TEST_SPLIT, TRAIN_PART, _data_settings
    from weakseg.pipeline.refine import RefineConfig, refine

    setup_logging(quiet=True)
    results = json.loads((quality / f"seed{seed}" / "results.json").read_text())
    row = next(r for r in results["rows"] if r["method"] == "refined_weaktr_1")
    source = next(r for r in results["rows"] if r["classifier"] == row["classifier"] and r["method"] == row["refines"])
    checkpoint = Path(results["classifiers"][row["classifier"]]["best_checkpoint"])
    out: dict[str, dict] = {"unet_ce": {"train": row["train"]["miou"], "test": row["test"]["miou"]},
                            "input": {"train": source["train"]["miou"], "test": source["test"]["miou"]}}
    for name, settings in VARIANTS.items():
        cfg = RefineConfig(datadir=str(quality / "data"), pseudomasks=source["masks"],
                           output_dir=str(quality / f"seed{seed}" / f"phase2_{name}"), split=TRAIN_PART,
                           eval_split=TEST_SPLIT, iterations=1, epochs=30, seed=seed, figures=False,
                           **_data_settings(checkpoint), **settings)
        it = refine(cfg, verbose=False)["iterations"][1]
        out[name] = {"train": it["train_scores"]["miou"], "test": it["eval_scores"]["miou"]}
        print(f"[seed {seed}] {name}: train tiles {100 * out[name]['train']:.1f}, test {100 * out[name]['test']:.1f}",
              flush=True)
    out["pipeline"] = f"{source['classifier_label']} + {source['label']}"
    (quality / f"seed{seed}" / "phase2.json").write_text(json.dumps(out, indent=1))


def aggregate(quality: Path) -> str:
    runs = {int(p.parent.name[4:]): json.loads(p.read_text()) for p in sorted(quality.glob("seed*/phase2.json"))}
    lines = [f"WeakTr masks refined (seeds {sorted(runs)}): mIoU (%) mean ± sd; paired differences against UNet + CE",
             "", f"{'refinement':<28} {'train tiles':>13} {'test':>13} {'- UNet+CE train':>16} {'- UNet+CE test':>15}"]
    for name in ("input", "unet_ce", *VARIANTS):
        train = [r[name]["train"] for r in runs.values()]
        test = [r[name]["test"] for r in runs.values()]
        d_train = [r[name]["train"] - r["unet_ce"]["train"] for r in runs.values()]
        d_test = [r[name]["test"] - r["unet_ce"]["test"] for r in runs.values()]
        label = {"input": "input masks (no refinement)", "unet_ce": "UNet + CE (benchmark)",
                 "unet_clip": "UNet + clipping loss", "segmenter_clip": "Segmenter + clipping loss"}[name]
        lines.append(f"{label:<28} {mean_sd(train):>13} {mean_sd(test):>13} {mean_sd(d_train):>16} "
                     f"{mean_sd(d_test):>15}")
    lines += ["", "pipelines: " + "; ".join(f"seed {s}: {r['pipeline']}" for s, r in sorted(runs.items()))]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quality", type=Path, required=True, help="a finished benchmarks/quality.py folder")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--aggregate", action="store_true", help="only print the table of finished seeds")
    p.add_argument("--seed-run", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.seed_run is not None:
        run_one_seed(args.quality, args.seed_run, args.threads)
        return
    if not args.aggregate:
        seeds = sorted(int(d.name[4:]) for d in args.quality.glob("seed*") if (d / "results.json").is_file())
        failed = run_seeds(__file__, ["--quality", str(args.quality), "--threads", str(args.threads)], seeds,
                           args.jobs, args.threads)
        if failed:
            raise SystemExit(f"seeds {failed} failed")
    table = aggregate(args.quality)
    print("\n" + table)
    (args.quality / "phase2.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
