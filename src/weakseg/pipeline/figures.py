"""Figures of a comparison run (:mod:`weakseg.pipeline.comparison`): what ``weakseg demo`` draws.

The pseudomask panel puts the methods side by side on the same tiles (each column names its classifier), the
class-attention figure shows each predicted label's map next to the mask it became, and the attention-head grid
and gate maps show what pruning kept. The drawing itself is :mod:`weakseg.viz.figures`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def _row(results: dict[str, Any], classifier: str, method: str) -> dict[str, Any] | None:
    return next((r for r in results["rows"] if r["classifier"] == classifier and r["method"] == method), None)


def write_comparison_figures(out: Path, data: Path, results: dict[str, Any], figure_tiles: int = 4) -> list[Path]:
    """Pseudomask panel, class-attention maps, attention heads of the pruned ViT and gate maps, as PNG files in
    ``out/figures``, for the first ``figure_tiles`` training tiles with two or more classes.

    Args:
        out: the comparison's output folder.
        data: its dataset root.
        results: what :func:`weakseg.pipeline.comparison.run_comparison` returned.
        figure_tiles: rows of the panels.
    """
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
    picks = (picks or list(range(len(reader))))[: figure_tiles]
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
