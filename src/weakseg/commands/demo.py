"""``weakseg demo``: the whole weakly supervised pipeline on built-in synthetic Sentinel-2 data, compared fairly.

Generates the data, trains four classifiers (one CLS token and one class token per class, each with and without
head pruning), makes pseudomasks with every method each classifier supports (top-class floor, Grad-CAM,
attention clustering with the paper's rank rule and with weakseg's default rule, class attention as released and
weakseg's default), picks the best pipeline on the holdout part of the training split, refines its masks with a
UNet, trains the fully supervised UNet upper bound, prints one table (:mod:`weakseg.pipeline.comparison`), names
the best pipeline and writes figures. Sized to finish in about 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weakseg.config import save_resolved
from weakseg.io import atomic_write_json

log = logging.getLogger("weakseg")


@dataclass
class DemoConfig:
    output_dir: str = "demo_output"
    train_tiles: int = 256
    test_tiles: int = 64
    tile_size: int = 64
    seed: int = 0
    vit_epochs: int = 30
    unet_epochs: int = 30
    iterations: int = 2
    figure_tiles: int = 4
    train_overrides: dict[str, Any] = field(default_factory=dict)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="run the whole pipeline on built-in synthetic data (about 5 min on CPU)",
                              description=__doc__)
    p.add_argument("--output_dir", default="demo_output", help="where everything goes (default demo_output/)")
    p.add_argument("--train_tiles", type=int, default=256)
    p.add_argument("--test_tiles", type=int, default=64)
    p.add_argument("--vit_epochs", type=int, default=30)
    p.add_argument("--unet_epochs", type=int, default=30)
    p.add_argument("--iterations", type=int, default=2, help="UNet refinement iterations of the best pipeline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a tiny smoke-test run (seconds, meaningless numbers)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(output_dir=args.output_dir, train_tiles=args.train_tiles, test_tiles=args.test_tiles,
                     vit_epochs=args.vit_epochs, unet_epochs=args.unet_epochs, iterations=args.iterations,
                     seed=args.seed)
    if args.fast:
        cfg.train_tiles, cfg.test_tiles, cfg.tile_size = 16, 8, 32
        cfg.vit_epochs, cfg.unet_epochs, cfg.iterations, cfg.figure_tiles = 1, 1, 1, 2
        cfg.train_overrides = {"embed_dim": 24, "depth": 2, "num_heads": 4, "patch_size": 8}
    run_demo(cfg)
    return 0


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from weakseg.data.synthetic import generate_synthetic_dfc2020
    from weakseg.pipeline.comparison import ComparisonConfig, run_comparison

    t0 = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out)
    data = out / "data"
    print(f"[demo] writing synthetic Sentinel-1/2 data ({cfg.train_tiles} + {cfg.test_tiles} tiles) to {data}",
          flush=True)
    generate_synthetic_dfc2020(data, {"validation": cfg.train_tiles, "test": cfg.test_tiles},
                               tile_size=cfg.tile_size, seed=cfg.seed)
    results = run_comparison(
        ComparisonConfig(datadir=str(data), output_dir=str(out), seed=cfg.seed, vit_epochs=cfg.vit_epochs,
                         unet_epochs=cfg.unet_epochs, iterations=cfg.iterations,
                         train_overrides={"imgsize": [cfg.tile_size, cfg.tile_size], **cfg.train_overrides}),
        progress=lambda line: print(f"[demo] {line}", flush=True),
    )
    print("\n" + results["table"])
    figures = write_figures(out, data, results, cfg)
    results["figures"] = [str(f) for f in figures]
    results["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out / "results.json", results)
    best = results["best"]
    print(f"\nbest pipeline: {best['label']}. On your data: `weakseg train {_train_flags(results, best)}`, then "
          f"`weakseg pseudomasks --method {_method_of(results, best)}`, then `weakseg refine --model_checkpoint ...`")
    print(f"figures: {', '.join(str(f) for f in figures)}")
    print(f"results: {out / 'results.json'}  (total {time.time() - t0:.0f}s)")
    return results


def _arch_of(results: dict[str, Any], classifier: str) -> str:
    return str(results["classifiers"][classifier].get("arch", "vit"))


def _train_flags(results: dict[str, Any], best: dict[str, Any]) -> str:
    """The ``weakseg train`` flags of the best pipeline's classifier (architecture and pruning recipe)."""
    from weakseg.pipeline.comparison import CLASSIFIERS, DEMO_PRUNING

    spec = next(c for c in CLASSIFIERS if c.name == best["classifier"])
    flags = [f"--arch {spec.arch}"]
    if spec.prune:
        flags.append("--prune")
        flags += [f"--{k}" if v is True else f"--{k} {v:g}" for k, v in DEMO_PRUNING.items()]
    return " ".join(flags)


def _method_of(results: dict[str, Any], best: dict[str, Any]) -> str:
    from weakseg.pipeline.comparison import METHODS_BY_ARCH

    arch = _arch_of(results, best["classifier"])
    spec = next(m for m in METHODS_BY_ARCH[arch] if m.key == best["method"])
    return spec.method + "".join(f" --{k} {v}" for k, v in spec.options)


def _row(results: dict[str, Any], classifier: str, method: str) -> dict[str, Any] | None:
    return next((r for r in results["rows"] if r["classifier"] == classifier and r["method"] == method), None)


