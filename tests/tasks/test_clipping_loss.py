"""WeakTr's gradient-clipping loss (weaktr.md 4.1) on 4 x 4 tiles computed by hand: 2 x 2 windows of 2 px, an
ignored pixel, both sides of the 1.2 gate, zero gradients exactly where a pixel is clipped or ignored, ignored
pixels in the denominator, thresholds shared by the batch. (``test_losses.py`` has the 2 x 2 cases.)"""

from __future__ import annotations

import math

import pytest
import torch

from weakseg.tasks.losses import gradient_clipping_loss

IGN = None  # an ignored pixel (label 255) in LOSSES

#: The per-pixel loss each test pixel gets (label 0, logits made to give exactly this CE). Windows of 2 x 2 px:
#: top-left mean 0.2, top-right (3 + .4 + .4 + .2) / 4 = 1.0, bottom-left (0 + .6 + .6 + .68) / 4 = 0.47,
#: bottom-right (.8 + 1.2 + 1 + 1) / 4 = 1.0. Sum 10.68 over 16 pixels (the ignored one counts as 0).
LOSSES = [[0.2, 0.2, 3.0, 0.4],
          [0.2, 0.2, 0.4, 0.2],
          [IGN, 0.6, 0.8, 1.2],
          [0.6, 0.68, 1.0, 1.0]]


