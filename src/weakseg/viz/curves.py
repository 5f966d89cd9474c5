"""Line plots of a run over time: a classifier's training curves and refinement's mIoU per iteration.

Drawn like every figure of :mod:`weakseg.viz.figures` (an Agg canvas, never ``pyplot``; written atomically; fixed
size). The inputs are what the runs already write (``metrics.csv`` of ``weakseg train``, the iterations of
``weakseg refine``'s ``summary.json``), so a figure can be redrawn from a finished run folder.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from weakseg.errors import WeaksegError
from weakseg.viz.figures import _new_figure, _save

_TRAIN_COLOR = "#0067a5"
_VAL_COLOR = "#be0032"
_MAP_COLOR = "#f38400"
_PRUNED_COLOR = "#008856"


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _per_epoch(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of the rows that hold ``key`` and an epoch; the last value of an epoch wins."""
    values: dict[int, float] = {}
    for row in rows:
        epoch, value = _number(row.get("epoch")), _number(row.get(key))
        if epoch is not None and value is not None:
            values[int(epoch)] = value
    epochs = np.array(sorted(values), dtype=np.int64)
    return epochs, np.array([values[e] for e in epochs], dtype=np.float64)


def _epoch_means(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, mean of the per-step values of ``key`` in each epoch)."""
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        epoch, value = _number(row.get("epoch")), _number(row.get(key))
        if epoch is not None and value is not None:
            by_epoch[int(epoch)].append(value)
    epochs = np.array(sorted(by_epoch), dtype=np.int64)
    return epochs, np.array([np.mean(by_epoch[e]) for e in epochs], dtype=np.float64)


def plot_training_curves(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    best_epoch: int | None = None,
    best_label: str | None = None,
    pruning: bool = True,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Loss, validation scores and (for a pruned classifier) the pruned fraction of a classifier, per epoch.

    Args:
        rows: the rows of ``metrics.csv`` (Lightning's CSV logger: ``epoch``, ``step`` and one column per logged
            value, empty where a row does not log it). Read: the training BCE (``train_bce``, per step; averaged
            per epoch; ``train_loss`` when there is no ``train_bce``), ``val_loss``, ``val_macro_f1``, ``val_map``,
            ``train_macro_f1`` and ``pruned_fraction`` (per epoch). A missing column is left out; a run without any
            of them is an error.
        path: PNG to write.
        best_epoch: the epoch of the chosen checkpoint, marked with a dotted line on every panel.
        best_label: legend text of that line (e.g. "best.ckpt: epoch 3, val_map 0.74").
        pruning: draw the pruned fraction (an ungated classifier logs 0 every epoch: nothing to see).
        title: figure title.
        dpi: resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Epochs are numbered from 0 as Lightning logs them (and as ``summary.json`` names the best epoch). The training
    curve is the BCE, not ``train_loss``: with pruning ``train_loss`` adds the L0 penalty, which is several times
    the BCE and would make the two loss curves incomparable.
    """
    train_key = "train_bce" if any(_number(r.get("train_bce")) is not None for r in rows) else "train_loss"
    curves = {key: _per_epoch(rows, key) for key in
              ("val_loss", "val_macro_f1", "val_map", "train_macro_f1", "pruned_fraction")}
    curves["train"] = _epoch_means(rows, train_key)
    have = {key for key, (epochs, _) in curves.items() if len(epochs)}
    has_loss = bool(have & {"train", "val_loss"})
    has_scores = bool(have & {"val_macro_f1", "val_map", "train_macro_f1"})
    has_pruning = pruning and "pruned_fraction" in have
    panels = [name for name, on in (("loss", has_loss), ("scores", has_scores), ("pruning", has_pruning)) if on]
    if not panels:
        raise WeaksegError("metrics.csv holds no train_loss, val_loss, macro F1, mAP or pruned_fraction to plot")
    fig = _new_figure(4.0 * len(panels), 3.8 + (0.3 if title else 0.0), dpi)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("epoch", fontsize=8)
        if panel == "loss":
            if "train" in have:
                epochs, values = curves["train"]
                ax.plot(epochs, values, color=_TRAIN_COLOR, linestyle="--", marker="o", markersize=3,
                        linewidth=1.5, label="train BCE (epoch mean)" if train_key == "train_bce" else "train loss")
            if "val_loss" in have:
                epochs, values = curves["val_loss"]
                ax.plot(epochs, values, color=_VAL_COLOR, marker="o", markersize=3, linewidth=1.5,
                        label="validation BCE")
            ax.set_ylabel("binary cross-entropy", fontsize=8)
            ax.set_title("loss", fontsize=9)
        elif panel == "scores":
            for key, label, color, style in (("val_macro_f1", "validation macro F1", _VAL_COLOR, "-"),
                                             ("val_map", "validation mAP", _MAP_COLOR, "-"),
                                             ("train_macro_f1", "train macro F1", _TRAIN_COLOR, "--")):
                if key in have:
                    epochs, values = curves[key]
                    ax.plot(epochs, values, color=color, linestyle=style, marker="o", markersize=3,
                            linewidth=1.5, label=label)
            ax.set_ylim(0, 1.02)
            ax.set_ylabel("score", fontsize=8)
            ax.set_title("image-label scores", fontsize=9)
        else:
            epochs, values = curves["pruned_fraction"]
            ax.plot(epochs, values, color=_PRUNED_COLOR, marker="o", markersize=3, linewidth=1.5,
                    label="heads pruned (fraction)")
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel("fraction of heads", fontsize=8)
            ax.set_title(f"pruned fraction (last {values[-1]:.2f})", fontsize=9)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle=":", linewidth=1.2,
                       label=best_label or f"best checkpoint (epoch {best_epoch})")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_iteration_scores(
    iterations: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    supervised: Mapping[str, Any] | None = None,
    split: str | None = None,
    eval_split: str | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """mIoU (%) per refinement iteration: the pseudo-labelled tiles, the held-out split, the UNet alone.

    Args:
        iterations: ``summary["iterations"]`` of :func:`weakseg.pipeline.refine.refine`: ``iteration``,
            ``train_scores`` / ``eval_scores`` / ``eval_unet_alone_scores`` (``{"miou": ...}`` or None).
        path: PNG to write.
        supervised: the summary's ``supervised`` entry (same form), drawn as dashed horizontal lines.
        split, eval_split: the split names, for the legend.
        title: figure title.
        dpi: resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        WeaksegError: no iteration and no supervised run has a score (no ground truth anywhere).
    """
    # (summary key, legend, colour, marker, value label offset in points: above the training curve, below others)
    series = (("train_scores", f"training tiles ({split!r})" if split else "training tiles",
               _TRAIN_COLOR, "o", 6),
              ("eval_scores", f"held-out {eval_split!r}" if eval_split else "held-out split", _VAL_COLOR, "s", -12),
              ("eval_unet_alone_scores", "held-out, UNet alone", _MAP_COLOR, "^", -12))
    fig = _new_figure(5.6, 4.0 + (0.3 if title else 0.0), dpi)
    ax = fig.subplots()
    drawn = 0
    xs_all = [int(it["iteration"]) for it in iterations if isinstance(it.get("iteration"), int)]
    for key, label, color, marker, offset in series:
        points = [(int(it["iteration"]), 100 * float(it[key]["miou"])) for it in iterations
                  if isinstance(it.get("iteration"), int) and it.get(key) and it[key].get("miou") is not None]
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, color=color, marker=marker, markersize=5, linewidth=1.5, label=label)
        for x, y in points:
            below_axis = offset < 0 and y < 8  # a label under a point near 0 would hit the tick labels
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6 if below_axis else offset),
                        ha="center", fontsize=7, color=color)
        drawn += 1
    if supervised:
        for key, label, color, _, _ in series[:2]:
            scores = supervised.get(key)
            if scores and scores.get("miou") is not None:
                y = 100 * float(scores["miou"])
                ax.axhline(y, color=color, linestyle="--", linewidth=1.0, alpha=0.7,
                           label=f"supervised UNet, {label.split(' (')[0]} ({y:.1f})")
                drawn += 1
    if not drawn:
        raise WeaksegError("no refinement stage has an mIoU (no ground-truth masks): nothing to plot")
    if xs_all:
        ax.set_xticks(sorted(set(xs_all)), [("input" if x == 0 else f"iter {x}") for x in sorted(set(xs_all))])
        ax.set_xlim(min(xs_all) - 0.3, max(xs_all) + 0.3)
    ax.set_ylabel("mIoU (%)", fontsize=8)
    ax.tick_params(labelsize=7)
    low, high = ax.get_ylim()
    ax.set_ylim(max(0.0, low - 3), min(100.0, high + 4))  # room for the value labels
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2)
    ax.set_title(title or "mIoU per refinement iteration", fontsize=9)
    return _save(fig, path)
