"""ViT-PCM's equivariance loss (vit_pcm.md 2): geometry, alignment, mosaic, target and the loss itself."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weakseg.errors import ConfigError
from weakseg.tasks import equivariance
from weakseg.tasks.equivariance import (
    Geometry,
    ViewTwo,
    align_teacher,
    draw_geometry,
    draw_view_two,
    equivariance_loss,
    masked_target,
    mosaic,
    mosaic_quadrants,
    view_two_pixels,
)

ALL_GEOMETRIES = [Geometry(*flags) for flags in itertools.product([False, True], repeat=3)]
FLAT_GEOMETRIES = [g for g in ALL_GEOMETRIES if not g.transpose]


def patch_image(rows: int, cols: int, p: int) -> tuple[Tensor, Tensor]:
    """An image whose p x p patches are constant: channel 0 = patch row, 1 = patch column, 2 = patch index.

    Returns the (3, rows * p, cols * p) pixels and the (3, rows, cols) patch grid."""
    r = torch.arange(rows, dtype=torch.float64)[:, None].expand(rows, cols)
    c = torch.arange(cols, dtype=torch.float64)[None, :].expand(rows, cols)
    grid = torch.stack([r, c, r * cols + c])  # (3, rows, cols)
    pixels = grid.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)
    return pixels, grid


def pool(x: Tensor, p: int) -> Tensor:
    """The identity "model": each patch's mean. (C, H, W) -> (C, H/p, W/p)."""
    return F.avg_pool2d(x[None], p)[0]


# ---- geometry ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", ALL_GEOMETRIES)
def test_geometry_round_trip(geometry: Geometry) -> None:
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(geometry.undo(geometry.apply(x)), x)
    assert torch.equal(geometry.apply(geometry.undo(x)), x)


def test_geometry_order_is_flip_lr_then_flip_ud_then_transpose() -> None:
    x = torch.tensor([[0, 1], [2, 3]])
    # flip_lr -> [[1, 0], [3, 2]], transpose -> [[1, 3], [0, 2]] (transposing first: [[2, 0], [3, 1]])
    assert Geometry(True, False, True).apply(x).tolist() == [[1, 3], [0, 2]]
    # flip_ud -> [[2, 3], [0, 1]], transpose -> [[2, 0], [3, 1]]
    assert Geometry(False, True, True).apply(x).tolist() == [[2, 0], [3, 1]]
    assert Geometry(True, False, True).undo(torch.tensor([[1, 3], [0, 2]])).tolist() == x.tolist()


@pytest.mark.parametrize("geometry", ALL_GEOMETRIES)
def test_geometry_on_pixels_matches_geometry_on_patches(geometry: Geometry) -> None:
    p = 4
    pixels, grid = patch_image(6, 6, p)
    assert torch.equal(pool(geometry.apply(pixels), p), geometry.apply(grid))
    assert torch.equal(pool(geometry.undo(pixels), p), geometry.undo(grid))
    if not geometry.transpose:  # non-square images never transpose
        pixels, grid = patch_image(4, 6, p)
        assert torch.equal(pool(geometry.apply(pixels), p), geometry.apply(grid))
        assert torch.equal(pool(geometry.undo(pixels), p), geometry.undo(grid))


def test_draws() -> None:
    gen = torch.Generator().manual_seed(0)
    geometries = [draw_geometry(True, gen) for _ in range(400)]
    for flag in ("flip_lr", "flip_ud", "transpose"):
        share = sum(getattr(g, flag) for g in geometries) / 400
        assert 0.4 < share < 0.6, flag
    assert not any(draw_geometry(False, gen).transpose for _ in range(100))

    assert all(draw_view_two((24, 24), 0.0, True, gen).crop is None for _ in range(50))
    crops = [draw_view_two((24, 24), 1.0, True, gen).crop for _ in range(200)]
    assert all(c is not None and c[2] == 8 and 0 <= c[0] <= 16 and 0 <= c[1] <= 16 for c in crops)
    assert {c[0] for c in crops} == set(range(17))  # every patch offset reachable
    assert draw_view_two((4, 4), 1.0, True, gen).crop[2] == 1  # max(1, round(4 / 3))
    assert draw_view_two((2, 2), 1.0, True, gen).crop[2] == 1
    flat = [draw_view_two((6, 12), 1.0, False, gen) for _ in range(50)]
    assert not any(v.geometry.transpose for v in flat)
    assert all(v.crop[2] == 2 and v.crop[0] <= 4 and v.crop[1] <= 10 for v in flat)  # round(6 / 3)
    share = sum(draw_view_two((24, 24), 0.3, True, gen).crop is not None for _ in range(1000)) / 1000
    assert 0.25 < share < 0.35
    with pytest.raises(ConfigError):
        draw_view_two((24, 24), 1.5, True, gen)


