"""The floor of every pseudomask comparison: each pixel takes the image's most probable class.

Any WSSS method (Hanna, Mommert and Borth, "Sparse Multimodal Vision Transformer for Weakly Supervised
Semantic Segmentation", CVPRW 2023, and the Grad-CAM baseline) must beat this. On DFC2020 tiles a single
land-cover class often dominates, so the floor is far from zero and reporting it keeps gains honest.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from weakseg.masks.labels import check_label_inputs, top_class
from weakseg.masks.result import STATUS_OK, PseudomaskResult, check_out_size, constant_masks
from weakseg.methods.base import PseudomaskMethod
from weakseg.models.vit import GatedViT

REASON_TOP_CLASS = "top_class"


def top_class_pseudomasks(
    probs: Tensor, out_size: tuple[int, int], label_sets: Tensor | None = None
) -> PseudomaskResult:
    """Every pixel = the most probable class (among ``label_sets`` where an image's set is non-empty).

    Restricting to the label set only matters in oracle mode, where the ground-truth labels may exclude the
    classifier's favourite; with predicted labels (``probs > 0.5``) the top class is already in the set.
    Confidence is 1 on images with exactly one label (the mask is then right wherever the label is) and 0
    elsewhere (the top class is a guess for the other labels' pixels).

    Args:
        probs: (B, C) class probabilities.
        out_size: (H, W) of the masks.
        label_sets: optional (B, C) bool labels.

    Returns:
        A :class:`PseudomaskResult`; every image has status ``ok`` and reason ``top_class``.
    """
    if label_sets is not None:
        check_label_inputs(probs, label_sets)
        label_sets = label_sets.to(probs.device)
    elif probs.ndim != 2:
        raise ValueError(f"probs must be (B, C), got {tuple(probs.shape)}")
    H, W = check_out_size(out_size)
    first = top_class(probs, label_sets)  # (B,)
    used = torch.nn.functional.one_hot(first, probs.shape[1]).bool()  # (B, C)
    B = probs.shape[0]
    single = (label_sets.sum(dim=1) == 1).cpu().numpy() if label_sets is not None else np.zeros(B, dtype=bool)
    confidence = np.broadcast_to(single[:, None, None], (B, H, W)).astype(np.float32)
    return PseudomaskResult(
        constant_masks(first, (H, W)), [STATUS_OK] * B, [REASON_TOP_CLASS] * B, used.cpu().numpy(), confidence
    )


class TopClass(PseudomaskMethod):
    """Every pixel = the most probable label (the floor)."""

    name = "top_class"
    summary = "the floor: every pixel takes the image's most probable label"

    def pseudomasks(
        self, model: GatedViT, images: Tensor, probs: Tensor, label_sets: Tensor, out_size: tuple[int, int]
    ) -> PseudomaskResult:
        return top_class_pseudomasks(probs, out_size, label_sets)
