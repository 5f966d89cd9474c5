"""Figures of ``weakseg train``, ``weakseg pseudomasks`` and ``weakseg refine``, in ``<output>/figures/``.

On a user's own data the figures are the only visual check that a run did something sensible, so every command
draws them next to its outputs (``--no-figures`` skips them):

- ``train``: ``training_curves.png`` (train and validation BCE, validation macro F1 and mAP, train macro F1, the
  pruned fraction when pruning, per epoch, the chosen checkpoint's epoch marked) from ``metrics.csv``, and with
  ``--prune`` ``gates_best.png``, the gate map of the chosen checkpoint (:func:`weakseg.viz.figures.plot_gate_map`).
- ``pseudomasks``: ``pseudomasks.png``, one row per sampled tile: the image, its ground truth (when the split has
  masks), the mask and the confidence map as written; for a method that reads attention
  (``PseudomaskMethod.attention_blocks``) also ``attention_heads_<id>.png`` for the first two sampled tiles, the
  per-head maps of the blocks the method reads (:func:`weakseg.viz.figures.plot_attention_grid`).
- ``refine``: ``refine_panels.png`` (image | ground truth | input pseudomask | each iteration's masks, and the
  supervised UNet's when the folder holds it) and, with ground truth, ``miou_per_iteration.png``.

**Which tiles.** :func:`sample_tiles` draws a fixed number of tiles (``figure_tiles``, default 4) in a fixed
random order (seed 0) of the split, preferring tiles with two or more classes (in the ground truth, or without it
in the pseudomasks), so a figure is the same on every run of the same data, and ``pseudomasks`` and ``refine`` of
one split show the same tiles. Tiles a pseudomask run skipped (unreadable) are left out.

**Never a failed run.** Figures are drawn after the run's own outputs are complete; any exception while drawing is
logged as a warning (the run's outputs are complete; the figure is not) and the run goes on (:func:`_guarded`).
Files are written atomically on an Agg canvas (:mod:`weakseg.viz.figures`), so a PNG is complete or absent, and
the same inputs give the same bytes.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FIGURES_DIR = "figures"
#: Tiles per panel figure unless ``--figure_tiles`` says otherwise.
DEFAULT_FIGURE_TILES = 4
#: Seed of the tile sample: fixed, so figures of the same data show the same tiles.
FIGURE_SEED = 0
#: Sampled tiles that also get a per-head attention figure: a blocks x heads grid takes about 0.7 s to draw
#: (matplotlib's cost per axes), so all of them would add seconds to a small run for little more insight.
HEAD_MAP_TILES = 2


#: How many tiles per requested tile :func:`sample_tiles` may look at to find ones with two or more classes.
_LOOK_AT_PER_TILE = 25


def sample_tiles(num_tiles: int, count: int, seed: int = FIGURE_SEED,
                 has_two_classes: Callable[[int], bool] | None = None) -> list[int]:
    """``min(count, num_tiles)`` distinct tile indices in a fixed random order (``seed``), returned sorted.

    With ``has_two_classes`` the tiles for which it is true come first (a one-class tile shows little of a method),
    looking at no more than ``25 * count`` tiles of that order, so a large split is not read whole; the rest is
    filled in the same order. Deterministic for the same ``num_tiles``, ``count``, ``seed`` and answers.
    """
    n = max(0, min(int(count), int(num_tiles)))
    if n == 0:
        return []
    order = [int(i) for i in np.random.default_rng(seed).permutation(num_tiles)]
    picks: list[int] = []
    if has_two_classes is not None:
        picks = [i for i in order[: _LOOK_AT_PER_TILE * n] if has_two_classes(i)][:n]
    picks += [i for i in order if i not in picks][: n - len(picks)]
    return sorted(picks)


def _classes_in(mask: np.ndarray) -> int:
    return len(np.unique(mask[mask != 255]))


def _two_classes_rule(reader: Any, masks: Path | None) -> Callable[[int], bool]:
    """Tile i has two or more classes: in its ground truth when the split has masks, else in ``masks/<id>.tif``
    (the pseudomasks), so ``pseudomasks`` and ``refine`` of one split pick the same tiles."""
    from weakseg.errors import DataError
    from weakseg.evaluation.compare import read_prediction_mask

    def rule(i: int) -> bool:
        try:
            if reader.has_masks:
                return _classes_in(reader.read_mask(i)) >= 2
            path = None if masks is None else masks / f"{reader.ids[i]}.tif"
            return path is not None and path.is_file() and _classes_in(read_prediction_mask(path)) >= 2
        except DataError:  # an unreadable mask: not a tile to show
            return False

    return rule


def _guarded(command: str, draw: Callable[[], list[Path]]) -> list[str]:
    """Run ``draw``; an exception becomes a logged warning (the run's own outputs are already complete)."""
    try:
        paths = draw()
    except Exception as e:  # noqa: BLE001: a figure must never fail a run whose results are written
        log.warning("warning: %s: figures not drawn (%s: %s); the run's other outputs are complete",
                    command, type(e).__name__, e)
        return []
    if paths:
        log.info("figures: %s (%s)", paths[0].parent, ", ".join(p.name for p in paths))
    return [str(p) for p in paths]


# ---- train ---------------------------------------------------------------------------------------------------
def write_train_figures(out: Path, summary: dict[str, Any], enabled: bool = True, model: Any = None) -> list[str]:
    """``training_curves.png`` and, when the run pruned, ``gates_best.png`` in ``out/figures``.

    Args:
        out: the training run's folder (``metrics.csv`` and ``checkpoints/`` inside).
        summary: the run's summary (:func:`weakseg.pipeline.train.train`): ``metrics_csv``, ``best``
            (epoch of the chosen checkpoint), ``monitor``, ``best_checkpoint``, ``arch``.
        enabled: False (``--no-figures``) draws nothing.
        model: the chosen checkpoint's model when the caller has it loaded already; None reads
            ``summary["best_checkpoint"]``.

    Returns:
        The paths written (none when disabled or when drawing failed, which is logged).
    """
    if not enabled:
        return []
    return _guarded("weakseg train", lambda: _train_figures(Path(out), summary, model))


def _train_figures(out: Path, summary: dict[str, Any], model: Any = None) -> list[Path]:
    from weakseg.viz.curves import plot_training_curves

    fig_dir = out / FIGURES_DIR
    with Path(summary.get("metrics_csv") or out / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    best = summary.get("best") or {}
    best_epoch = best.get("epoch") if isinstance(best.get("epoch"), int) and best["epoch"] >= 0 else None
    score = best.get("val_score")
    best_label = (f"best.ckpt: epoch {best_epoch}" + (f", {summary.get('monitor')} {score:.3f}"
                                                      if isinstance(score, float) and math.isfinite(score) else "")
                  if best_epoch is not None else None)
    checkpoint = summary.get("best_checkpoint")
    if model is None and checkpoint and Path(checkpoint).is_file():
        from weakseg.tasks.classification import load_classifier

        model = load_classifier(checkpoint).model
    gated = bool(model.cfg.gated) if model is not None else False
    paths = [plot_training_curves(rows, fig_dir / "training_curves.png", best_epoch=best_epoch,
                                  best_label=best_label, pruning=gated,
                                  title=f"weakseg train ({summary.get('arch', '')}): {out}")]
    if gated:
        paths.append(_gate_map(model, fig_dir / "gates_best.png", best_epoch))
    return paths


def _gate_map(model: Any, path: Path, epoch: int | None) -> Path:
    """The chosen checkpoint's gates (kept / pruned, log alpha per head)."""
    import torch

    from weakseg.viz.figures import plot_gate_map

    kept = model.head_mask().numpy()  # (depth, heads)
    log_alpha = torch.stack([g.log_alpha.detach().flatten() for g in model.gates]).numpy()
    pruned = int((~kept).sum())
    title = (f"gates of best.ckpt{f' (epoch {epoch})' if epoch is not None else ''}: pruned {pruned} / "
             f"{kept.size} heads ({100 * pruned / kept.size:.0f} %); cells: log alpha")
    return plot_gate_map(kept, path, log_alpha=log_alpha, title=title)


# ---- pseudomasks ---------------------------------------------------------------------------------------------
def write_pseudomask_figures(out_dir: Path, reader: Any, task: Any, runner: Any, figure_tiles: int,
                             enabled: bool = True) -> list[str]:
    """``pseudomasks.png`` and, for attention methods, ``attention_heads_<id>.png`` in ``out_dir/figures``.

    Args:
        out_dir: the pseudomask folder, complete (``manifest.csv``, masks, ``confidence/``).
        reader: the split's reader with the classifier's prediction transform (what the method saw).
        task: the classifier (:class:`~weakseg.tasks.classification.ClassificationTask`).
        runner: the method (:class:`~weakseg.methods.base.PseudomaskMethod`).
        figure_tiles: tiles to draw (:func:`sample_tiles`).
        enabled: False (``--no-figures``) draws nothing.
    """
    if not enabled:
        return []
    return _guarded("weakseg pseudomasks",
                    lambda: _pseudomask_figures(Path(out_dir), reader, task, runner, figure_tiles))


def pseudomask_figure_files(out_dir: Path) -> list[Path]:
    """The figures a pseudomask run drew in ``out_dir`` (``--overwrite`` deletes them with the run's masks)."""
    fig_dir = Path(out_dir) / FIGURES_DIR
    return [p for p in [fig_dir / "pseudomasks.png", fig_dir / "head_weights.png",
                        *sorted(fig_dir.glob("attention_heads_*.png"))] if p.is_file()]


def _manifest_rows(out_dir: Path) -> Iterator[dict[str, str]]:
    """The rows of ``out_dir/manifest.csv`` one at a time (none without the file)."""
    path = out_dir / "manifest.csv"
    if not path.is_file():
        return
    with path.open(newline="") as f:
        yield from csv.DictReader(f)


def _manifest(out_dir: Path, ids: Collection[str]) -> dict[str, dict[str, str]]:
    """The manifest rows of the tiles ``ids`` only, by id: the figures show a few tiles, and a manifest has a row
    (about 3 kB as a dict) per tile of the split, so the whole of it is never held."""
    return {row["id"]: row for row in _manifest_rows(out_dir) if row["id"] in ids}


def _skipped_ids(out_dir: Path) -> set[str]:
    """Ids of the tiles the run skipped (unreadable; status ``skipped`` in the manifest), read row by row."""
    return {row["id"] for row in _manifest_rows(out_dir) if row.get("status") == "skipped"}


def _pseudomask_figures(out_dir: Path, reader: Any, task: Any, runner: Any, figure_tiles: int) -> list[Path]:
    from weakseg.data.mask_files import CONFIDENCE_DIR, read_confidence
    from weakseg.evaluation.compare import read_prediction_mask
    from weakseg.viz.figures import plot_pseudomask_panel, render_image

    fig_dir = out_dir / FIGURES_DIR
    for stale in pseudomask_figure_files(out_dir):  # drawn for other tiles (another --figure_tiles)
        stale.unlink(missing_ok=True)
    # Tiles the run skipped (unreadable, with the reason in the manifest) have nothing to draw.
    skipped = _skipped_ids(out_dir)
    usable = [i for i, tid in enumerate(reader.ids) if tid not in skipped]
    rule = _two_classes_rule(reader, out_dir)
    picks = [usable[j] for j in sample_tiles(len(usable), figure_tiles, has_two_classes=lambda j: rule(usable[j]))]
    manifest = _manifest(out_dir, {reader.ids[i] for i in picks})
    rows, image_title, confidences = [], "image", []
    for i in picks:
        tid = reader.ids[i]
        entry = manifest.get(tid, {})
        rgb, image_title = render_image(reader.read_image(i))
        mask_file, conf_file = out_dir / f"{tid}.tif", out_dir / CONFIDENCE_DIR / f"{tid}.tif"
        row: dict[str, Any] = {"image": rgb}
        if reader.has_masks:
            row["ground truth"] = reader.read_mask(i)
        row["mask"] = read_prediction_mask(mask_file) if mask_file.is_file() else None
        row["confidence"] = read_confidence(conf_file) if conf_file.is_file() else None
        if row["confidence"] is not None:
            confidences.append(row["confidence"])
        labels = (entry.get("labels") or "none").replace(";", ", ")
        status = entry.get("status", "")
        row["id"] = f"{tid}\nlabels: {labels}" + (f"\n{status}" if status and status != "ok" else "")
        conf = row["confidence"]
        if conf is not None and float(conf.max() - conf.min()) == 0.0:
            # One value for the whole tile: a rule, not a per-pixel confidence (one label -> 1, no label -> 0;
            # top_class has no other). Written over the panel with the rule's reason, so it is not misread.
            rule = (entry.get("reason") or "").split(";")[0]
            row["notes"] = {"confidence": f"{float(conf.max()):.2f} everywhere" + (f"\n({rule})" if rule else "")}
        rows.append(row)
    if not rows:
        return []
    constant = bool(confidences) and all(float(c.max() - c.min()) == 0.0 for c in confidences)
    confidence_title = ("confidence" if confidences and not constant else
                        "confidence\n(one value per tile\nin every tile shown)" if constant else
                        "confidence\n(none written)")
    for row in rows:
        row[confidence_title] = row.pop("confidence")
        if "notes" in row:
            row["notes"] = {confidence_title: row["notes"]["confidence"]}
    columns = [*(["ground truth"] if reader.has_masks else []), "mask", confidence_title]
    method = runner.name
    labels_kind = "oracle" if _job_oracle(out_dir) else "predicted"
    paths = [plot_pseudomask_panel(
        rows, columns, list(reader.class_names), list(reader.class_colors), fig_dir / "pseudomasks.png",
        title=f"weakseg pseudomasks --method {method} ({labels_kind} labels), {len(rows)} of {len(reader)} tiles",
        image_title=image_title, heat_columns=[confidence_title],
    )]
    blocks = list(runner.attention_blocks(task.model.cfg.depth))
    if blocks:
        paths += _attention_heads(fig_dir, reader, task, picks[:HEAD_MAP_TILES], blocks, method)
    import torch

    images = torch.stack([reader[i]["image"] for i in picks])  # as the method saw them
    weights = runner.head_weights(task.model, images)
    if weights is not None:
        from weakseg.viz.figures import plot_head_weights

        paths.append(plot_head_weights(
            weights.cpu().numpy(), task.model.head_mask().numpy(), fig_dir / "head_weights.png",
            title=f"--method {method}: weight of each head, mean over the {len(picks)} tiles of pseudomasks.png",
        ))
    return paths


def _job_oracle(out_dir: Path) -> bool:
    import json

    try:
        return bool(json.loads((out_dir / "run.json").read_text()).get("oracle"))
    except (OSError, ValueError, AttributeError):
        return False


def _attention_heads(fig_dir: Path, reader: Any, task: Any, picks: Sequence[int], blocks: list[int],
                     method: str) -> list[Path]:
    """Per-head attention of the blocks the method reads, one PNG per sampled tile.

    A one-CLS ViT: the CLS token's attention to the patches. A class-token ViT: the attention of the token of
    the tile's most probable class (the map that class's mask comes from).
    """
    import torch

    from weakseg.viz.figures import plot_attention_grid, render_image

    model = task.model.eval()
    names = list(task.class_names)
    kept = model.head_mask()[blocks].numpy()  # (L, heads)
    paths = []
    for i in picks:
        image = reader[i]["image"][None]  # (1, C, h, w): normalised and resized as the method saw it
        with torch.no_grad():
            out = model.forward_features(image, attention_blocks=blocks)
            probs = model.forward_head(out).sigmoid()[0]  # (C,)
        if model.has_class_tokens:
            top = int(probs.argmax())
            maps = torch.stack([out.class_token_attention(b)[0, :, top] for b in blocks])  # (L, heads, h, w)
            what = f"class token '{names[top]}' (p = {float(probs[top]):.2f})"
        else:
            maps = torch.stack([out.cls_to_patch_attention(b)[0] for b in blocks])  # (L, heads, h, w)
            what = "CLS token"
        tid = reader.ids[i]
        rgb, image_title = render_image(reader.read_image(i))
        paths.append(plot_attention_grid(
            maps.numpy(), kept, fig_dir / f"attention_heads_{_safe_name(tid)}.png", image=rgb, mass=0.6,
            layer_indices=blocks, image_title=image_title,
            title=f"{what} attention per head, tile {tid} (--method {method}; outline: 60 % of the mass)",
        ))
    return paths


def _safe_name(tile_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in tile_id)


# ---- refine --------------------------------------------------------------------------------------------------
def write_refine_figures(out: Path, summary: dict[str, Any], reader: Any, figure_tiles: int,
                         enabled: bool = True) -> list[str]:
    """``refine_panels.png`` and (with ground truth) ``miou_per_iteration.png`` in ``out/figures``.

    Args:
        out: the refinement folder.
        summary: the run's summary (:func:`weakseg.pipeline.refine.refine`): ``split``, ``eval_split``,
            ``iterations`` (masks folder and scores of each), ``supervised``.
        reader: the reader of ``split`` (the pseudo-labelled tiles).
        figure_tiles: tiles to draw (:func:`sample_tiles`).
        enabled: False (``--no-figures``) draws nothing.
    """
    if not enabled:
        return []
    return _guarded("weakseg refine", lambda: _refine_figures(Path(out), summary, reader, figure_tiles))


def _miou_text(scores: dict[str, Any] | None) -> str:
    return f"\nmIoU {100 * scores['miou']:.1f}" if scores and scores.get("miou") is not None else ""


def _refine_figures(out: Path, summary: dict[str, Any], reader: Any, figure_tiles: int) -> list[Path]:
    from weakseg.evaluation.compare import read_prediction_mask
    from weakseg.viz.curves import plot_iteration_scores
    from weakseg.viz.figures import plot_pseudomask_panel, render_image

    fig_dir = out / FIGURES_DIR
    stages: list[tuple[str, Path]] = []  # (column title, mask folder)
    for entry in summary.get("iterations") or []:
        name = "input pseudomask" if entry["iteration"] == 0 else f"iteration {entry['iteration']}"
        stages.append((name + _miou_text(entry.get("train_scores")), Path(entry["masks"])))
    if summary.get("supervised"):
        stages.append(("supervised UNet" + _miou_text(summary["supervised"].get("train_scores")),
                       Path(summary["supervised"]["masks"])))
    paths: list[Path] = []
    inputs = Path(summary["iterations"][0]["masks"]) if summary.get("iterations") else None
    picks = sample_tiles(len(reader), figure_tiles, has_two_classes=_two_classes_rule(reader, inputs))
    if stages and picks:
        rows, image_title = [], "image"
        for i in picks:
            tid = reader.ids[i]
            rgb, image_title = render_image(reader.read_image(i))
            row: dict[str, Any] = {"id": tid, "image": rgb}
            if reader.has_masks:
                row["ground truth"] = reader.read_mask(i)
            for name, folder in stages:
                path = folder / f"{tid}.tif"
                row[name] = read_prediction_mask(path) if path.is_file() else None
            rows.append(row)
        columns = [*(["ground truth"] if reader.has_masks else []), *(name for name, _ in stages)]
        paths.append(plot_pseudomask_panel(
            rows, columns, list(reader.class_names), list(reader.class_colors), fig_dir / "refine_panels.png",
            title=f"weakseg refine: {len(rows)} of {len(reader)} tiles of {summary.get('split')!r}"
                  + (" (mIoU over all its tiles)" if reader.has_masks else ""),
            image_title=image_title,
        ))
    scored = [e for e in summary.get("iterations") or [] if e.get("train_scores") or e.get("eval_scores")]
    if scored or (summary.get("supervised") or {}).get("train_scores"):
        paths.append(plot_iteration_scores(summary.get("iterations") or [], fig_dir / "miou_per_iteration.png",
                                           supervised=summary.get("supervised"), split=summary.get("split"),
                                           eval_split=summary.get("eval_split")))
    else:
        log.info("refine: no ground-truth masks, so no mIoU-per-iteration figure")
    return paths