# ---- alignment ---------------------------------------------------------------------------------------------
def check_alignment(rows: int, cols: int, p: int, t1: Geometry, view: ViewTwo) -> None:
    """Teacher map of view 1 aligned at patch level == the patch map of view 2 computed from its pixels."""
    pixels, _ = patch_image(rows, cols, p)
    teacher = pool(t1.apply(pixels), p)  # (3, G, G): "probabilities" of view 1
    tile = view_two_pixels(pixels, view, p)  # (3, H/2, W/2)
    assert tile.shape[-2:] == (rows * p // 2, cols * p // 2)[:: -1 if view.geometry.transpose else 1]
    aligned = align_teacher(teacher, t1, view)
    torch.testing.assert_close(aligned, pool(tile, p), rtol=0, atol=1e-12)


@pytest.mark.parametrize("t1", ALL_GEOMETRIES)
def test_align_teacher_without_crop_matches_view_two(t1: Geometry) -> None:
    for t2 in ALL_GEOMETRIES:  # G = 8: the 2x downscale of patch-constant pixels is 2x2 patch averaging
        check_alignment(8, 8, 4, t1, ViewTwo(t2, None))


@pytest.mark.parametrize("t1", ALL_GEOMETRIES)
def test_align_teacher_with_crop_matches_view_two(t1: Geometry) -> None:
    for t2 in ALL_GEOMETRIES:
        check_alignment(8, 8, 4, t1, ViewTwo(t2, (3, 1, 4)))  # crop side = quadrant side 4: no resampling
        check_alignment(4, 4, 4, t1, ViewTwo(t2, (2, 1, 1)))  # drawn side 1 on G = 4: a constant tile


def test_align_teacher_non_square() -> None:
    for t1, t2 in itertools.product(FLAT_GEOMETRIES, FLAT_GEOMETRIES):
        check_alignment(4, 8, 2, t1, ViewTwo(t2, None))


def test_align_teacher_lands_on_the_right_patches() -> None:
    _, grid = patch_image(4, 4, 1)  # channel 0 = row, 1 = column of the original patch
    t1 = Geometry(True, False, True)
    teacher = t1.apply(grid)
    # no crop, t2 flips left-right: tile patch (0, 0) averages original rows {0, 1}, columns {2, 3}
    out = align_teacher(teacher, t1, ViewTwo(Geometry(True, False, False), None))
    assert out[:2, 0, 0].tolist() == [0.5, 2.5]
    assert out[:2, 1, 0].tolist() == [2.5, 2.5]
    # crop rows 1-2, columns 2-3, then transpose: tile patch (0, 1) is original patch (2, 2)
    out = align_teacher(teacher, t1, ViewTwo(Geometry(False, False, True), (1, 2, 2)))
    assert out[:2, 0, 1].tolist() == [2.0, 2.0]
    assert out[:2, 1, 0].tolist() == [1.0, 3.0]


# ---- mosaic ------------------------------------------------------------------------------------------------
def test_mosaic_slot_order_and_round_trip() -> None:
    tiles = torch.arange(8.0)[:, None, None, None].expand(8, 2, 3, 3)  # slot s is constant s
    m = mosaic(tiles)
    assert m.shape == (2, 2, 6, 6)
    assert m[0, 0, ::3, ::3].tolist() == [[0, 1], [2, 3]]  # top-left, top-right / bottom-left, bottom-right
    assert m[1, 0, ::3, ::3].tolist() == [[4, 5], [6, 7]]
    x = torch.randn(8, 5, 3, 4)
    assert torch.equal(mosaic_quadrants(mosaic(x)), x)
    y = torch.randn(3, 2, 6, 8)
    assert torch.equal(mosaic(mosaic_quadrants(y)), y)


def test_loss_mosaic_wraps_around_the_batch() -> None:
    B, p, side = 5, 2, 8
    images = torch.arange(B, dtype=torch.float32)[:, None, None, None].expand(B, 1, side, side).contiguous()
    seen: list[Tensor] = []

    def probs(x: Tensor) -> Tensor:
        seen.append(x.clone())
        return torch.full((x.shape[0], 2, side // p, side // p), 0.5)

    equivariance_loss(nn.Identity(), probs, images, torch.ones(B, 2), p, crop_prob=0.5, jitter=False,
                      generator=torch.Generator().manual_seed(1))
    teacher, student = seen
    assert teacher.shape == (5, 1, 8, 8) and student.shape == (2, 1, 8, 8)  # M = ceil(5 / 4)
    values = mosaic_quadrants(student).amax(dim=(1, 2, 3))  # constant images stay constant under every view
    assert values.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]


# ---- target ------------------------------------------------------------------------------------------------
def test_masked_target_hand_computed() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.6, 0.2]]).T.reshape(1, 3, 1, 2)  # 2 patches, 3 classes
    labels = torch.tensor([[0, 1, 1]])
    # times y: [0, .3, .2], [0, .6, .2]; / class max (.6, .2): [0, .5, 1], [0, 1, 1]; renormalised:
    expected = torch.tensor([[0, 1 / 3, 2 / 3], [0, 0.5, 0.5]]).T.reshape(1, 3, 1, 2)
    torch.testing.assert_close(masked_target(probs, labels), expected)


