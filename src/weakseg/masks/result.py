"""What every pseudomask method returns, and the rules every method shares for the easy images.

Every method in :mod:`weakseg.methods` turns per-image evidence (attention maps, CAMs, class probabilities) into a
dense ``uint8`` class-id mask plus a per-pixel confidence. They share three rules taken from the sparse ViT paper
(Hanna, Mommert and Borth, "Sparse Multimodal Vision Transformer for Weakly Supervised Semantic Segmentation",
CVPRW 2023, pseudomask step 2) and from the defects of its released code that we do not repeat
(``sparse_vit.md``, section 8):

- **No silent drops** (defect 1). Every image gets a mask plus a ``status`` (``"ok"`` or ``"fallback"``) and a
  ``reason`` that says which rule produced it, so coverage can be reported by reason.
- **Zero or one label** (:func:`label_set_rules`): no label -> the most probable class everywhere (a fallback,
  confidence 0); one label -> that class everywhere (confidence 1: the mask is right wherever the label is).
- **Exact nearest fill** (defect 3). Unassigned pixels take the label of the Euclidean-nearest assigned pixel via
  :func:`scipy.ndimage.distance_transform_edt` with ``return_indices=True``: linear time and exact, instead of the
  original's O((HW)^2) pairwise distances (TokenMasking-WSSS's BFS fill is the same idea in the 4-neighbour metric).

**Confidence** is a per-pixel score in [0, 1], higher = more likely right, whose meaning each method documents
(e.g. the margin between the best and second-best class map). Refinement ignores the least confident pixels.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from weakseg.errors import ConfigError
from weakseg.masks.labels import check_label_inputs, top_class

#: Label of a pixel that no map claimed, before :func:`nearest_fill` (any negative value works).
UNASSIGNED = -1

#: Statuses a method may give an image.
STATUS_OK = "ok"
STATUS_FALLBACK = "fallback"

#: Reasons shared by all methods (method-specific ones live in their modules).
REASON_NO_LABEL = "no_label_above_threshold"
REASON_SINGLE_LABEL = "single_label"
REASON_NOTHING_PAINTED = "nothing_painted"


@dataclass
class PseudomaskResult:
    """Pseudomasks of a batch with the rule that produced each one.

    Attributes:
        masks: (B, H, W) uint8 class ids; every pixel is assigned (no 255) because every failure has a
            fallback.
        status: per image, ``"ok"`` (the method ran as designed) or ``"fallback"`` (a documented substitute,
            e.g. the top class everywhere, produced the mask).
        reason: per image, ``";"``-joined reason tokens: the first names the rule (``"clustered"``,
            ``"single_label"``, ``"no_label_above_threshold"``, ...), later ones report partial problems
            (``"empty_foreground:3"``: class 3 was not painted).
        used_labels: (B, C) bool, the classes the method tried to place in each mask (after fallbacks: e.g.
            the top-k classes when there were fewer heads than labels, or the top class when there was no
            label).
        confidence: (B, H, W) float32 in [0, 1], the method's per-pixel confidence (module docstring).
        regions: optional (B, H, W) int16 region ids before they were given classes (-1 = no region): the
            clusters of attention clustering. With ``region_class`` it lets the pipeline check how often the
            region -> class assignment is the best one (diagnostic against ground truth).
        region_class: optional (B, K) int64, the class given to region k of each image (-1 = no such region).
    """

    masks: np.ndarray
    status: list[str]
    reason: list[str]
    used_labels: np.ndarray
    confidence: np.ndarray | None = None
    regions: np.ndarray | None = None
    region_class: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.confidence is None:
            self.confidence = np.ones(self.masks.shape, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.status)

    def reason_counts(self) -> dict[str, int]:
        """How many images carry each reason token (an image with two tokens counts for both)."""
        counts: Counter[str] = Counter()
        for r in self.reason:
            counts.update(t for t in r.split(";") if t)
        return dict(sorted(counts.items()))

    def status_counts(self) -> dict[str, int]:
        """How many images have each status."""
        return dict(sorted(Counter(self.status).items()))

    @classmethod
    def concatenate(cls, results: Sequence[PseudomaskResult]) -> PseudomaskResult:
        """Join the results of consecutive batches (in order); region fields are kept only if all have them."""
        if not results:
            raise ValueError("concatenate needs at least one result")
        with_regions = all(r.regions is not None and r.region_class is not None for r in results)
        width = max(r.region_class.shape[1] for r in results) if with_regions else 0  # type: ignore[union-attr]
        return cls(
            masks=np.concatenate([r.masks for r in results]),
            status=[s for r in results for s in r.status],
            reason=[s for r in results for s in r.reason],
            used_labels=np.concatenate([r.used_labels for r in results]),
            confidence=np.concatenate([r.confidence for r in results]),  # type: ignore[misc]
            regions=np.concatenate([r.regions for r in results]) if with_regions else None,  # type: ignore[misc]
            region_class=np.concatenate([
                np.pad(r.region_class, ((0, 0), (0, width - r.region_class.shape[1])), constant_values=-1)  # type: ignore[union-attr]
                for r in results
            ]) if with_regions else None,
        )


def check_out_size(out_size: Sequence[int]) -> tuple[int, int]:
    """Validate the pseudomask size (height, width); raise :class:`ConfigError` naming it."""
    size = tuple(int(s) for s in out_size)
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(
            f"pseudomask size must be two positive integers (height, width), got {list(out_size)}"
        )
    return size[0], size[1]


def constant_masks(classes: Tensor, out_size: tuple[int, int]) -> np.ndarray:
    """(B, H, W) uint8 masks, image ``b`` filled with ``classes[b]``."""
    ids = classes.detach().to("cpu", torch.uint8).numpy()  # (B,)
    return np.broadcast_to(ids[:, None, None], (len(ids), *out_size)).copy()


def label_set_rules(
    probs: Tensor, label_sets: Tensor, out_size: Sequence[int], multi_reason: str
) -> tuple[PseudomaskResult, list[int]]:
    """The rules every method shares for the size of an image's label set (n).

    - n = 0: whole image = the most probable class; ``fallback``, ``no_label_above_threshold``, confidence 0.
    - n = 1: whole image = that class; ``ok``, ``single_label``, confidence 1.
    - n >= 2: left to the method: ``ok`` with reason ``multi_reason``; mask = the most probable label and
      confidence 0 until the method overwrites them.

    Args:
        probs: (B, C) class probabilities.
        label_sets: (B, C) bool labels, predicted or oracle.
        out_size: (H, W) of the masks.
        multi_reason: the reason token of the method's own rule.

    Returns:
        The result (``used_labels`` = the label set, or the top class for n = 0) and the indices of the images
        with two or more labels.
    """
    check_label_inputs(probs, label_sets)
    H, W = check_out_size(out_size)
    label_sets = label_sets.to(probs.device)
    n_labels = label_sets.sum(dim=1).tolist()
    first = top_class(probs, label_sets)  # (B,)
    used = label_sets.clone()
    no_label = torch.tensor([n == 0 for n in n_labels], device=probs.device, dtype=torch.bool)
    used[no_label] = torch.nn.functional.one_hot(first[no_label], probs.shape[1]).bool()
    confidence = np.zeros((len(n_labels), H, W), dtype=np.float32)
    confidence[[n == 1 for n in n_labels]] = 1.0
    result = PseudomaskResult(
        masks=constant_masks(first, (H, W)),
        status=[STATUS_FALLBACK if n == 0 else STATUS_OK for n in n_labels],
        reason=[REASON_NO_LABEL if n == 0 else REASON_SINGLE_LABEL if n == 1 else multi_reason for n in n_labels],
        used_labels=used.cpu().numpy(),
        confidence=confidence,
    )
    return result, [b for b, n in enumerate(n_labels) if n >= 2]


def nearest_fill(labels: np.ndarray) -> np.ndarray:
    """Give every unassigned pixel (negative label) the label of the Euclidean-nearest assigned pixel.

    Exact: :func:`scipy.ndimage.distance_transform_edt` returns, for each pixel, the index of the nearest zero
    of its input; the input is "pixel is unassigned", so the zeros are the assigned pixels. Among equidistant
    assigned pixels the choice is the transform's, not raster order.

    Args:
        labels: (B, H, W) or (H, W) integer labels, negative = unassigned. Every image must have at least one
            assigned pixel (callers fall back to the top class before filling).

    Returns:
        A new array of the same shape and dtype without negative values.

    Raises:
        ValueError: an image has no assigned pixel at all.
    """
    single = labels.ndim == 2
    batch = labels[None] if single else labels
    out = batch.copy()
    for b in range(batch.shape[0]):  # one C call per image; images without holes skip it
        unassigned = batch[b] < 0  # (H, W)
        if not unassigned.any():
            continue
        if unassigned.all():
            raise ValueError(f"image {b} has no assigned pixel to fill from")
        rows, cols = ndimage.distance_transform_edt(unassigned, return_distances=False, return_indices=True)
        out[b] = batch[b][rows, cols]
    return out[0] if single else out
