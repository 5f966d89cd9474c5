"""Does Barlow Twins pretraining give the WSSS methods better attention? Scratch vs self-supervised init, paired.

For each seed, on the quality benchmark's built-in data (256 training tiles of 64 x 64, data seed 0):

1. ``weakseg pretrain`` (Barlow Twins, augmented S2 views, the default settings but ``--epochs``) on the
   *unlabelled* ``validation:train`` tiles, the classifiers' own training tiles (no holdout or test tile);
2. the comparison (:func:`weakseg.pipeline.comparison.run_comparison`) of the unpruned one-CLS ViT and the
   unpruned class-token ViT, once from scratch and once with ``--pretrained`` that backbone; every method on each
   (class attention, attention clustering, Grad-CAM, the top-class floor), no refinement;
3. with ``--probe``: the linear probe of each backbone (``weakseg refine --supervised --model vit_linear
   --freeze_encoder``: a linear head on frozen patch tokens trained on the ground-truth masks of
   ``validation:train``, scored on ``test``), for the random initialisation and the pretrained one.

The table gives mean ± sd over seeds and the paired differences (pretrained - scratch) per classifier and method,
on the holdout (what chooses pipelines) and on ``test``. Each row is one checkpoint per seed (the classifier's
``best.ckpt``, chosen on the holdout's image labels). Usage::

    python benchmarks/self_supervised.py --seeds 0 1 2 --jobs 2 --output runs/ssl
    python benchmarks/self_supervised.py --aggregate runs/ssl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _seeds import add_seed_arguments, mean_sd, seed_benchmark_main

CLASSIFIERS = ("vit_unpruned", "class_tokens_unpruned")
INITS = ("scratch", "barlow_twins")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_seed_arguments(p, "runs/ssl")
    p.add_argument("--vit_epochs", type=int, default=30)
    p.add_argument("--pretrain_epochs", type=int, default=60)
    p.add_argument("--probe", action="store_true", help="also the linear probe of both backbones")
    p.add_argument("--probe_epochs", type=int, default=30)
    return p


def run_one_seed(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from weakseg.cli import setup_logging
    from weakseg.pipeline.comparison import TEST_SPLIT, TRAIN_PART, ComparisonConfig, run_comparison
    from weakseg.pipeline.pretrain import PretrainConfig, pretrain

    setup_logging(quiet=True)
    seed = args.seed_run
    out = args.output / f"seed{seed}"
    data = str(args.output / "data")
    result_file = out / "ssl.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    backbone = out / "pretrain" / "backbone.pth"
    if "pretrain" not in result:
        summary = pretrain(PretrainConfig(datadir=data, split=TRAIN_PART, output_dir=str(out / "pretrain"),
                                          epochs=args.pretrain_epochs, seed=seed))
        result["pretrain"] = {k: summary[k] for k in ("seconds", "tiles", "loss_batch", "final_metrics")}
        print(f"[seed {seed}] pretrained in {summary['seconds']:.0f}s: {summary['final_metrics']}", flush=True)
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps(result, indent=1))
    for init in INITS:
        if init in result:
            continue
        overrides = {"pretrained": str(backbone)} if init == "barlow_twins" else {}
        res = run_comparison(ComparisonConfig(
            datadir=data, output_dir=str(out / init), seed=seed, vit_epochs=args.vit_epochs, iterations=0,
            supervised=False, classifiers=CLASSIFIERS, train_overrides=overrides),
            progress=lambda line, init=init: print(f"[seed {seed} {init}] {line}", flush=True))
        result[init] = {"rows": res["rows"], "checkpoints": {
            name: (c.get("best") or {}).get("val_score") for name, c in res["classifiers"].items()}}
        result_file.write_text(json.dumps(result, indent=1))
    if args.probe:
        import yaml

        from weakseg.pipeline.refine import RefineConfig, model_recipe, refine

        # the probe sees the tiles as pretraining did (standardised with the pretraining tiles' band statistics)
        data_cfg = yaml.safe_load((out / "pretrain" / "config.yaml").read_text())["data"]
        for init in INITS:
            key = f"probe_{init}"
            if key in result:
                continue
            cfg = RefineConfig(datadir=data, pseudomasks=None, output_dir=str(out / key), split=TRAIN_PART,
                               eval_split=TEST_SPLIT, normalization=data_cfg["normalization"],
                               band_stats=data_cfg["band_stats"],
                               supervised=True, epochs=args.probe_epochs, seed=seed, figures=False,
                               model="vit_linear", freeze_encoder=True, embed_dim=96, depth=4, num_heads=6,
                               patch_size=8, pretrained=str(backbone) if init == "barlow_twins" else None,
                               **model_recipe("vit_linear"))
            summary = refine(cfg, verbose=False)
            it = summary["supervised"]
            result[key] = {"train": it["train_scores"]["miou"], "test": it["eval_scores"]["miou"]}
            print(f"[seed {seed}] linear probe ({init}): test mIoU {100 * result[key]['test']:.1f}", flush=True)
            result_file.write_text(json.dumps(result, indent=1))


def aggregate(folder: Path) -> str:
    runs = {int(p.parent.name[4:]): json.loads(p.read_text()) for p in sorted(folder.glob("seed*/ssl.json"))}
    runs = {s: r for s, r in runs.items() if all(i in r for i in INITS)}
    if not runs:
        raise SystemExit(f"no finished seed in {folder}")
    seeds = sorted(runs)
    lines = [f"mIoU (%) over seeds {seeds}: from scratch vs initialised from weakseg's Barlow Twins pretraining on the "
             "same unlabelled training tiles; predicted labels; mean ± sd, paired differences per seed", "",
             f"{'classifier':<22} {'method':<48} {'holdout scratch':>15} {'holdout BT':>13} {'BT - scratch':>13} "
             f"{'test scratch':>13} {'test BT':>13} {'BT - scratch':>13}"]
    first = runs[seeds[0]]["scratch"]["rows"]
    for row in first:
        key = (row["classifier"], row["method"])

        def values(init: str, part: str, key: tuple[str, str] = key) -> list[float]:
            return [next(r for r in runs[s][init]["rows"] if (r["classifier"], r["method"]) == key)[part]["miou"]
                    for s in seeds]

        cells = []
        for part in ("holdout", "test"):
            a, b = values("scratch", part), values("barlow_twins", part)
            cells += [mean_sd(a), mean_sd(b), mean_sd([y - x for x, y in zip(a, b)])]
        lines.append(f"{row['classifier_label']:<22} {row['label'][:48]:<48} {cells[0]:>15} {cells[1]:>13} "
                     f"{cells[2]:>13} {cells[3]:>13} {cells[4]:>13} {cells[5]:>13}")
    lines.append("")
    for name in CLASSIFIERS:
        a = [runs[s]["scratch"]["checkpoints"][name] for s in seeds]
        b = [runs[s]["barlow_twins"]["checkpoints"][name] for s in seeds]
        lines.append(f"classifier {name}: holdout image-label mAP of best.ckpt, scratch {mean_sd(a)}, Barlow Twins "
                     f"{mean_sd(b)}, paired {mean_sd([y - x for x, y in zip(a, b)])}")
    probes = [s for s in seeds if all(f"probe_{i}" in runs[s] for i in INITS)]
    if probes:
        a = [runs[s]["probe_scratch"]["test"] for s in probes]
        b = [runs[s]["probe_barlow_twins"]["test"] for s in probes]
        lines.append(f"linear probe (frozen backbone, linear head on patch tokens, ground-truth masks of the training "
                     f"tiles) test mIoU over seeds {probes}: random init {mean_sd(a)}, Barlow Twins {mean_sd(b)}, "
                     f"paired {mean_sd([y - x for x, y in zip(a, b)])}")
    pre = [runs[s]["pretrain"] for s in seeds]
    lines.append("pretraining: " + "; ".join(
        f"seed {s}: {p['seconds']:.0f}s, loss {p['final_metrics'].get('train_loss_epoch', float('nan')):.1f}, diag "
        f"{p['final_metrics'].get('train_diag_mean', float('nan')):.2f}" for s, p in zip(seeds, pre)))
    return "\n".join(lines)


def main() -> None:
    args = get_args_parser().parse_args()
    forwarded = ["--vit_epochs", str(args.vit_epochs), "--pretrain_epochs", str(args.pretrain_epochs),
                 "--probe_epochs", str(args.probe_epochs), *(["--probe"] if args.probe else [])]
    seed_benchmark_main(args, __file__, forwarded, run_one_seed, aggregate, "ssl.txt")


if __name__ == "__main__":
    main()
