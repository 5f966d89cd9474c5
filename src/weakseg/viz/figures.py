"""PNG figures: true-colour tiles, pseudomask panels, attention-head grids, gate maps and method comparisons.

The figures reproduce the qualitative plots of Hanna, Mommert and Borth, "Sparse Multimodal Vision Transformer
for Weakly Supervised Semantic Segmentation", CVPRW 2023 ("True Color | Grad-CAM | Ours w/o pruning | Ours |
Groundtruth" panels, per-head attention with pruned heads, the gate state of every head). The optional contour
on attention maps is DINO's visualisation (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021): the smallest set of patches that holds a given fraction (60 %) of a head's
attention mass.

Every figure is drawn on a :class:`matplotlib.figure.Figure` with an Agg canvas, never through ``pyplot``: no
global figure registry that leaks memory in long runs and no change of the user's backend. Files are written
atomically (:func:`weakseg.io.atomic_path`), so a crash never leaves a truncated PNG,
and every function returns the path it wrote. Figure sizes are fixed by ``panel_size`` (inches per panel) and
``dpi``, without ``bbox_inches="tight"``, so a PNG's pixel size is predictable: for example a pseudomask panel
is ``(1 + len(columns)) * panel_size * dpi`` pixels wide.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from weakseg.data.classes import DFC_CLASS_COLORS, IGNORE_INDEX, S2_BANDS, S2_RGB_INDICES
from weakseg.errors import WeaksegError
from weakseg.io import atomic_path
from weakseg.viz.palette import IGNORE_COLOR

_KEPT_COLOR = "#2c7fb8"
_PRUNED_COLOR = "#d9d9d9"
_CROSS_COLOR = "#d7301f"

Color = str | Sequence[float] | Sequence[int]


# ---- arrays -------------------------------------------------------------------------------------------
def s2_true_color(
    image_s2: np.ndarray,
    rgb_indices: Sequence[int] | None = None,
    percentiles: tuple[float, float] = (2.0, 98.0),
) -> np.ndarray:
    """True-colour rendering of a Sentinel-2 tile with a per-band percentile stretch.

    Reflectances are dark and skewed (clouds, water), so a fixed scale gives black or washed-out images;
    stretching each band between its 2nd and 98th percentile is the usual remote-sensing display and is
    independent of whether the input is raw uint16 digital numbers, scaled floats or normalised values.

    Args:
        image_s2: (C, H, W) float or integer array. With 13 or more channels (S2, or S2 followed by S1) bands
            B04, B03, B02 (:data:`weakseg.data.classes.S2_RGB_INDICES`) are used; with exactly 3 channels they
            are taken as R, G, B.
        rgb_indices: channel indices of red, green and blue, overriding the rule above.
        percentiles: lower and upper percentile of the stretch, per band, over the finite pixels.

    Returns:
        (H, W, 3) uint8; the lower percentile maps to 0, the upper to 255, non-finite pixels to 0. A constant
        band is black.

    Raises:
        WeaksegError: if the array is not (C, H, W) or the channels do not allow a true-colour rendering.
    """
    image = np.asarray(image_s2)
    if image.ndim != 3:
        raise WeaksegError(f"true-colour rendering expects a (C, H, W) image, got shape {image.shape}")
    if rgb_indices is None:
        if image.shape[0] >= len(S2_BANDS):  # 13 S2 bands, optionally followed by S1
            rgb_indices = S2_RGB_INDICES
        elif image.shape[0] == 3:
            rgb_indices = (0, 1, 2)
        else:
            raise WeaksegError(
                f"cannot render {image.shape[0]} channels as true colour: expected 13 S2 bands "
                f"(optionally followed by S1) or 3 RGB channels; pass rgb_indices"
            )
    lo_pct, hi_pct = percentiles
    rgb = np.zeros((*image.shape[1:], 3), dtype=np.uint8)  # (H, W, 3)
    for out_channel, band_index in enumerate(rgb_indices):
        band = image[band_index].astype(np.float64)  # (H, W)
        finite = np.isfinite(band)
        if not finite.any():
            continue
        lo, hi = np.percentile(band[finite], [lo_pct, hi_pct])
        if hi <= lo:
            continue
        scaled = np.clip((band - lo) / (hi - lo), 0.0, 1.0)
        scaled[~finite] = 0.0
        rgb[..., out_channel] = np.round(scaled * 255).astype(np.uint8)
    return rgb


def render_image(image: np.ndarray) -> tuple[np.ndarray, str]:
    """Any (C, H, W) tile -> (H, W, 3) uint8 for display, with a caption that says which bands are shown.

    :func:`s2_true_color` needs 13 S2 bands or 3 RGB channels; a folder dataset may have any band count, and a
    figure must not fail on one. 13 or more channels: S2 true colour (B04, B03, B02); 3: RGB; more than 3:
    bands 1-3 as red, green, blue (their order is the user's); 1 or 2: band 1 in grey.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise WeaksegError(f"expected a (C, H, W) image, got shape {image.shape}")
    channels = image.shape[0]
    if channels >= len(S2_BANDS):
        return s2_true_color(image), "true colour"
    if channels == 3:
        return s2_true_color(image, (0, 1, 2)), "RGB"
    if channels > 3:
        return s2_true_color(image, (0, 1, 2)), "bands 1-3 as RGB"
    return s2_true_color(image, (0, 0, 0)), "band 1 (grey)"


def _rgb255(color: Color) -> tuple[int, int, int]:
    """A matplotlib colour ('#rrggbb', name, 0..1 floats) or a tuple of 0..255 integers -> 0..255 integers."""
    if not isinstance(color, str) and all(isinstance(c, (int, np.integer)) for c in color):
        r, g, b = (int(c) for c in color)
        return r, g, b
    r, g, b = to_rgb(color)  # type: ignore[arg-type]
    return round(r * 255), round(g * 255), round(b * 255)


def colorize_mask(
    mask: np.ndarray,
    colors: Sequence[Color] = DFC_CLASS_COLORS,
    ignore_color: Color = IGNORE_COLOR,
) -> np.ndarray:
    """Class-id mask -> RGB image with one fixed colour per class.

    Args:
        mask: (H, W) integer class ids in ``[0, len(colors))``, 255 = ignore / unlabelled.
        colors: one colour per class ('#rrggbb' strings as in :data:`DFC_CLASS_COLORS`, or RGB tuples).
        ignore_color: colour of 255 pixels (dark grey by default, so "unlabelled" is never mistaken for a
            class).

    Returns:
        (H, W, 3) uint8.

    Raises:
        WeaksegError: if the mask holds ids that have no colour (and are not 255).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise WeaksegError(f"colorize_mask expects an (H, W) mask, got shape {mask.shape}")
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(colors)] = [_rgb255(c) for c in colors]
    lut[IGNORE_INDEX] = _rgb255(ignore_color)
    ids = mask.astype(np.int64)
    bad = (ids != IGNORE_INDEX) & ((ids < 0) | (ids >= len(colors)))
    if bad.any():
        raise WeaksegError(
            f"mask holds class ids {np.unique(ids[bad])[:10].tolist()} but only {len(colors)} class "
            f"colours are given (255 = ignore)"
        )
    return lut[ids]  # (H, W, 3)


def attention_mass_mask(attention: np.ndarray, mass: float = 0.6) -> np.ndarray:
    """The smallest set of positions holding ``mass`` of the attention, per map (DINO, Caron et al. 2021).

    Positions are taken in order of decreasing attention until their sum reaches ``mass`` times the total;
    ties keep the earlier position (stable sort). An all-zero map (a pruned head) gives an empty set.

    Args:
        attention: (..., h, w) non-negative attention maps.
        mass: fraction of the total attention to cover, in (0, 1].

    Returns:
        bool array of the same shape.
    """
    if not 0.0 < mass <= 1.0:
        raise WeaksegError(f"attention mass must be in (0, 1], got {mass}")
    attn = np.asarray(attention, dtype=np.float64)
    flat = attn.reshape(-1, attn.shape[-2] * attn.shape[-1])  # (maps, h*w)
    order = np.argsort(-flat, axis=1, kind="stable")
    sorted_vals = np.take_along_axis(flat, order, axis=1)
    total = sorted_vals.sum(axis=1, keepdims=True)  # (maps, 1)
    mass_before = np.cumsum(sorted_vals, axis=1) - sorted_vals  # attention of the strictly larger positions
    keep_sorted = (mass_before < mass * total * (1 - 1e-9)) & (total > 0)
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)
    return keep.reshape(attn.shape)


# ---- figure plumbing --------------------------------------------------------------------------------
def _new_figure(width: float, height: float, dpi: int) -> Figure:
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG atomically (:func:`weakseg.io.atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi, facecolor="white")
    return path


def _as_rgb_display(image: np.ndarray) -> np.ndarray:
    """(C, H, W) bands -> true colour; an (H, W, 3) uint8 array is shown as it is."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8:
        return image
    return s2_true_color(image)


def _legend_handles(class_names: Sequence[str], class_colors: Sequence[Color]) -> list[Patch]:
    handles = [
        Patch(facecolor=np.array(_rgb255(c)) / 255, edgecolor="black", linewidth=0.5, label=name)
        for name, c in zip(class_names, class_colors)
    ]
    handles.append(
        Patch(facecolor=np.array(IGNORE_COLOR) / 255, edgecolor="black", linewidth=0.5, label="unlabelled")
    )
    return handles


def _draw_patch_outline(ax: object, region: np.ndarray, upsample: int = 8) -> None:
    """Outline a set of patches along the patch borders (a contour of the coarse grid would cut corners)."""
    h, w = region.shape
    fine = np.kron(region.astype(float), np.ones((upsample, upsample)))  # (h*k, w*k)
    fine = np.pad(fine, 1)  # zero border sampled on the image edge, so outlines close there too
    xs = np.concatenate([[-0.5], (np.arange(w * upsample) + 0.5) / upsample - 0.5, [w - 0.5]])  # patch coords
    ys = np.concatenate([[-0.5], (np.arange(h * upsample) + 0.5) / upsample - 0.5, [h - 0.5]])
    ax.contour(xs, ys, fine, levels=[0.5], colors="white", linewidths=1.2)  # type: ignore[attr-defined]


# ---- figures ----------------------------------------------------------------------------------------
def plot_pseudomask_panel(
    rows: Sequence[Mapping[str, object]],
    columns: Sequence[str],
    class_names: Sequence[str],
    class_colors: Sequence[Color],
    path: str | os.PathLike,
    title: str | None = None,
    panel_size: float = 2.0,
    dpi: int = 100,
    image_title: str = "true colour",
    heat_columns: Sequence[str] = (),
) -> Path:
    """One row per tile: the true-colour image, then one mask per named column, with one shared class legend.

    Args:
        rows: one dict per tile with ``"id"`` (row label), ``"image"`` ((C, H, W) bands, or (H, W, 3) uint8
            already rendered) and one (H, W) mask per entry of ``columns`` (255 = unlabelled). A missing
            column is drawn as an empty panel marked "n/a" (e.g. no ground truth for a tile). Optionally
            ``"notes"``: {column: text} written over that panel (e.g. why a confidence map is constant).
        columns: mask keys in display order, also the column titles, e.g. ``["ground truth", "Grad-CAM",
            "attention", "pruned attention", "refined"]``.
        class_names, class_colors: legend entries and mask colours (e.g. ``DFC_CLASS_NAMES`` and
            ``DFC_CLASS_COLORS`` of :mod:`weakseg.data.classes`); fixed for every panel so colours compare across
            methods.
        path: PNG to write.
        title: figure title.
        panel_size: inches per panel; the PNG is ``(1 + len(columns)) * panel_size * dpi`` pixels wide.
        dpi: resolution.
        image_title: title of the image column (e.g. "RGB" or "bands 1-3 as RGB", :func:`render_image`).
        heat_columns: columns of ``columns`` that hold (H, W) values in [0, 1] (e.g. a confidence map) instead
            of class ids: drawn with the viridis colour map, with a colour bar under the column.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not rows:
        raise WeaksegError("plot_pseudomask_panel needs at least one row")
    heat = set(heat_columns)
    if len(class_colors) < len(class_names):
        raise WeaksegError(f"{len(class_names)} class names but only {len(class_colors)} class colours")
    n_cols = 1 + len(columns)
    legend_cols = min(len(class_names) + 1, max(2, int(n_cols * panel_size / 1.3)))
    legend_rows = -(-(len(class_names) + 1) // legend_cols)
    extra = 0.3 * legend_rows + 0.25 + (0.35 if title else 0.0)
    fig = _new_figure(n_cols * panel_size, len(rows) * panel_size + extra, dpi)
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    heat_images: dict[int, object] = {}  # column -> one of its images, for the colour bar
    for r, row in enumerate(rows):
        image = np.asarray(row["image"])
        panels: list[tuple[str, np.ndarray | None]] = [(image_title, _as_rgb_display(image))]
        for column in columns:
            mask = row.get(column)
            if mask is None or column in heat:
                panels.append((column, None if mask is None else np.asarray(mask, dtype=np.float64)))
            else:
                panels.append((column, colorize_mask(np.asarray(mask), class_colors)))
        for c, (name, rgb) in enumerate(panels):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if rgb is None:  # a light-grey placeholder of the tile's size keeps the panel aspect
                ax.imshow(np.full_like(panels[0][1], 240), interpolation="nearest")  # type: ignore[arg-type]
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, color="grey")
            elif c > 0 and name in heat:
                heat_images[c] = ax.imshow(rgb, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(rgb, interpolation="nearest")
            note = (row.get("notes") or {}).get(name) if c > 0 else None  # type: ignore[union-attr]
            if note:
                ax.text(0.5, 0.5, str(note), ha="center", va="center", transform=ax.transAxes, fontsize=7,
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 2})
            if r == 0:
                ax.set_title(name, fontsize=9)
        axes[r, 0].set_ylabel(str(row.get("id", r)), fontsize=8)
    for c, mappable in heat_images.items():  # under the column's last panel, leaving every panel its size
        bar = fig.colorbar(mappable, cax=axes[-1, c].inset_axes([0.05, -0.13, 0.9, 0.06]), orientation="horizontal")
        bar.ax.tick_params(labelsize=7)
    fig.legend(
        handles=_legend_handles(class_names, class_colors),
        loc="outside lower center",
        ncols=legend_cols,
        fontsize=8,
        frameon=False,
        handlelength=1.2,
        columnspacing=1.0,
    )
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_attention_grid(
    maps: np.ndarray,
    kept: np.ndarray,
    path: str | os.PathLike,
    image: np.ndarray | None = None,
    mass: float | None = None,
    title: str | None = None,
    layer_indices: Sequence[int] | None = None,
    panel_size: float = 1.6,
    dpi: int = 100,
    image_title: str = "true colour",
) -> Path:
    """One panel per attention head; pruned heads greyed, crossed and labelled "pruned".

    Args:
        maps: (heads, h, w) CLS->patch attention of one block, or (layers, heads, h, w) for several blocks
            (one row per layer).
        kept: bool (heads,) or (layers, heads), True = head kept (``GatedViT.head_mask()`` rows).
        path: PNG to write.
        image: optional (C, H, W) bands or (H, W, 3) uint8 tile, drawn first (top-left).
        mass: draw DINO's contour around the smallest set of patches holding this fraction of each kept head's
            attention (Caron et al. 2021 use 0.6); None draws no contour.
        title: figure title.
        layer_indices: labels of the rows (block numbers) for 4-D ``maps``; default 0..layers-1.
        panel_size: inches per panel; the PNG is ``(heads + (image is not None)) * panel_size * dpi`` pixels
            wide.
        dpi: resolution.
        image_title: title of the image panel (e.g. "bands 1-3 as RGB", :func:`render_image`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Each head is scaled to its own maximum (heads differ in sharpness by orders of magnitude).
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim == 3:
        maps = maps[None]  # (1, heads, h, w)
        kept = np.asarray(kept, dtype=bool).reshape(1, -1)
        row_labels = None
    elif maps.ndim == 4:
        kept = np.asarray(kept, dtype=bool)
        row_labels = list(layer_indices) if layer_indices is not None else list(range(maps.shape[0]))
    else:
        raise WeaksegError(f"attention maps must be (heads, h, w) or (layers, heads, h, w), got {maps.shape}")
    n_layers, n_heads = maps.shape[:2]
    if kept.shape != (n_layers, n_heads):
        raise WeaksegError(
            f"kept mask has shape {kept.shape}, expected {(n_layers, n_heads)} to match the maps"
        )
    offset = 1 if image is not None else 0
    n_cols = n_heads + offset
    fig = _new_figure(n_cols * panel_size, n_layers * panel_size + (0.4 if title else 0.1), dpi)
    axes = fig.subplots(n_layers, n_cols, squeeze=False)
    contours = attention_mass_mask(maps, mass) if mass is not None else None
    h, w = maps.shape[-2:]
    for layer in range(n_layers):
        for c in range(n_cols):
            ax = axes[layer, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < offset:
                if layer == 0:
                    ax.imshow(_as_rgb_display(image), interpolation="nearest")  # type: ignore[arg-type]
                    ax.set_title(image_title, fontsize=8)
                else:
                    ax.set_axis_off()
                continue
            head = c - offset
            attn = maps[layer, head]  # (h, w)
            peak = attn.max()
            scaled = attn / peak if peak > 0 else attn
            name = f"head {head}" if row_labels is None else f"L{row_labels[layer]} H{head}"
            if kept[layer, head]:
                ax.imshow(scaled, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
                if contours is not None and contours[layer, head].any():
                    _draw_patch_outline(ax, contours[layer, head])
                ax.set_title(name, fontsize=8)
            else:
                ax.imshow(scaled, cmap="Greys", vmin=0, vmax=1, alpha=0.25, interpolation="nearest")
                ax.set_facecolor(_PRUNED_COLOR)
                ax.plot([-0.5, w - 0.5], [-0.5, h - 0.5], color=_CROSS_COLOR, linewidth=1.2)
                ax.plot([-0.5, w - 0.5], [h - 0.5, -0.5], color=_CROSS_COLOR, linewidth=1.2)
                ax.set_xlim(-0.5, w - 0.5)
                ax.set_ylim(h - 0.5, -0.5)
                ax.text(
                    0.5,
                    0.5,
                    "pruned",
                    transform=ax.transAxes,
                    ha="center",
                    va="center",
                    fontsize=9,
                    color=_CROSS_COLOR,
                    fontweight="bold",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.5},
                )
                ax.set_title(f"{name} (pruned)", fontsize=8, color="grey")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_gate_map(
    head_mask: np.ndarray,
    path: str | os.PathLike,
    log_alpha: np.ndarray | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Layer x head grid of kept (blue) and pruned (grey) heads, with the number pruned per layer.

    Args:
        head_mask: bool (depth, heads), True = kept (``GatedViT.head_mask()``).
        path: PNG to write.
        log_alpha: optional (depth, heads) gate parameters, written in each cell (a head is kept when
            log alpha > 0), which shows how far each head is from flipping.
        title: figure title; default "pruned P / N heads (x %)".
        dpi: resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    kept = np.asarray(head_mask, dtype=bool)
    if kept.ndim != 2:
        raise WeaksegError(f"head_mask must be (depth, heads), got shape {kept.shape}")
    depth, heads = kept.shape
    if log_alpha is not None:
        log_alpha = np.asarray(log_alpha, dtype=np.float64)
        if log_alpha.shape != kept.shape:
            raise WeaksegError(f"log_alpha has shape {log_alpha.shape}, expected {kept.shape} like head_mask")
    cell = 0.55 if log_alpha is not None else 0.4
    fig = _new_figure(heads * cell + 2.2, depth * cell + 1.1, dpi)
    ax = fig.subplots()
    kept_rgb, pruned_rgb = np.array(to_rgb(_KEPT_COLOR)), np.array(to_rgb(_PRUNED_COLOR))
    rgb = np.where(kept[..., None], kept_rgb, pruned_rgb)  # (depth, heads, 3)
    ax.imshow(rgb, interpolation="nearest", aspect="equal")
    ax.set_xticks(np.arange(heads))
    ax.set_yticks(np.arange(depth))
    ax.set_xticks(np.arange(heads + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(depth + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="both", length=0, labelsize=7)
    ax.set_xlabel("head", fontsize=8)
    ax.set_ylabel("block", fontsize=8)
    if log_alpha is not None:
        for layer in range(depth):
            for head in range(heads):
                ax.text(
                    head, layer, f"{log_alpha[layer, head]:+.1f}", ha="center", va="center", fontsize=7,
                    color="white" if kept[layer, head] else "black",
                )
    pruned_per_layer = (~kept).sum(axis=1)
    right = ax.secondary_yaxis("right")
    right.set_yticks(np.arange(depth), labels=[f"{p}/{heads} pruned" for p in pruned_per_layer])
    right.tick_params(length=0, labelsize=7)
    total_pruned = int(pruned_per_layer.sum())
    if title is None:
        title = f"pruned {total_pruned} / {kept.size} heads ({100 * total_pruned / kept.size:.0f} %)"
        if log_alpha is not None:
            title += "; cells: log alpha"
    ax.set_title(title, fontsize=9)
    fig.legend(
        handles=[
            Patch(facecolor=_KEPT_COLOR, edgecolor="black", linewidth=0.5, label="kept"),
            Patch(facecolor=_PRUNED_COLOR, edgecolor="black", linewidth=0.5, label="pruned"),
        ],
        loc="outside lower center", ncols=2, fontsize=7, frameon=False,
    )
    return _save(fig, path)


def plot_head_weights(
    weights: np.ndarray, head_mask: np.ndarray, path: str | os.PathLike, title: str, dpi: int = 100,
) -> Path:
    """Block x head heat map of per-head weights (WeakTr's AAF weights), value in each cell, pruned heads grey.

    Args:
        weights: (depth, heads) values in [0, 1].
        head_mask: bool (depth, heads), True = kept.
        path: PNG to write. title: figure title.
    """
    w = np.asarray(weights, dtype=np.float64)
    kept = np.asarray(head_mask, dtype=bool)
    if w.ndim != 2 or w.shape != kept.shape:
        raise WeaksegError(f"weights {w.shape} and head_mask {kept.shape} must both be (depth, heads)")
    depth, heads = w.shape
    fig = _new_figure(heads * 0.55 + 2.6, depth * 0.55 + 1.2, dpi)
    ax = fig.subplots()
    shown = np.ma.masked_where(~kept, w)
    image = ax.imshow(shown, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
    ax.imshow(np.where(kept[..., None], np.nan, np.array(to_rgb(_PRUNED_COLOR))), interpolation="nearest")
    for layer in range(depth):
        for head in range(heads):
            text = f"{w[layer, head]:.2f}" if kept[layer, head] else "pruned"
            ax.text(head, layer, text, ha="center", va="center", fontsize=6,
                    color="white" if kept[layer, head] and w[layer, head] < 0.6 else "black")
    ax.set_xticks(np.arange(heads))
    ax.set_yticks(np.arange(depth))
    ax.tick_params(length=0, labelsize=7)
    ax.set_xlabel("head", fontsize=8)
    ax.set_ylabel("block", fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    return _save(fig, path)


def plot_metric_bars(
    scores: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    metric: str | Sequence[str] = "mIoU",
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Bar chart comparing methods on one metric, or grouped bars for several.

    Args:
        scores: method name -> {metric name -> value}, e.g. ``{"Grad-CAM": {"mIoU": 0.31, "OA": 0.55}, ...}``;
            methods are drawn in the mapping's order.
        path: PNG to write.
        metric: the metric to plot, or a list of metrics (grouped bars, one colour per metric).
        title: figure title; default the metric names.
        dpi: resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        WeaksegError: if ``scores`` is empty or a method lacks a requested metric.
    """
    metrics = [metric] if isinstance(metric, str) else list(metric)
    if not scores or not metrics:
        raise WeaksegError("plot_metric_bars needs at least one method and one metric")
    methods = list(scores)
    for method in methods:
        missing = [m for m in metrics if m not in scores[method]]
        if missing:
            raise WeaksegError(
                f"method {method!r} has no score for {missing}; it has {sorted(scores[method])}"
            )
    values = np.array([[float(scores[name][m]) for m in metrics] for name in methods])  # (methods, metrics)
    fig = _new_figure(max(3.5, 0.9 * len(methods) * max(1, len(metrics) * 0.7) + 1.2), 3.2, dpi)
    ax = fig.subplots()
    x = np.arange(len(methods))
    bar_width = 0.8 / len(metrics)
    for j, name in enumerate(metrics):
        bars = ax.bar(x + (j - (len(metrics) - 1) / 2) * bar_width, values[:, j], bar_width, label=name)
        ax.bar_label(bars, fmt="%.3f" if values.max() <= 1 else "%.1f", fontsize=7, padding=1)
    ax.set_xticks(x, methods, fontsize=8, rotation=20 if max(len(m) for m in methods) > 10 else 0)
    ax.tick_params(axis="y", labelsize=7)
    headroom = 1.12 if len(metrics) == 1 else 1.25  # room for the value labels (and the legend)
    ax.set_ylim(0, (1.0 if values.max() <= 1 else values.max()) * headroom)
    ax.spines[["top", "right"]].set_visible(False)
    if len(metrics) > 1:
        ax.legend(fontsize=7, frameon=False, ncols=len(metrics), loc="upper left")
    else:
        ax.set_ylabel(metrics[0], fontsize=8)
    ax.set_title(title if title is not None else ", ".join(metrics), fontsize=9)
    return _save(fig, path)


def plot_class_maps(
    rows: Sequence[Mapping[str, object]],
    class_names: Sequence[str],
    class_colors: Sequence[Color],
    path: str | os.PathLike,
    title: str | None = None,
    panel_size: float = 1.8,
    dpi: int = 100,
) -> Path:
    """One row per tile: true colour, ground truth, the pseudomask, then one heat map per label of the tile.

    What a class-map method (class attention, Grad-CAM) saw before its mask rule: each label's map, scaled to its
    own range, titled with the class name and its predicted probability.

    Args:
        rows: one dict per tile with ``"id"``, ``"image"`` ((C, H, W) bands), ``"ground truth"`` and ``"mask"``
            ((H, W) class ids, 255 = unlabelled; either may be missing), ``"maps"`` ((C, h, w) class maps),
            ``"labels"`` (class ids to draw, in order) and optionally ``"probs"`` ((C,) probabilities).
        class_names, class_colors: as :func:`plot_pseudomask_panel`.
        path: PNG to write.
        title: figure title.
        panel_size, dpi: inches per panel and resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not rows:
        raise WeaksegError("plot_class_maps needs at least one row")
    n_maps = max(1, max(len(list(r["labels"])) for r in rows))  # type: ignore[arg-type]
    n_cols = 3 + n_maps
    fig = _new_figure(n_cols * panel_size, len(rows) * panel_size + 0.5 + (0.35 if title else 0.0), dpi)
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for r, row in enumerate(rows):
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].imshow(_as_rgb_display(np.asarray(row["image"])), interpolation="nearest")
        axes[r, 0].set_ylabel(str(row.get("id", r)), fontsize=8)
        for c, key in ((1, "ground truth"), (2, "mask")):
            if row.get(key) is not None:
                axes[r, c].imshow(colorize_mask(np.asarray(row[key]), class_colors), interpolation="nearest")
            else:
                axes[r, c].set_axis_off()
        maps = np.asarray(row["maps"], dtype=np.float64)  # (C, h, w)
        probs = row.get("probs")
        labels = list(row["labels"])  # type: ignore[arg-type]
        for j in range(n_maps):
            ax = axes[r, 3 + j]
            if j >= len(labels):
                ax.set_axis_off()
                continue
            c = int(labels[j])
            m = maps[c]
            span = m.max() - m.min()
            ax.imshow((m - m.min()) / span if span > 0 else np.zeros_like(m), cmap="magma", vmin=0, vmax=1,
                      interpolation="bilinear")
            name = class_names[c] + (f" {float(np.asarray(probs)[c]):.2f}" if probs is not None else "")
            ax.set_title(name, fontsize=8)
            for spine in ax.spines.values():  # the class colour frames the panel (light colours vanish as text)
                spine.set_edgecolor(np.array(_rgb255(class_colors[c])) / 255)
                spine.set_linewidth(3)
        if r == 0:
            for c, name in ((0, "true colour"), (1, "ground truth"), (2, "pseudomask")):
                axes[0, c].set_title(name, fontsize=9)
    fig.legend(handles=_legend_handles(class_names, class_colors), loc="outside lower center",
               ncols=min(len(class_names) + 1, 5), fontsize=8, frameon=False, handlelength=1.2)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_cross_correlation(c: np.ndarray, path: str | os.PathLike, title: str | None = None,
                           dpi: int = 100) -> Path:
    """Heatmap of a Barlow Twins cross-correlation matrix C (P x P) on the fixed range [-1, 1] (blue -1, white 0,
    red 1), so heatmaps of different epochs compare: a converged run is a red diagonal on a white field."""
    c = np.asarray(c, dtype=np.float64)
    fig = _new_figure(6.2, 5.4, dpi)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(c, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    ax.set_xlabel("view 2 embedding dimension")
    ax.set_ylabel("view 1 embedding dimension")
    fig.colorbar(im, ax=ax, shrink=0.85, label="C")
    ax.set_title(title or "Barlow Twins cross-correlation C", fontsize=9, wrap=True)
    return _save(fig, path)