def test_masked_target_zero_guards() -> None:
    probs = torch.tensor([[[[0.7, 0.0]], [[0.3, 1.0]]], [[[0.5, 0.5]], [[0.5, 0.5]]]])  # (2, 2, 1, 2)
    out = masked_target(probs, torch.tensor([[1, 0], [0, 0]]))
    assert torch.isfinite(out).all()
    assert out[0, :, 0, 0].tolist() == [1.0, 0.0]
    assert out[0, :, 0, 1].tolist() == [0.0, 0.0]  # the only present class is 0 here: the patch stays zero
    assert out[1].abs().sum() == 0  # no labels at all


# ---- loss --------------------------------------------------------------------------------------------------
class PatchSoftmax(nn.Module):
    """A perfectly equivariant "model": each patch's probabilities from its own mean through a 1x1 conv."""

    def __init__(self, bands: int, classes: int, p: int) -> None:
        super().__init__()
        self.p = p
        self.conv = nn.Conv2d(bands, classes, 1)
        self.calls: list[tuple[bool, bool]] = []  # (training, grad enabled) per forward

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.conv(F.avg_pool2d(x, self.p)).softmax(dim=1)


def block_images(B: int, bands: int, side: int, p: int, seed: int = 0) -> Tensor:
    """Random images constant on 2p x 2p blocks: half-size views' patches are the original patches."""
    g = side // (2 * p)
    coarse = torch.randn(B, bands, g, g, generator=torch.Generator().manual_seed(seed))
    return coarse.repeat_interleave(2 * p, dim=-2).repeat_interleave(2 * p, dim=-1)


def direct_loss(model: PatchSoftmax, images: Tensor, labels: Tensor) -> float:
    """L_ET of an equivariant model without crops: every slot's target and prediction are the same patch map
    (the half-size grid of its image) up to a permutation, which the mean and the max-normalisation ignore."""
    with torch.no_grad():
        P = model(images)[..., ::2, ::2]  # (B, K, g, g): the 2x2-constant map downscaled
        T = masked_target(P, labels)
        per_image = -(T * P.log()).sum(dim=1).mean(dim=(-2, -1))  # (B,)
    B = images.shape[0]
    slots = [s % B for s in range(4 * math.ceil(B / 4))]
    return float(per_image[slots].mean())


