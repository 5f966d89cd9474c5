"""WeakTr's gradient-clipping loss against hand-computed values (weaktr.md 4.1)."""

from __future__ import annotations

import math

import pytest
import torch

from weakseg.tasks.losses import clip_window, gradient_clipping_loss, masked_cross_entropy


def two_class_logits(a: list[list[float]]) -> torch.Tensor:
    """(1, 2, H, W) logits: class 0 scores a, class 1 scores 0, so CE(0) = log(1 + e^-a), CE(1) = log(1 + e^a)."""
    a_t = torch.tensor(a)
    return torch.stack([a_t, torch.zeros_like(a_t)])[None].requires_grad_(True)


def ce(a: float, label: int) -> float:
    return math.log1p(math.exp(-a)) if label == 0 else math.log1p(math.exp(a))


MASK = torch.tensor([[[0, 1], [255, 0]]])


def test_clipped_at_the_global_mean_with_ignored_zeros_in_it() -> None:
    a = [[2.0, 0.5], [0.0, -1.0]]
    logits = two_class_logits(a)
    losses = [ce(2.0, 0), ce(0.5, 1), 0.0, ce(-1.0, 0)]  # the ignored pixel counts as 0
    mu = sum(losses) / 4
    assert mu < 1.2
    loss, stats = gradient_clipping_loss(logits, MASK, window=2)  # one window: lambda = mu
    expected = sum(min(v, mu) for v in losses) / 4  # the denominator counts the ignored pixel
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["mu"].item() == pytest.approx(mu, rel=1e-6)
    assert stats["clipped"].item() == pytest.approx(2 / 3)  # pixels (0, 1) and (1, 1) of 3 labelled
    loss.backward()
    grad = logits.grad.abs().sum(dim=1)[0]  # (H, W)
    assert grad[0, 0] > 0  # below the threshold: trained
    assert grad[0, 1] == 0 and grad[1, 1] == 0  # above it: a constant, no gradient
    assert grad[1, 0] == 0  # ignored


def test_windows_of_one_pixel_clip_nothing_and_the_mean_keeps_ignored_pixels() -> None:
    a = [[2.0, 0.5], [0.0, -1.0]]
    logits = two_class_logits(a)
    loss, stats = gradient_clipping_loss(logits, MASK, window=1)  # theta = max(l, mu) >= l
    expected = (ce(2.0, 0) + ce(0.5, 1) + ce(-1.0, 0)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["clipped"].item() == 0
    assert masked_cross_entropy(logits, MASK).item() == pytest.approx(expected * 4 / 3, rel=1e-6)


def test_no_clipping_while_the_mean_loss_is_above_the_gate() -> None:
    a = [[-4.0, 4.0], [0.0, -3.0]]  # every labelled pixel badly wrong
    logits = two_class_logits(a)
    losses = [ce(-4.0, 0), ce(4.0, 1), 0.0, ce(-3.0, 0)]
    assert sum(losses) / 4 > 1.2
    loss, stats = gradient_clipping_loss(logits, MASK, window=2)
    assert loss.item() == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert stats["clipped"].item() == 0
    loss.backward()
    assert (logits.grad.abs().sum(dim=1)[0] > 0).sum() == 3
    clipped, _ = gradient_clipping_loss(two_class_logits(a), MASK, start=10.0, window=2)  # gate moved: clipped
    assert clipped.item() < loss.item()


def test_thresholds_are_shared_by_the_batch() -> None:
    """Window = 1 pixel: theta(p) = max(mean over the batch of l(p), mu). Changing image 2 changes image 1's loss."""
    mask = torch.zeros(2, 1, 2, dtype=torch.long)
    first = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    easy, hard = torch.tensor([[[[3.0, 3.0]], [[0.0, 0.0]]]]), torch.tensor([[[[3.0, -3.0]], [[0.0, 0.0]]]])
    l_first, l_easy, l_hard = ce(1.0, 0), ce(3.0, 0), ce(-3.0, 0)
    loss_a, _ = gradient_clipping_loss(torch.cat([first, easy]), mask, window=1)
    mu_a = (2 * l_first + 2 * l_easy) / 4
    theta_a = max((l_first + l_easy) / 2, mu_a)
    assert loss_a.item() == pytest.approx((2 * min(l_first, theta_a) + 2 * min(l_easy, theta_a)) / 4, rel=1e-6)
    loss_b, _ = gradient_clipping_loss(torch.cat([first, hard]), mask, window=1)
    mu_b = (2 * l_first + l_easy + l_hard) / 4
    assert mu_b < 1.2
    theta0 = max((l_first + l_easy) / 2, mu_b)  # pixel 0: image 2 is easy there
    theta1 = max((l_first + l_hard) / 2, mu_b)  # pixel 1: image 2 is hard there
    expected = (min(l_first, theta0) + min(l_first, theta1) + min(l_easy, theta0) + min(l_hard, theta1)) / 4
    assert loss_b.item() == pytest.approx(expected, rel=1e-6)


def test_window_default_keeps_weaktrs_four_by_four_grid_and_uneven_tiles_work() -> None:
    assert clip_window(480, 480, None) == 120 and clip_window(64, 64, None) == 16 and clip_window(30, 64, 7) == 7
    logits = torch.randn(2, 3, 10, 9, requires_grad=True)  # 10 x 9 with 3 x 3 windows: smaller last ones
    mask = torch.randint(0, 3, (2, 10, 9))
    loss, stats = gradient_clipping_loss(logits, mask, start=100.0, window=3)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= stats["clipped"].item() <= 1
