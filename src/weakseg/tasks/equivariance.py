"""ViT-PCM's equivariant-transformation (ET) consistency loss, for images of any number of bands.

Rossetti, Zappia, Sanzari, Schaerf and Pirri, "Max Pooling with Vision Transformers Reconciles Class and Shape
in Weakly Supervised Semantic Segmentation", ECCV 2022 (``vit_pcm.md`` sections 2 and 3). A teacher pass on
one view of every image gives patch probabilities P; a student pass on a 2x2 mosaic of four other views of
four images must predict, patch by patch, the teacher's map moved to where each patch landed:

1. **View 1** (per image): colour jitter, then an affine t1 (flip left-right p 0.5, flip up-down p 0.5,
   transpose p 0.5). **View 2** (per mosaic slot): a new jitter, optionally (p ``crop_prob``) a crop on the
   patch grid of a third of the image's side (``max(1, round(G / 3))`` patches, at a random patch offset), a
   resize to half the image's side (384 -> 192 px), then a new affine t2.
2. **Mosaic**: four view-2 tiles tiled 2x2 into one input of the full image size. ``M = ceil(B / 4)`` mosaics;
   slot ``s`` (``0 .. 4M - 1``) holds image ``s mod B`` (a batch not divisible by 4 wraps around to its first
   images); in a mosaic the slots run top-left, top-right, bottom-left, bottom-right.
3. **Teacher**: P = patch probabilities of view 1, model in eval mode under ``torch.no_grad()``.
4. **Align** P at patch level: undo t1, apply t2's crop, bilinear resize to the quadrant grid (G/2 x G/2,
   ``align_corners=False``), apply t2.
5. **Target** T = renorm(maxnorm(P * y)) (:func:`masked_target`): absent classes zeroed, each present class
   map divided by its spatial max, each patch renormalised to sum 1. No gradient.
6. **Student** Q = patch probabilities of the mosaic, model in train mode, the slot's G/2 x G/2 quadrant.
7. L_ET = mean over slots and patches of CE(T, Q) = -sum_c T_c log(max(Q_c, 1e-7)).

**Geometry.** A transform t = (flip_lr, flip_ud, transpose) applied to a (..., H, W) tensor is flip_lr (flip
of the last dim), then flip_ud (flip of dim -2), then transpose (swap of the last two dims); undo runs the
reverse order (transpose, flip_ud, flip_lr). Image sides are whole multiples of twice the patch size, so the
same op on the pixels and on the patch grid correspond exactly. Transposes need a square image: for H != W
none is drawn. View-2 pixels = ``t2.apply(resize_half(crop(jitter2(x))))``, the crop box (top, left, side)
given in patches in the original orientation, multiplied by the patch size for the pixels.

**Colour jitter** for any number of bands (satellite tiles standardised per band, or RGB):
:meth:`weakseg.data.ssl_views.ViewAugment.jitter` with contrast 0.5 and brightness 0.2 (per band a contrast
factor in [0.5, 1.5] around the band mean plus a shift of up to 0.2 band stds), always applied, then the band
mean in every band ("grayscale") with p 0.1. The reference's RGB saturation and hue have no per-band
counterpart.

Choices of ours where the paper is silent:

- one teacher view per image; every mosaic slot draws its own view 2, also the wrapped-around repeats;
- the views are built on the CPU (the generator is a CPU generator and ``ViewAugment.jitter`` draws CPU
  tensors), then moved to the images' device for the two model passes, so a seed gives the same views on any
  device;
- on a non-square grid (Gh, Gw) the crop is square with side ``max(1, round(min(Gh, Gw) / 3))``;
- the mode of every submodule of the model is restored on exit (not just the top-level flag), also on errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from weakseg.data.ssl_views import ViewAugment
from weakseg.errors import ConfigError

#: Probability of the grid-aligned crop of view 2 (the paper's VOC setting; 0 for COCO).
DEFAULT_CROP_PROB = 0.3
#: Colour jitter of both views (``vit_pcm.md`` 3): contrast factor in [0.5, 1.5], shift up to 0.2 band stds.
JITTER_CONTRAST = 0.5
JITTER_BRIGHTNESS = 0.2
#: Probability of replacing every band by the band mean ("grayscale").
GRAYSCALE_P = 0.1
#: Floor of the student's probabilities before the log, as the original's clipping.
PROB_FLOOR = 1e-7


# ---- geometry ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """One image's flips and transpose, acting on the last two dims of a tensor (order: module docstring)."""

    flip_lr: bool
    flip_ud: bool
    transpose: bool

    def apply(self, x: Tensor) -> Tensor:
        """(..., H, W) -> (..., H, W), or (..., W, H) with the transpose."""
        if self.flip_lr:
            x = x.flip(-1)
        if self.flip_ud:
            x = x.flip(-2)
        if self.transpose:
            x = x.transpose(-2, -1)
        return x

    def undo(self, x: Tensor) -> Tensor:
        """The inverse of :meth:`apply`: the same ops in reverse order (each one is its own inverse)."""
        if self.transpose:
            x = x.transpose(-2, -1)
        if self.flip_ud:
            x = x.flip(-2)
        if self.flip_lr:
            x = x.flip(-1)
        return x


