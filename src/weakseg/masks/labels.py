"""Image label sets: which classes a pseudomask may contain.

Predicted labels are ``probability > 0.5`` *strictly* (the sparse ViT's original used ``numpy.round``, which sends
exactly 0.5 to 0; ``sparse_vit.md`` section 3 step 2). Oracle mode uses the ground-truth image labels instead (the
original ``--oracle`` was a no-op, defect 14). The caller picks one; methods only see a ``(B, C)`` bool tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor


def predicted_label_sets(probs: Tensor, threshold: float = 0.5) -> Tensor:
    """Predicted labels: ``probs > threshold`` strictly (exactly 0.5 is *not* a label), (B, C) bool."""
    return probs > threshold


def oracle_label_sets(targets: Tensor) -> Tensor:
    """Ground-truth image labels (multi-hot float, like a dataset sample's ``label``) as a (B, C) bool set."""
    return targets > 0.5


def check_label_inputs(probs: Tensor, label_sets: Tensor, batch: int | None = None) -> None:
    """Shape checks shared by the methods (programming errors, hence ValueError)."""
    if probs.ndim != 2 or label_sets.shape != probs.shape:
        raise ValueError(
            "probs and label_sets must both be (B, C); "
            f"got {tuple(probs.shape)} and {tuple(label_sets.shape)}"
        )
    if label_sets.dtype != torch.bool:
        raise ValueError(f"label_sets must be a bool tensor, got {label_sets.dtype}")
    if probs.shape[1] > 255:
        raise ValueError(f"at most 255 classes fit a uint8 mask with 255 reserved, got {probs.shape[1]}")
    if batch is not None and probs.shape[0] != batch:
        raise ValueError(f"probs cover {probs.shape[0]} images but the maps cover {batch}")


def top_class(probs: Tensor, label_sets: Tensor | None = None) -> Tensor:
    """Most probable class per image, (B,) long; among ``label_sets`` where an image's set is non-empty."""
    if label_sets is None:
        return probs.argmax(dim=1)
    label_sets = label_sets.to(probs.device)
    masked = torch.where(label_sets, probs, torch.full_like(probs, -torch.inf))  # (B, C)
    return torch.where(label_sets.any(dim=1), masked.argmax(dim=1), probs.argmax(dim=1))


def sort_labels_by_probability(probs: Tensor, label_sets: Tensor) -> Tensor:
    """Class ids of each image's label set by descending probability, (B, C) long; ties: lower id first.

    Only the first ``label_sets[b].sum()`` entries of row ``b`` are meaningful.
    """
    masked = torch.where(label_sets.to(probs.device), probs, torch.full_like(probs, -torch.inf))  # (B, C)
    return torch.sort(masked, dim=1, descending=True, stable=True).indices
