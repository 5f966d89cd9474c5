"""Segmentation losses of the refinement stage: cross-entropy ignoring 255, and WeakTr's gradient-clipping loss.

Zhu et al., "WeakTr: Exploring Plain Vision Transformer for Weakly-supervised Semantic Segmentation", IEEE TIP,
Eq. (12)-(13) and the released ``OnlineRetraining`` code (``weaktr.md`` 4.1; the author confirms in hustvl/WeakTr
issue #9 that the code realises the equations). Pseudomask pixels whose loss stays far above the rest are
likely wrong labels; the loss of a pixel is clipped at a per-window threshold so such pixels stop pulling the
network (a clipped pixel contributes a constant: zero gradient).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from weakseg.data.classes import IGNORE_INDEX

#: WeakTr's gate: no clipping while the batch-mean loss is above it (the warm-up).
DEFAULT_CLIP_START = 1.2
#: WeakTr's window is 120 px on 480 crops, a 4 x 4 grid of windows; weakseg keeps the grid on any tile size.
DEFAULT_CLIP_GRID = 4


def masked_cross_entropy(logits: Tensor, mask: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy over the pixels whose label is not ``ignore_index``.

    ``F.cross_entropy(..., ignore_index=...)`` with ``reduction="mean"`` divides by the number of labelled
    pixels and returns NaN (0 / 0) when a batch has none, which happens with pseudomasks that leave whole
    tiles unlabelled. Summing and dividing by ``max(count, 1)`` returns 0 instead, still attached to the
    graph, so ``backward`` gives zero gradients rather than NaN weights.

    Args:
        logits: (B, K, H, W) class scores.
        mask: (B, H, W) int64 labels in ``[0, K)`` or ``ignore_index``.
        ignore_index: label that contributes neither loss nor count.
    """
    loss_sum = F.cross_entropy(logits, mask, ignore_index=ignore_index, reduction="sum")
    labelled = (mask != ignore_index).sum().clamp_min(1)
    return loss_sum / labelled


def clip_window(height: int, width: int, window: int | None) -> int:
    """The window side P: ``window``, or ``ceil(min(H, W) / 4)``.

    WeakTr's P = 120 on its 480 crops makes a 4 x 4 grid of windows; a fixed 120 would be one window (the global
    mean) on weakseg's 64 px tiles, so the default keeps the grid instead: P = 16 on 64 x 64 tiles, 8 on 32 x 32.
    """
    if window is not None:
        return int(window)
    return max(1, math.ceil(min(height, width) / DEFAULT_CLIP_GRID))


def gradient_clipping_loss(
    logits: Tensor, mask: Tensor, start: float = DEFAULT_CLIP_START, window: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, dict[str, Tensor]]:
    """WeakTr's gradient-clipping loss (``weaktr.md`` 4.1), exactly:

    1. l(b, h, w): per-pixel cross-entropy, ignored pixels 0;
    2. mu: the mean of l over all B x H x W pixels, *detached*, the ignored zeros included;
    3. mu > ``start``: no clipping (the warm-up until the batch-mean loss falls below 1.2);
    4. else the batch-mean map l_bar(h, w) (shared by the batch), its mean lambda_i in each non-overlapping
       P x P window (P = ``window``, avg-pool with kernel = stride = P; where H or W is not a multiple of P the
       last row / column of windows is smaller and averages its own pixels, and a P larger than the tile is one
       window; the original requires divisibility), theta_i = max(lambda_i, mu), and l' = min(l, theta) in the
       released code's form ``clamp(l - theta, max=0) + theta``: a pixel above its window's threshold contributes
       the constant theta (zero gradient), one at or below it keeps its full gradient;
    5. the loss is the mean of l' over all B x H x W pixels (ignored pixels count in the denominator, unlike the
       ignore-aware mean of :func:`masked_cross_entropy`).

    Args:
        logits: (B, K, H, W); mask: (B, H, W) int64 with ``ignore_index``.
        start: the gate tau_start (1.2). window: P (default: :func:`clip_window`).

    Returns:
        The loss and, detached, ``mu`` and ``clipped`` (the fraction of labelled pixels whose loss was clipped:
        0 in the warm-up).

    Raises:
        ValueError: a ``window`` below 1.
    """
    loss = F.cross_entropy(logits, mask, ignore_index=ignore_index, reduction="none")  # (B, H, W), ignored 0
    mu = loss.detach().mean()
    labelled = mask != ignore_index
    if mu > start:
        return loss.mean(), {"mu": mu, "clipped": torch.zeros((), device=loss.device)}
    H, W = loss.shape[-2:]
    P = clip_window(H, W, window)
    if P < 1:
        raise ValueError(f"clip window must be at least 1 pixel, got {P}")
    mean_map = loss.detach().mean(dim=0)[None, None]  # (1, 1, H, W), shared by the batch
    lam = F.avg_pool2d(mean_map, kernel_size=P, stride=P, ceil_mode=True, count_include_pad=False)  # (1,1,h,w)
    theta = torch.maximum(lam, mu)
    theta = theta.repeat_interleave(P, dim=-2).repeat_interleave(P, dim=-1)[0, 0, :H, :W]  # (H, W)
    clipped = (loss - theta).clamp(max=0) + theta  # min(l, theta); above theta: the constant theta, no gradient
    fraction = ((loss.detach() > theta) & labelled).sum() / labelled.sum().clamp_min(1)
    return clipped.mean(), {"mu": mu, "clipped": fraction}
