"""Figures of ``weakseg evaluate``: confusion matrices and per-class IoU of every compared prediction folder.

A table of mIoU says which folder wins; the confusion matrix says *how* a folder fails (shrub taken for grass,
water never predicted, pixels left unlabelled), which is what a user needs to decide what to fix. Both figures
show every compared folder side by side, on the same scale.

Conventions are those of :mod:`weakseg.evaluation.metrics`: rows are ground truth, columns predictions, rows are
normalised to 100 % of the row's ground-truth pixels (so the diagonal is each class's recall), and the predicted
255 ("unlabelled") gets its own last column, counted as wrong as in the scores.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from weakseg.errors import WeaksegError
from weakseg.viz.figures import _new_figure, _save

#: Above this many classes the cells carry no numbers (they would not be legible).
ANNOTATE_UP_TO = 12


def row_normalised_confusion(result: Mapping[str, Any]) -> np.ndarray:
    """(K, K + 1) percent of each ground-truth class's pixels per predicted class, plus "unlabelled" last.

    Rows of classes without ground-truth pixels are NaN (drawn blank), not 0 %.
    """
    matrix = np.asarray(result["confusion_matrix"], dtype=np.float64)  # (K, K) evaluated pixels
    unlabelled = np.asarray(result.get("unlabelled_by_class") or np.zeros(len(matrix)), dtype=np.float64)  # (K,)
    counts = np.concatenate([matrix, unlabelled[:, None]], axis=1)  # (K, K + 1)
    total = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 100.0 * counts / total, np.nan)


def plot_confusion_matrices(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
                            dpi: int = 100) -> Path:
    """One row-normalised confusion matrix per folder (:func:`row_normalised_confusion`), side by side."""
    if not results:
        raise WeaksegError("no results to draw")
    names = list(results)
    class_names = list(next(iter(results.values()))["class_names"])
    k = len(class_names)
    cell = 0.42 if k <= ANNOTATE_UP_TO else 0.25
    side = max(2.8, cell * (k + 1) + 1.4)
    fig = _new_figure(side * len(names) + 0.8, side + 0.4, dpi)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    image = None
    for ax, name in zip(axes, names, strict=True):
        pct = row_normalised_confusion(results[name])
        image = ax.imshow(np.ma.masked_invalid(pct), cmap="Blues", vmin=0, vmax=100, aspect="equal")
        ax.set_xticks(np.arange(k + 1), labels=[*class_names, "unlabelled"], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(np.arange(k), labels=class_names if ax is axes[0] else [""] * k, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        if ax is axes[0]:
            ax.set_ylabel("ground truth", fontsize=8)
        miou = results[name].get("miou")
        ax.set_title(f"{name}\nmIoU {'-' if miou is None else f'{100 * miou:.1f}'} %", fontsize=9)
        if k <= ANNOTATE_UP_TO:
            for r in range(k):
                for c in range(k + 1):
                    if np.isfinite(pct[r, c]) and pct[r, c] >= 0.5:
                        ax.text(c, r, f"{pct[r, c]:.0f}", ha="center", va="center", fontsize=6,
                                color="white" if pct[r, c] > 55 else "black")
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="% of the class's pixels")
    return _save(fig, path)


def plot_iou_bars(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, dpi: int = 100) -> Path:
    """Per-class IoU of every folder as grouped bars, with the mIoU as the last group."""
    if not results:
        raise WeaksegError("no results to draw")
    names = list(results)
    class_names = list(next(iter(results.values()))["class_names"])
    groups = [*class_names, "mIoU"]
    width = 0.8 / len(names)
    fig = _new_figure(max(4.0, 0.35 * len(groups) * max(2, len(names)) + 1.5), 3.4 + 0.2 * (len(names) // 5), dpi)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    colors = [cmap(i % cmap.N) for i in range(len(names))]
    x = np.arange(len(groups))
    for i, name in enumerate(names):
        r = results[name]
        values = [np.nan if v is None else 100 * v for v in r["iou"]] + [
            np.nan if r.get("miou") is None else 100 * r["miou"]]
        ax.bar(x - 0.4 + (i + 0.5) * width, values, width, label=name, color=colors[i])
    ax.set_xticks(x, labels=groups, rotation=45 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center",
                  fontsize=7)
    ax.set_ylabel("IoU (%)", fontsize=8)
    ax.set_ylim(0, 100)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, frameon=False, loc="outside lower center",
               ncols=min(len(names), 5))
    ax.set_title("IoU per class (classes absent from the ground truth: no bar)", fontsize=9)
    return _save(fig, path)
