"""Geometric transforms applied jointly to the image (S2 and S1 stacked) and the mask.

The original sparse-vit-wsss code drew independent random affines for S1 and S2 (defect 2 in ``sparse_vit.md``);
here one draw moves every channel and the mask together, because the image is one (C, H, W) tensor holding S2
then S1, and the mask goes through the same sampling grid (nearest, fill 255) as the image (bilinear, fill 0).

Every transform takes and returns the sample dict ``{'image': (C, H, W) float, 'mask': (H, W) int64, ...}`` and
records the crop offset in ``'crop'`` (top, left) when it crops. The optional ``'valid'`` (H, W) bool (pixels
with data, :mod:`weakseg.data.nodata`) moves exactly like the mask; the image may hold NaN at invalid pixels before
normalisation. Randomness comes from torch's global generator,
which Lightning seeds per dataloader worker (``seed_everything(..., workers=True)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.data.classes import IGNORE_INDEX
from weakseg.data.nodata import finite_entries
from weakseg.errors import DataError

Sample = dict[str, Any]


class Compose:
    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def leading_crop(self) -> tuple[RandomCrop | CenterCrop | None, Compose]:
        """The crop this pipeline starts with (None if it does not) and the transforms after it.

        A reader that can read a window (the memory-mapped tile store) draws the crop's offsets itself and reads
        only that window, then applies the rest: the same sample, for 1/16 of the work on a 256 tile cropped to
        64 (:meth:`weakseg.data.base.TileDataset.__getitem__`).
        """
        if self.transforms and isinstance(self.transforms[0], (RandomCrop, CenterCrop)):
            return self.transforms[0], Compose(self.transforms[1:])
        return None, self

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


def _check_tile_size(H: int, W: int, size: tuple[int, int], tile_id: Any) -> None:
    if H < size[0] or W < size[1]:
        raise DataError(
            f"tile {tile_id} is {H}x{W}, smaller than the model input {size[0]}x{size[1]} "
            "(--imgsize): choose a smaller image size"
        )


def _crop(sample: Sample, top: int, left: int, size: tuple[int, int]) -> Sample:
    h, w = size
    out = dict(sample)
    out["image"] = sample["image"][:, top : top + h, left : left + w]
    out["mask"] = sample["mask"][top : top + h, left : left + w]
    if sample.get("valid") is not None:
        out["valid"] = sample["valid"][top : top + h, left : left + w]
    prev = sample.get("crop", (0, 0))
    out["crop"] = (int(prev[0]) + top, int(prev[1]) + left)
    return out


class RandomCrop:
    """Random crop of ``size`` (the original: a random 224 crop of the 256 tile, offsets U{0..32})."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def offsets(self, H: int, W: int, tile_id: Any = "?") -> tuple[int, int]:
        """(top, left) of the crop of an H x W tile, drawn from torch's generator (top first, then left)."""
        _check_tile_size(H, W, self.size, tile_id)
        top = int(torch.randint(0, H - self.size[0] + 1, ()).item())
        left = int(torch.randint(0, W - self.size[1] + 1, ()).item())
        return top, left

    def __call__(self, sample: Sample) -> Sample:
        H, W = sample["image"].shape[-2:]
        return _crop(sample, *self.offsets(H, W, sample.get("id", "?")), self.size)

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"