def write_figures(out: Path, data: Path, results: dict[str, Any], cfg: DemoConfig) -> list[Path]:
    """Pseudomask panel, class-attention maps, attention heads of the pruned ViT and gate maps (PNG)."""
    from weakseg.data import open_dataset
    from weakseg.data.classes import DFC_CLASS_COLORS, DFC_CLASS_NAMES
    from weakseg.data.datamodule import build_transform
    from weakseg.evaluation.compare import read_prediction_mask
    from weakseg.methods.class_attention import class_attention_maps
    from weakseg.tasks.classification import load_classifier
    from weakseg.viz.figures import plot_attention_grid, plot_class_maps, plot_gate_map, plot_pseudomask_panel

    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    reader = open_dataset("dfc2020", data, "validation:train")

    def num_classes_in(i: int) -> int:
        mask = reader.read_mask(i)
        return len(np.unique(mask[mask != 255]))

    picks = [i for i in range(len(reader)) if num_classes_in(i) >= 2]
    picks = (picks or list(range(len(reader))))[: cfg.figure_tiles]
    best = results["best"]
    columns: dict[str, Path] = {}
    best_clf = best["classifier"].replace("class_tokens", "class tokens").replace("vit", "ViT").replace("_", ", ")
    for title, classifier, method in (
        (f"Grad-CAM\n({best_clf})", best["classifier"], "gradcam"),
        ("attention, rank rule\n(ViT, pruned)", "vit_pruned", "attention_rank"),
        ("attention, default\n(ViT, pruned)", "vit_pruned", "attention"),
        ("class attention\n(class tokens, unpruned)", "class_tokens_unpruned", "class_attention"),
        (f"best: {best['method'].replace('_', ' ')}\n({best_clf})", best["classifier"], best["method"]),
    ):
        row = _row(results, classifier, method)
        if row is not None and title not in columns and Path(row["masks"]) not in columns.values():
            columns[title] = Path(row["masks"])
    refined = [r for r in results["rows"] if r["method"].startswith("refined")]
    if refined:
        columns[f"{refined[-1]['label']}\n(of the best)"] = Path(refined[-1]["masks"])
    rows = []
    for i in picks:
        tid = reader.ids[i]
        row: dict[str, Any] = {"id": tid, "image": reader.read_image(i), "ground truth": reader.read_mask(i)}
        for name, folder in columns.items():
            row[name] = read_prediction_mask(folder / f"{tid}.tif")
        rows.append(row)
    figures = [plot_pseudomask_panel(rows, ["ground truth", *columns], DFC_CLASS_NAMES, DFC_CLASS_COLORS,
                                     fig_dir / "pseudomasks.png",
                                     title="Pseudomasks on training tiles (predicted labels)")]

    ct_row = _row(results, "class_tokens_unpruned", "class_attention")
    if ct_row is not None:
        task = load_classifier(results["classifiers"]["class_tokens_unpruned"]["best_checkpoint"])
        model = task.model.eval()
        transform = build_transform("predict", task.model_config.img_size, dict(task.hparams["data_config"]))
        reader_t = open_dataset("dfc2020", data, "validation:train", transform=transform)
        x = torch.stack([reader_t[i]["image"] for i in picks])
        with torch.no_grad():
            probs = model(x).sigmoid()
        maps = class_attention_maps(model, x, list(range(model.cfg.depth)), class_sets=probs > 0.5)
        map_rows = []
        for k, i in enumerate(picks):
            labels = [c for c in np.argsort(-probs[k].numpy()) if probs[k, c] > 0.5]
            map_rows.append({"id": reader.ids[i], "image": reader.read_image(i), "ground truth": reader.read_mask(i),
                             "mask": read_prediction_mask(Path(ct_row["masks"]) / f"{reader.ids[i]}.tif"),
                             "maps": maps[k].numpy(), "labels": labels, "probs": probs[k].numpy()})
        figures.append(plot_class_maps(map_rows, DFC_CLASS_NAMES, DFC_CLASS_COLORS, fig_dir / "class_attention.png",
                                       title="Class attention per predicted label (class tokens, unpruned)"))

    for name, fname in (("vit_pruned", "attention_heads.png"), ("class_tokens_pruned", None)):
        if name not in results["classifiers"]:
            continue
        task = load_classifier(results["classifiers"][name]["best_checkpoint"])
        model = task.model.eval()
        if fname is not None:
            transform = build_transform("predict", task.model_config.img_size, dict(task.hparams["data_config"]))
            x = open_dataset("dfc2020", data, "validation:train", transform=transform)[picks[0]]["image"][None]
            depth = task.model_config.depth
            with torch.no_grad():
                feats = model.forward_features(x, attention_blocks=range(depth))
            head_maps = torch.stack([feats.cls_to_patch_attention(b)[0] for b in range(depth)]).numpy()
            figures.append(plot_attention_grid(head_maps, model.head_mask().numpy(), fig_dir / fname,
                                               image=reader.read_image(picks[0]), mass=0.6,
                                               title=f"CLS attention per head (ViT, pruned), tile {reader.ids[picks[0]]}"))
        log_alpha = torch.stack([g.log_alpha.detach().flatten() for g in model.gates]).numpy()
        figures.append(plot_gate_map(model.head_mask().numpy(), fig_dir / f"gates_{name}.png", log_alpha=log_alpha,
                                     title=f"Hard Concrete gates: {name.replace('_', ' ')}"))
    return figures