def make(losses: list[list[float | None]], scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 2, H, W) logits and (1, H, W) mask: label 0 everywhere but the ignored pixels, logits (a, 0) with
    a = -log(e^l - 1), so that CE = log(1 + e^-a) = l exactly."""
    a = [[0.0 if v is None else -math.log(math.expm1(scale * v)) for v in row] for row in losses]
    a_t = torch.tensor(a, dtype=torch.float64)
    logits = torch.stack([a_t, torch.zeros_like(a_t)])[None]
    mask = torch.tensor([[255 if v is None else 0 for v in row] for row in losses])[None]
    return logits, mask


def grad_map(logits: torch.Tensor) -> torch.Tensor:
    assert logits.grad is not None
    return logits.grad.abs().sum(dim=1)  # (B, H, W)


def test_clipped_per_window_by_hand() -> None:
    logits, mask = make(LOSSES)
    logits.requires_grad_(True)
    mu = 10.68 / 16  # 0.6675: < 1.2, so the loss clips; the ignored zero is in the mean
    # theta = max(window mean, mu): TL 0.6675, TR 1.0, BL 0.6675, BR 1.0
    # clipped: TR 3.0 -> 1.0; BL 0.68 -> 0.6675 (above mu, though below 0.7120 = 10.68 / 15); BR 1.2 -> 1.0;
    # BR's 1.0 equals its threshold: not clipped, full gradient
    clipped_sum = 10.68 - (3.0 - 1.0) - (0.68 - mu) - (1.2 - 1.0)
    loss, stats = gradient_clipping_loss(logits, mask, start=1.2, window=2)
    assert stats["mu"].item() == pytest.approx(mu, rel=1e-9)
    assert loss.item() == pytest.approx(clipped_sum / 16, rel=1e-9)  # 16: the ignored pixel in the denominator
    assert stats["clipped"].item() == pytest.approx(3 / 15)  # of the 15 labelled pixels
    loss.backward()
    g = grad_map(logits)[0]
    zero = {(0, 2), (3, 1), (2, 3), (2, 0)}  # the three clipped pixels and the ignored one
    for h in range(4):
        for w in range(4):
            if (h, w) in zero:
                assert g[h, w] == 0, (h, w)  # exactly zero, not small
            else:
                assert g[h, w] > 0, (h, w)
    # an unclipped pixel's gradient is the plain CE gradient over 16 pixels: d/da log(1 + e^-a) / 16
    p0 = torch.sigmoid(logits[0, 0, 0, 0] - logits[0, 1, 0, 0]).item()
    assert logits.grad[0, 0, 0, 0].item() == pytest.approx(-(1 - p0) / 16, rel=1e-9)


def test_no_clipping_above_the_gate_and_the_mean_keeps_ignored_zeros() -> None:
    logits, mask = make(LOSSES, scale=2.0)  # every loss doubled: mu = 21.36 / 16 = 1.335 > 1.2
    logits.requires_grad_(True)
    loss, stats = gradient_clipping_loss(logits, mask, start=1.2, window=2)
    assert stats["mu"].item() == pytest.approx(21.36 / 16, rel=1e-9)
    assert loss.item() == pytest.approx(21.36 / 16, rel=1e-9)  # plain mean over all 16 pixels, no clipping
    assert stats["clipped"].item() == 0
    loss.backward()
    g = grad_map(logits)[0]
    assert g[2, 0] == 0 and int((g > 0).sum()) == 15  # every labelled pixel trains, the ignored one does not
    # the gate moved above mu: the same batch is clipped (TR 6.0 -> 2.0, BR 2.4 -> 2.0, BL 1.36 -> 1.335)
    logits2, _ = make(LOSSES, scale=2.0)
    clipped, _ = gradient_clipping_loss(logits2, mask, start=1.4, window=2)
    assert clipped.item() == pytest.approx((21.36 - 4.0 - 0.4 - (1.36 - 1.335)) / 16, rel=1e-9)


def test_thresholds_are_shared_across_the_batch() -> None:
    """Image 2 all at 0.2: the batch-mean map halves image 1's window means and mu, so image 1 clips more."""
    first, mask1 = make(LOSSES)
    second, mask2 = make([[0.2] * 4 for _ in range(4)])
    logits = torch.cat([first, second]).requires_grad_(True)
    mask = torch.cat([mask1, mask2])
    mu = (10.68 + 16 * 0.2) / 32  # 0.43375
    # window means of the batch-mean map: TL 0.2, TR (1.0 + 0.2) / 2 = 0.6, BL (0.47 + 0.2) / 2 = 0.335, BR 0.6
    # theta: TL mu, TR 0.6, BL mu, BR 0.6 (the same for both images)
    image1 = 4 * 0.2 + (0.6 + 0.4 + 0.4 + 0.2) + (0.0 + 3 * mu) + 4 * 0.6
    image2 = 16 * 0.2  # under every threshold
    loss, stats = gradient_clipping_loss(logits, mask, start=1.2, window=2)
    assert stats["mu"].item() == pytest.approx(mu, rel=1e-9)
    assert loss.item() == pytest.approx((image1 + image2) / 32, rel=1e-9)
    loss.backward()
    g = grad_map(logits)
    # image 1's 0.6 pixels at (2, 1) and (3, 0) train when alone (theta 0.6675) but are clipped next to image 2
    assert g[0, 2, 1] == 0 and g[0, 3, 0] == 0 and g[0, 2, 2] == 0
    alone, mask_alone = make(LOSSES)
    alone.requires_grad_(True)
    gradient_clipping_loss(alone, mask_alone, start=1.2, window=2)[0].backward()
    assert grad_map(alone)[0, 2, 1] > 0 and grad_map(alone)[0, 3, 0] > 0
    assert int((g[1] > 0).sum()) == 16  # image 2 is never clipped


def test_windows_that_do_not_divide_the_tile_average_their_own_pixels() -> None:
    """4 x 4 with P = 3: windows rows/cols [0:3] and [3:4]; the last ones average their own pixels."""
    logits, mask = make(LOSSES)
    loss, _ = gradient_clipping_loss(logits, mask, start=1.2, window=3)
    mu = 10.68 / 16
    flat = [[0.0 if v is None else v for v in row] for row in LOSSES]

    def mean(rows: range, cols: range) -> float:
        return sum(flat[h][w] for h in rows for w in cols) / (len(rows) * len(cols))

    expected = 0.0
    for rows in (range(0, 3), range(3, 4)):
        for cols in (range(0, 3), range(3, 4)):
            theta = max(mean(rows, cols), mu)
            expected += sum(min(flat[h][w], theta) for h in rows for w in cols)
    assert loss.item() == pytest.approx(expected / 16, rel=1e-9)
    one_window, _ = gradient_clipping_loss(logits, mask, start=1.2, window=8)  # larger than the tile: one window
    assert one_window.item() == pytest.approx(sum(min(v, mu) for row in flat for v in row) / 16, rel=1e-9)
