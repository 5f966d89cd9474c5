"""Per-class maps -> pseudomasks: the two rules every class-map method (Grad-CAM, class attention, ...) shares.

A class-map method produces, per image, one non-negative map per class on its patch grid, (B, C, h, w). Two
rules turn them into a mask, for images with two or more labels (zero and one label:
:func:`weakseg.masks.result.label_set_rules`):

- ``"argmax"`` (weakseg's default): maps are upsampled bilinearly to the tile, normalised per class
  (``"max"``: divided by their maximum, for maps with a floor of 0 such as ReLU'd CAMs; ``"minmax"``: mapped to
  [0, 1], for maps with a floor above 0 such as attention), and each pixel takes the arg-max over the image's
  labels. Pixels where every label's map is 0 take the nearest labelled pixel's class. Confidence = the margin
  between the best and the second-best label's normalised map (0 for filled pixels).
- ``"threshold"``: the rule of TokenMasking-WSSS (Hanna & Borth, ICCV 2025; ``token_masking.md`` section 4 steps
  4-6): each label's upsampled map is thresholded at its own spatial mean (pixels at or above it, as released), labels are painted in ascending
  probability so the most probable label wins overlaps, and the holes are filled (here with the exact nearest
  fill). Confidence = how far above its own mean the painted map is, relative to its maximum:
  ``(v - mean) / (max - mean)`` (0 for filled pixels).
- ``"background"``: for datasets with a background class (VOC): the foreground labels' maps, normalised as for
  ``"argmax"`` (WeakTr: min-max), compete per pixel with a constant plane of value ``background_threshold`` t,
  which stands for the background class (WeakTr, ``weaktr.md`` section 3 step 7; ``datasets.md`` 4: t swept
  0.3-0.6 on training ground truth). The background class is always in the label set and its own map is never
  read, so an image with one foreground label is split into that label and background. Confidence = the margin
  between the best and the second-best channel, the plane included. Every pixel is painted.

A label whose map cannot be located gets no pixel and the reason ``<empty_reason>:<class>`` is appended: an
all-zero map under ``"max"`` normalisation, a constant map under ``"minmax"`` and under ``"threshold"``. If no label gets a pixel, the most probable label fills the image
(``fallback``, ``nothing_painted``, confidence 0).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from weakseg.masks.labels import check_label_inputs
from weakseg.masks.result import (
    REASON_NOTHING_PAINTED,
    STATUS_FALLBACK,
    UNASSIGNED,
    PseudomaskResult,
    check_out_size,
    label_set_rules,
    nearest_fill,
)

MaskRule = Literal["argmax", "threshold", "background"]
MASK_RULES: tuple[str, ...] = ("argmax", "threshold", "background")
#: WeakTr v2's background threshold on VOC (``weaktr.md`` 3 step 7).
DEFAULT_BACKGROUND_THRESHOLD = 0.43
Normalization = Literal["max", "minmax"]
NORMALIZATIONS: tuple[str, ...] = ("max", "minmax")


def upsample_maps(maps: Tensor, out_size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (B, K, h, w) maps to (B, K, H, W) with half-pixel centres (as cv2 INTER_LINEAR).

    ``align_corners=False`` matches the ``cv2.resize`` call of the original code; the output is (H, W) in this
    order for any aspect ratio (sparse ViT defect 15: the original passed (H, W) where cv2 expects (W, H)).
    """
    if tuple(maps.shape[-2:]) == tuple(out_size):
        return maps
    return F.interpolate(maps, size=out_size, mode="bilinear", align_corners=False)


def normalize_maps(maps: Tensor, mode: Normalization) -> tuple[Tensor, Tensor]:
    """Per-map normalisation of (B, K, H, W) maps to [0, 1]; returns the maps and a (B, K) bool "locatable".

    ``"max"``: ``m / max(m)`` (maps must be non-negative; an all-zero map is not locatable). ``"minmax"``:
    ``(m - min) / (max - min)`` (a constant map is not locatable and becomes 0).
    """
    peak = maps.amax(dim=(-2, -1), keepdim=True)  # (B, K, 1, 1)
    tiny = torch.finfo(maps.dtype).tiny
    if mode == "max":
        return maps / peak.clamp_min(tiny), (peak > 0).flatten(1)
    if mode == "minmax":
        low = maps.amin(dim=(-2, -1), keepdim=True)
        span = peak - low
        return (maps - low) / span.clamp_min(tiny), (span > 0).flatten(1)
    raise ValueError(f"unknown normalisation {mode!r}; choose from {list(NORMALIZATIONS)}")