@pytest.mark.parametrize("B", [4, 5])
def test_loss_of_an_equivariant_model_is_the_direct_value(B: int) -> None:
    torch.manual_seed(0)
    model = PatchSoftmax(bands=3, classes=4, p=2)
    images = block_images(B, 3, 16, 2)
    labels = torch.ones(B, 4)
    labels[0, 1] = 0
    for seed in range(3):
        loss = equivariance_loss(model, model, images, labels, 2, crop_prob=0.0, jitter=False,
                                 generator=torch.Generator().manual_seed(seed))
        assert loss.item() == pytest.approx(direct_loss(model, images, labels), rel=1e-5)


def test_loss_detects_a_wrong_alignment(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = PatchSoftmax(bands=3, classes=4, p=2)
    images, labels = block_images(4, 3, 16, 2), torch.ones(4, 4)
    expected = direct_loss(model, images, labels)
    right = equivariance_loss(model, model, images, labels, 2, crop_prob=0.0, jitter=False,
                              generator=torch.Generator().manual_seed(0))
    assert right.item() == pytest.approx(expected, rel=1e-5)
    aligned = equivariance.align_teacher
    monkeypatch.setattr(equivariance, "align_teacher", lambda probs, t1, view: aligned(probs, Geometry(
        False, False, False), view))  # t1 never undone
    wrong = equivariance_loss(model, model, images, labels, 2, crop_prob=0.0, jitter=False,
                              generator=torch.Generator().manual_seed(0))
    assert wrong.item() > right.item() + 1e-3


def test_loss_gradient_reaches_the_model_through_the_student_only() -> None:
    model = PatchSoftmax(bands=4, classes=3, p=4)
    model.train()
    images = torch.randn(6, 4, 32, 32)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 1], [0, 1, 1]])
    loss = equivariance_loss(model, model, images, labels, 4, generator=torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    assert model.calls == [(False, False), (True, True)]  # teacher: eval, no grad; student: train, grad
    loss.backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0
    assert model.training


def test_loss_restores_every_module_mode() -> None:
    model = PatchSoftmax(bands=2, classes=3, p=4)
    images, labels = torch.randn(2, 2, 16, 16), torch.ones(2, 3)
    model.eval()
    equivariance_loss(model, model, images, labels, 4)
    assert not model.training and not model.conv.training
    model.train()
    model.conv.eval()  # a mixed state, e.g. a frozen part
    equivariance_loss(model, model, images, labels, 4)
    assert model.training and not model.conv.training

    def failing_student(x: Tensor) -> Tensor:
        if model.training:
            raise RuntimeError("student failed")
        return model(x)

    with pytest.raises(RuntimeError, match="student failed"):
        equivariance_loss(model, failing_student, images, labels, 4)
    assert model.training and not model.conv.training


def test_loss_is_fixed_by_the_seed() -> None:
    torch.manual_seed(0)
    model = PatchSoftmax(bands=3, classes=4, p=4)
    images, labels = torch.randn(5, 3, 32, 32), (torch.rand(5, 4) > 0.5).float()

    def run(seed: int) -> float:
        return equivariance_loss(model, model, images, labels, 4, crop_prob=0.5,
                                 generator=torch.Generator().manual_seed(seed)).item()

    assert run(3) == run(3)
    assert run(3) != run(4)
    torch.manual_seed(7)
    a = equivariance_loss(model, model, images, labels, 4, crop_prob=0.5).item()
    torch.manual_seed(7)
    assert equivariance_loss(model, model, images, labels, 4, crop_prob=0.5).item() == a  # global generator


def test_image_size_must_be_a_multiple_of_two_patches() -> None:
    model = PatchSoftmax(bands=1, classes=2, p=8)
    with pytest.raises(ConfigError, match=r"40x40.*patch size 8"):
        equivariance_loss(model, model, torch.randn(2, 1, 40, 40), torch.ones(2, 2), 8)
    with pytest.raises(ConfigError, match="patch size 8"):
        view_two_pixels(torch.randn(1, 48, 40), ViewTwo(Geometry(False, False, False), None), 8)
    assert model.calls == []