@dataclass(frozen=True)
class ViewTwo:
    """The geometry of one view-2 tile: an optional grid-aligned crop, then (after the resize) ``geometry``.

    ``crop`` = (top, left, side) in patches, in the original orientation; None = the whole image."""

    geometry: Geometry
    crop: tuple[int, int, int] | None  # (top, left, side) in patches


def _draw(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def draw_geometry(square: bool, generator: torch.Generator | None = None) -> Geometry:
    """Flip left-right, flip up-down and (square images only) transpose, each with p 0.5."""
    flip_lr = _draw(generator) < 0.5
    flip_ud = _draw(generator) < 0.5
    transpose = square and _draw(generator) < 0.5
    return Geometry(flip_lr, flip_ud, transpose)


def draw_view_two(grid: tuple[int, int], crop_prob: float = DEFAULT_CROP_PROB, square: bool = True,
                  generator: torch.Generator | None = None) -> ViewTwo:
    """A view-2 draw on a (Gh, Gw) patch grid: t2, then with p ``crop_prob`` a crop of side
    ``max(1, round(min(Gh, Gw) / 3))`` patches at a uniform patch offset."""
    if not 0.0 <= crop_prob <= 1.0:
        raise ConfigError(f"the equivariance crop probability must lie in [0, 1], got {crop_prob}")
    geometry = draw_geometry(square, generator)
    if _draw(generator) >= crop_prob:
        return ViewTwo(geometry, None)
    gh, gw = grid
    side = max(1, round(min(gh, gw) / 3))
    top = int(torch.randint(gh - side + 1, (1,), generator=generator))
    left = int(torch.randint(gw - side + 1, (1,), generator=generator))
    return ViewTwo(geometry, (top, left, side))


def check_sizes(height: int, width: int, patch_size: int) -> None:
    """The mosaic's quadrants must be whole patches: H and W multiples of 2 * patch_size."""
    if patch_size < 1 or height % (2 * patch_size) or width % (2 * patch_size):
        raise ConfigError(f"the equivariance loss needs image sides divisible by 2 x the patch size: image "
                          f"{height}x{width} px, patch size {patch_size} (each mosaic quadrant must be whole "
                          f"patches)")


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (C, h, w) to (C, *size), ``align_corners=False`` (2x down = 2x2 mean)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def view_two_pixels(image: Tensor, view: ViewTwo, patch_size: int) -> Tensor:
    """The view-2 tile of one (already jittered) image: crop, resize to half the side, t2.

    (C, H, W) -> (C, H/2, W/2), or (C, W/2, H/2) with a transpose (square images only)."""
    C, H, W = image.shape
    check_sizes(H, W, patch_size)
    x = image
    if view.crop is not None:
        top, left, side = (v * patch_size for v in view.crop)
        x = x[:, top:top + side, left:left + side]  # (C, side, side) px
    x = _resize(x, (H // 2, W // 2))  # (C, H/2, W/2)
    return view.geometry.apply(x)


def align_teacher(probs: Tensor, t1: Geometry, view: ViewTwo) -> Tensor:
    """Move view 1's patch map onto the patches of a view-2 tile: undo t1, crop, resize, apply t2.

    (C, G, G) -> (C, G/2, G/2); (C, Gh, Gw) -> (C, Gh/2, Gw/2) on a non-square grid (never transposed)."""
    x = t1.undo(probs)  # (C, Gh, Gw), original orientation
    Gh, Gw = x.shape[-2:]
    if view.crop is not None:
        top, left, side = view.crop
        x = x[:, top:top + side, left:left + side]  # (C, side, side)
    x = _resize(x, (Gh // 2, Gw // 2))  # (C, Gh/2, Gw/2)
    return view.geometry.apply(x)


# ---- mosaic ------------------------------------------------------------------------------------------------
def mosaic(tiles: Tensor) -> Tensor:
    """Tile groups of four into 2x2 mosaics, slot 4m + 2r + c at row r, column c of mosaic m.

    (4M, C, h, w) -> (M, C, 2h, 2w); slots in a mosaic: top-left, top-right, bottom-left, bottom-right."""
    N, C, h, w = tiles.shape
    if N % 4:
        raise ValueError(f"a mosaic needs a multiple of 4 tiles, got {N}")
    x = tiles.reshape(N // 4, 2, 2, C, h, w)  # (M, r, c, C, h, w)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (M, C, r, h, c, w)
    return x.reshape(N // 4, C, 2 * h, 2 * w)  # (M, C, 2h, 2w)


def mosaic_quadrants(grid_maps: Tensor) -> Tensor:
    """The inverse of :func:`mosaic`: (M, K, 2g, 2g) -> (4M, K, g, g), quadrants in slot order."""
    M, K, H2, W2 = grid_maps.shape
    if H2 % 2 or W2 % 2:
        raise ValueError(f"mosaic quadrants need an even grid, got {H2}x{W2}")
    g_h, g_w = H2 // 2, W2 // 2
    x = grid_maps.reshape(M, K, 2, g_h, 2, g_w)  # (M, K, r, gh, c, gw)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (M, r, c, K, gh, gw)
    return x.reshape(4 * M, K, g_h, g_w)  # (4M, K, gh, gw)


# ---- target and loss ---------------------------------------------------------------------------------------
def masked_target(probs: Tensor, labels: Tensor, eps: float = 1e-8) -> Tensor:
    """renorm(maxnorm(P * y)): absent classes zeroed, present class maps divided by their spatial max, every
    patch renormalised so its classes sum to 1; an all-zero patch (or an image without labels) stays zero.

    probs (B, C, h, w), labels (B, C) multi-hot -> (B, C, h, w)."""
    x = probs * labels.to(probs.dtype)[:, :, None, None]  # (B, C, h, w), absent classes 0
    peak = x.amax(dim=(-2, -1), keepdim=True)  # (B, C, 1, 1)
    x = x / peak.clamp_min(eps)  # each present class peaks at 1
    return x / x.sum(dim=1, keepdim=True).clamp_min(eps)  # (B, C, h, w), patches sum to 1 (or 0)


def _colour(image: Tensor, augment: ViewAugment, generator: torch.Generator | None) -> Tensor:
    """Per-band jitter, then the band mean in every band with p 0.1. (C, H, W) -> (C, H, W)."""
    x = augment.jitter(image, generator)
    if _draw(generator) < GRAYSCALE_P:
        x = x.mean(dim=0, keepdim=True).expand_as(x).clone()
    return x


def _patch_probs(patch_probs: Callable[[Tensor], Tensor], x: Tensor, classes: int,
                 grid: tuple[int, int]) -> Tensor:
    probs = patch_probs(x)  # (N, C, Gh, Gw)
    expected = (x.shape[0], classes, *grid)
    if tuple(probs.shape) != expected:
        raise ConfigError(f"patch_probs returned {tuple(probs.shape)}, the equivariance loss expects "
                          f"{expected} (N, classes of the labels, H / patch, W / patch)")
    return probs


def equivariance_loss(model: torch.nn.Module, patch_probs: Callable[[Tensor], Tensor], images: Tensor,
                      labels: Tensor, patch_size: int, crop_prob: float = DEFAULT_CROP_PROB,
                      jitter: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """ViT-PCM's L_ET of one batch (module docstring): a scalar with gradient through the student pass only.

    Args:
        model: the network ``patch_probs`` calls; eval mode for the teacher, train mode for the student, every
            submodule's mode restored on exit.
        patch_probs: (N, C_in, H, W) -> (N, C, H/p, W/p) per-patch softmax probabilities.
        images: (B, C_in, H, W), H and W multiples of 2 * patch_size.
        labels: (B, C) multi-hot image labels.
        patch_size: p, pixels per patch side.
        crop_prob: probability of view 2's grid-aligned crop.
        jitter: colour jitter and grayscale on both views (off in tests).
        generator: the CPU generator of every random draw (torch's global one if None).
    """
    B, _, H, W = images.shape
    check_sizes(H, W, patch_size)
    C = labels.shape[1]
    grid = (H // patch_size, W // patch_size)  # (Gh, Gw)
    square = H == W
    device, dtype = images.device, images.dtype
    augment = ViewAugment(size=(H, W), brightness=JITTER_BRIGHTNESS, contrast=JITTER_CONTRAST)
    colour = (lambda x: _colour(x, augment, generator)) if jitter else (lambda x: x)

    # views, on the CPU: one view 1 per image, one view 2 per mosaic slot
    cpu = images.detach().cpu()  # (B, C_in, H, W)
    view1, t1s = [], []
    for b in range(B):
        t1 = draw_geometry(square, generator)
        view1.append(t1.apply(colour(cpu[b])))  # (C_in, H, W)
        t1s.append(t1)
    M = math.ceil(B / 4)
    slots = [s % B for s in range(4 * M)]  # slot s holds image s mod B
    tiles, views = [], []
    for b in slots:
        view = draw_view_two(grid, crop_prob, square, generator)
        tiles.append(view_two_pixels(colour(cpu[b]), view, patch_size))  # (C_in, H/2, W/2)
        views.append(view)
    view1_batch = torch.stack(view1).to(device=device, dtype=dtype)  # (B, C_in, H, W)
    mosaics = mosaic(torch.stack(tiles)).to(device=device, dtype=dtype)  # (M, C_in, H, W)

    modes = {module: module.training for module in model.modules()}
    try:
        # teacher: eval mode, no gradient
        model.eval()
        with torch.no_grad():
            P = _patch_probs(patch_probs, view1_batch, C, grid)  # (B, C, Gh, Gw)
            aligned = torch.stack([align_teacher(P[b], t1s[b], v)
                                   for b, v in zip(slots, views, strict=True)])  # (4M, C, g, g)
            index = torch.tensor(slots, device=labels.device)
            T = masked_target(aligned, labels[index].to(aligned.device))  # (4M, C, g, g)
        # student: train mode, with gradient
        model.train()
        Q = mosaic_quadrants(_patch_probs(patch_probs, mosaics, C, grid))  # (4M, C, g, g)
    finally:
        for module, training in modes.items():
            module.training = training
    ce = -(T.to(Q.dtype) * Q.clamp_min(PROB_FLOOR).log()).sum(dim=1)  # (4M, g, g)
    return ce.mean()