def class_maps_to_masks(
    maps: Tensor,
    probs: Tensor,
    label_sets: Tensor,
    out_size: tuple[int, int],
    *,
    rule: MaskRule = "argmax",
    normalize: Normalization = "max",
    multi_reason: str = "map_argmax",
    empty_reason: str = "empty_map",
    background_index: int | None = None,
    background_threshold: float = DEFAULT_BACKGROUND_THRESHOLD,
) -> PseudomaskResult:
    """Pseudomasks from per-class maps by ``rule`` (module docstring).

    Args:
        maps: (B, C, h, w) class maps; only the image's labels are read.
        probs: (B, C) class probabilities (fallbacks and the painting order of ``"threshold"``).
        label_sets: (B, C) bool labels, predicted or oracle.
        out_size: (H, W) of the masks.
        rule: ``"argmax"`` or ``"threshold"``.
        normalize: per-class normalisation of ``"argmax"`` (``"threshold"`` is scale-invariant).
        multi_reason: reason token of images with two or more labels.
        empty_reason: reason prefix of a label whose map is constant.
        background_index, background_threshold: the background class and the plane's value t of
            ``"background"`` (required there, unused otherwise).

    Returns:
        A :class:`PseudomaskResult` with (B, H, W) uint8 masks and confidence.
    """
    if maps.ndim != 4:
        raise ValueError(f"maps must be (B, C, h, w), got {tuple(maps.shape)}")
    if rule not in MASK_RULES:
        raise ValueError(f"unknown mask rule {rule!r}; choose from {list(MASK_RULES)}")
    B, C = maps.shape[:2]
    check_label_inputs(probs, label_sets, B)
    if probs.shape[1] != C:
        raise ValueError(f"maps have {C} classes but probs have {probs.shape[1]}")
    H, W = check_out_size(out_size)
    device = maps.device
    probs = probs.detach().to(device, torch.float32)
    label_sets = label_sets.to(device)
    if rule == "background":
        if background_index is None or not 0 <= background_index < C:
            raise ValueError(f"rule 'background' needs the background class index in [0, {C}), got "
                             f"{background_index}")
        label_sets = label_sets.clone()
        label_sets[:, background_index] = True  # the plane stands for background in every image
    result, multi = label_set_rules(probs, label_sets, (H, W), multi_reason)
    if not multi:
        return result
    index = torch.tensor(multi, device=device)
    labels = label_sets[index]  # (Bm, C)
    up = upsample_maps(maps[index].detach().float(), (H, W))  # (Bm, C, H, W)
    if rule == "argmax":
        painted, confidence, locatable = _argmax_rule(up, labels, normalize)
    elif rule == "background":
        assert background_index is not None
        normed, locatable = normalize_maps(up, normalize)
        normed[:, background_index] = float(background_threshold)
        locatable[:, background_index] = True
        painted, confidence, locatable = _argmax_rule(normed, labels, None, locatable)
    else:
        painted, confidence, locatable = _threshold_rule(up, labels, probs[index])
    has_paint = (painted >= 0).reshape(len(multi), -1).any(axis=1)  # (Bm,)
    rows = np.asarray(multi)
    result.masks[rows[has_paint]] = nearest_fill(painted[has_paint]).astype(np.uint8)
    result.confidence[rows[has_paint]] = confidence[has_paint]  # type: ignore[index]
    empty = (labels & ~locatable).cpu()
    for i, b in enumerate(multi):
        tokens = [f"{empty_reason}:{c}" for c in empty[i].nonzero().flatten().tolist()]
        if not has_paint[i]:
            tokens.append(REASON_NOTHING_PAINTED)
            result.status[b] = STATUS_FALLBACK
        result.reason[b] = ";".join([result.reason[b], *tokens])
    return result


def _argmax_rule(up: Tensor, labels: Tensor, normalize: Normalization | None,
                 locatable: Tensor | None = None) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """Painted labels (Bm, H, W) int16 (-1 = hole), confidence (Bm, H, W) float32, locatable (Bm, C).

    ``normalize`` None: ``up`` is already normalised and ``locatable`` given (the background rule)."""
    if normalize is None:
        assert locatable is not None
        normed = up
    else:
        normed, locatable = normalize_maps(up, normalize)  # (Bm, C, H, W), (Bm, C)
    usable = labels & locatable  # (Bm, C)
    normed = normed.masked_fill(~usable[:, :, None, None], -1.0)  # non-labels and flat maps never win
    top = normed.topk(2, dim=1) if normed.shape[1] > 1 else None
    best_value, best_class = (top.values[:, 0], top.indices[:, 0]) if top is not None else normed.max(dim=1)
    second = top.values[:, 1].clamp_min(0.0) if top is not None else torch.zeros_like(best_value)
    painted = best_value > 0  # (Bm, H, W)
    labels_out = torch.where(painted, best_class, UNASSIGNED).to("cpu", torch.int16).numpy()
    confidence = torch.where(painted, best_value - second, 0.0).to("cpu", torch.float32).numpy()
    return labels_out, confidence, locatable


def _threshold_rule(up: Tensor, labels: Tensor, probs: Tensor) -> tuple[np.ndarray, np.ndarray, Tensor]:
    """Own-mean threshold, ascending-probability painting: same outputs as :func:`_argmax_rule`."""
    mean = up.mean(dim=(-2, -1), keepdim=True)  # (Bm, C, 1, 1)
    peak = up.amax(dim=(-2, -1), keepdim=True)
    locatable = (peak > up.amin(dim=(-2, -1), keepdim=True)).flatten(1)  # (Bm, C)
    usable = labels & locatable
    foreground = (up >= mean) & usable[:, :, None, None]  # (Bm, C, H, W)
    # Painting in ascending probability == every pixel takes its most probable foreground label.
    rank = probs.argsort(dim=1).argsort(dim=1) + 1  # (Bm, C): 1 = least probable
    priority = foreground * rank[:, :, None, None]  # (Bm, C, H, W)
    best_priority, best_class = priority.max(dim=1)  # (Bm, H, W)
    painted = best_priority > 0
    strength = ((up - mean) / (peak - mean).clamp_min(torch.finfo(up.dtype).tiny)).clamp(0, 1)
    winner = strength.gather(1, best_class[:, None]).squeeze(1)  # (Bm, H, W)
    labels_out = torch.where(painted, best_class, UNASSIGNED).to("cpu", torch.int16).numpy()
    confidence = torch.where(painted, winner, 0.0).to("cpu", torch.float32).numpy()
    return labels_out, confidence, locatable