class CenterCrop:
    """Deterministic centre crop (validation: the original used random crops there, defect 11)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def offsets(self, H: int, W: int, tile_id: Any = "?") -> tuple[int, int]:
        """(top, left) of the centre crop of an H x W tile."""
        _check_tile_size(H, W, self.size, tile_id)
        return (H - self.size[0]) // 2, (W - self.size[1]) // 2

    def __call__(self, sample: Sample) -> Sample:
        H, W = sample["image"].shape[-2:]
        return _crop(sample, *self.offsets(H, W, sample.get("id", "?")), self.size)

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class Resize:
    """Resize the image (bilinear, antialiased) to the model input; the mask too (nearest) with ``targets``.

    Without ``targets`` (pseudomask inference) the mask and ``valid`` stay at tile resolution: the model sees the
    whole tile, and maps are upsampled back to the tile, so masks keep the tile's size and georeference. With
    ``targets`` (training on whole-image labels, :func:`weakseg.data.datamodule.build_transform`) the mask and
    ``valid`` are resized by nearest neighbour as well, so samples of tiles of any size batch together. Run it
    after normalisation: a NaN (no data) would spread through the interpolation.
    """

    def __init__(self, size: tuple[int, int], targets: bool = False) -> None:
        self.size = size
        self.targets = targets

    def __call__(self, sample: Sample) -> Sample:
        image = sample["image"]
        if tuple(image.shape[-2:]) == tuple(self.size):
            return sample
        out = dict(sample)
        out["image"] = F.interpolate(
            image[None], size=self.size, mode="bilinear", align_corners=False, antialias=True
        )[0]
        if self.targets:
            for key in ("mask", "valid"):
                if sample.get(key) is not None:
                    value = sample[key]  # (H, W)
                    out[key] = F.interpolate(value[None, None].float(), size=self.size, mode="nearest")[0, 0].to(
                        value.dtype)
        return out

    def __repr__(self) -> str:
        return f"Resize({self.size}{', targets=True' if self.targets else ''})"


class RandomFlipRotate:
    """Random element of the dihedral group: horizontal flip, vertical flip, 90-degree rotations.

    Safe for overhead imagery (no canonical up). Non-square inputs get only 0/180-degree rotations, so the
    shape is preserved.
    """

    def __call__(self, sample: Sample) -> Sample:
        image, mask, valid = sample["image"], sample["mask"], sample.get("valid")
        flip_w, flip_h = bool(torch.rand(()) < 0.5), bool(torch.rand(()) < 0.5)
        square = image.shape[-1] == image.shape[-2]
        k = int(torch.randint(0, 4, ()).item()) if square else 2 * int(torch.randint(0, 2, ()).item())

        def move(x: torch.Tensor) -> torch.Tensor:
            if x.device.type == "cpu" and not x.requires_grad:
                # numpy's flips and rotations are views: one copy in all, where torch copies at each flip and
                # again at the end (54 vs 72 us per 13 x 64 x 64 sample); the same pixels (tests/data).
                a = x.numpy()
                if flip_w:
                    a = a[..., ::-1]
                if flip_h:
                    a = a[..., ::-1, :]
                return torch.from_numpy(np.ascontiguousarray(np.rot90(a, k, axes=(-2, -1)) if k else a))
            if flip_w:
                x = x.flip(-1)
            if flip_h:
                x = x.flip(-2)
            return (torch.rot90(x, k, (-2, -1)) if k else x).contiguous()

        out = dict(sample)
        out["image"], out["mask"] = move(image), move(mask)
        if valid is not None:
            out["valid"] = move(valid)
        return out

    def __repr__(self) -> str:
        return "RandomFlipRotate()"


class RandomAffine:
    """The paper's affine augmentation with explicit ranges (defect 12: Albumentations scalars were fixed).

    With probability ``p``: rotation uniform in [-degrees, degrees], translation uniform in
    [-translate_px, translate_px] pixels on each axis, scale 1. Image bilinear with zero fill, mask nearest
    with 255 fill, through the same grid. A pixel interpolated from any pixel without data (``valid`` False)
    has no data itself; pixels moved in from outside keep the zero fill and the 255 mask, as before.
    """

    def __init__(self, degrees: float = 20.0, translate_px: float = 5.0, p: float = 0.5) -> None:
        self.degrees, self.translate_px, self.p = degrees, translate_px, p

    def __call__(self, sample: Sample) -> Sample:
        if torch.rand(()) >= self.p:
            return sample
        image, mask = sample["image"], sample["mask"]
        H, W = image.shape[-2:]
        angle = math.radians(float(torch.empty(()).uniform_(-self.degrees, self.degrees)))
        tx, ty = (float(v) for v in torch.empty(2).uniform_(-self.translate_px, self.translate_px))
        cos, sin = math.cos(angle), math.sin(angle)
        # affine_grid works in normalised coordinates [-1, 1]; keep rotation isotropic for non-square images.
        theta = torch.tensor(
            [[cos, -sin * H / W, -2 * tx / W], [sin * W / H, cos, -2 * ty / H]], dtype=torch.float32
        )[None]
        grid = F.affine_grid(theta, [1, 1, H, W], align_corners=False)
        out = dict(sample)
        image = image.float()
        invalid = ~finite_entries(image).all(0)  # (H, W)
        if sample.get("valid") is not None:
            invalid = invalid | ~sample["valid"]
        if bool(invalid.any()):
            # Zero the no-data pixels first (a NaN would spread to every neighbour, even with weight 0); the
            # bilinear-sampled invalid map then marks every output pixel that drew on one of them.
            image = image.masked_fill(invalid[None], 0.0)
        out["image"] = F.grid_sample(image[None], grid, mode="bilinear", align_corners=False)[0]
        if sample.get("valid") is not None or bool(invalid.any()):
            touched = F.grid_sample(invalid[None, None].float(), grid, mode="bilinear", align_corners=False)[0, 0]
            out["valid"] = touched <= 1e-6  # (H, W); outside the tile counts as valid (zero fill, 255 mask)
        # Shift mask ids by +1 so zero fill marks outside pixels, then map them to the ignore index.
        m = F.grid_sample((mask[None, None].float() + 1), grid, mode="nearest", align_corners=False)[0, 0]
        out["mask"] = torch.where(m == 0, torch.full_like(m, IGNORE_INDEX), m - 1).long()
        return out

    def __repr__(self) -> str:
        return f"RandomAffine(degrees={self.degrees}, translate_px={self.translate_px}, p={self.p})"


AUGMENTATIONS: dict[str, Callable[[], Callable[[Sample], Sample]]] = {
    "fliprot": RandomFlipRotate,
    "affine": RandomAffine,
}


def build_augmentations(names: Sequence[str]) -> list[Callable[[Sample], Sample]]:
    """Augmentations by name: 'fliprot' (flips + 90-degree rotations), 'affine' (the paper's, +-20 deg, +-5 px)."""
    out = []
    for name in names:
        if name not in AUGMENTATIONS:
            raise DataError(f"unknown augmentation {name!r}; choose from {sorted(AUGMENTATIONS)}")
        out.append(AUGMENTATIONS[name]())
    return out
