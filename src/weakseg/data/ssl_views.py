"""Two views of one tile for self-supervised pretraining (Barlow Twins; ``ssl_vit.md`` section 1).

**Augmented views** (``views="augment"``): two independent draws of :class:`ViewAugment` on the same tile. The
reference's RGB recipe, adapted to any number of bands:

==========================================  =============  =============
step                                        view 1         view 2
==========================================  =============  =============
random resized crop, scale (0.08, 1),       yes            yes
ratio (3/4, 4/3), bicubic, to the input
per-band brightness and contrast +-0.4      p 0.8          p 0.8
(replaces RGB colour jitter: every band
gets its own factors, so the spectrum
changes as hue and saturation do in RGB)
band mean in every band ("grayscale")       p 0.2          p 0.2
Gaussian blur, sigma in [0.1, 2.0]          p 1.0          p 0.1
horizontal / vertical flip, 90-degree       p 0.5 / 0.5,   same
rotation (remote sensing has no "up")       k uniform
==========================================  =============  =============

Solarisation (p 0.2 in view 2 of the reference) is left out: inverting the bright half of a reflectance or
backscatter band has no physical counterpart. Brightness is an additive shift of the band by up to 0.4 of its
standard deviation over the tile, contrast a factor in [0.6, 1.4] around the band mean: the tiles are
standardised first, where a multiplicative brightness would be a second contrast.

**Cross-modal views** (``views="cross_modal"``): the Sentinel-2 bands of a tile are one view and its Sentinel-1
bands the other, each with its own draw of :class:`ViewAugment` (two different sensors seeing the same place are
the natural positive pair). The model embeds each through its own patch embedding
(``GatedViT.forward_features(..., modality="s2" | "s1")``) into one shared transformer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from weakseg.data.normalization import Normalize
from weakseg.errors import ConfigError

VIEW_MODES = ("augment", "cross_modal")


@dataclass
class ViewAugment:
    """One random view of a (C, H, W) float tile, output (C, *size). Probabilities as the module table."""

    size: tuple[int, int]
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    band_mean_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = self.resized_crop(image, generator)  # (C, h, w)
        if _draw(generator) < self.jitter_p:
            x = self.jitter(x, generator)
        if _draw(generator) < self.band_mean_p:
            x = x.mean(dim=0, keepdim=True).expand_as(x).clone()
        if _draw(generator) < self.blur_p:
            lo, hi = self.blur_sigma
            x = gaussian_blur(x, lo + (hi - lo) * _draw(generator))
        if _draw(generator) < self.flip_p:
            x = x.flip(-1)
        if _draw(generator) < self.flip_p:
            x = x.flip(-2)
        k = int(torch.randint(4, (1,), generator=generator))
        return torch.rot90(x, k, dims=(-2, -1)) if x.shape[-1] == x.shape[-2] else x

    def resized_crop(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """torchvision's RandomResizedCrop: an area fraction and aspect ratio drawn (log-uniform ratio), up to 10
        tries, else the central crop of the clamped ratio; resized bicubically to ``size``."""
        C, H, W = image.shape
        area = H * W
        lo, hi = (math.log(r) for r in self.crop_ratio)
        box = None
        for _ in range(10):
            target = area * (self.crop_scale[0] + (self.crop_scale[1] - self.crop_scale[0]) * _draw(generator))
            ratio = math.exp(lo + (hi - lo) * _draw(generator))
            w = round(math.sqrt(target * ratio))
            h = round(math.sqrt(target / ratio))
            if 0 < w <= W and 0 < h <= H:
                top = int(torch.randint(H - h + 1, (1,), generator=generator))
                left = int(torch.randint(W - w + 1, (1,), generator=generator))
                box = (top, left, h, w)
                break
        if box is None:
            ratio = min(max(W / H, self.crop_ratio[0]), self.crop_ratio[1])
            h, w = (H, round(H * ratio)) if W / H > ratio else (round(W / ratio), W)
            box = ((H - h) // 2, (W - w) // 2, h, w)
        top, left, h, w = box
        crop = image[:, top:top + h, left:left + w]  # (C, h, w)
        return F.interpolate(crop[None], size=self.size, mode="bicubic", align_corners=False)[0]

    def jitter(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per band: contrast factor in [1 - c, 1 + c] around the band mean, plus a shift of up to b band stds."""
        C = x.shape[0]
        mean = x.mean(dim=(-2, -1), keepdim=True)  # (C, 1, 1)
        # The unbiased std in two passes: torch.std's single-pass kernel takes 274 us on a 13 x 64 x 64 tile on
        # this project's CPU build against 24 us here (9 % of a ViT-PCM training step, which jitters 32 tiles).
        pixels = x.shape[-2] * x.shape[-1]
        std = ((x - mean).square().sum(dim=(-2, -1), keepdim=True) / max(pixels - 1, 1)).sqrt().clamp_min(1e-6)
        factor = 1 + self.contrast * (2 * torch.rand(C, 1, 1, generator=generator) - 1)
        shift = self.brightness * (2 * torch.rand(C, 1, 1, generator=generator) - 1) * std
        return (x - mean) * factor + mean + shift


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (C, H, W) with reflection padding; kernel side 2 ceil(3 sigma) + 1, at most the
    tile's side (odd)."""
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, (min(x.shape[-2:]) - 1) // 2)
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()  # (k,)
    C = x.shape[0]
    y = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")  # (1, C, H + 2r, W + 2r)
    y = F.conv2d(y, kernel.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    y = F.conv2d(y, kernel.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
    return y[0]


def _draw(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def view_augments(size: Sequence[int], crop_scale: Sequence[float] = (0.08, 1.0)) -> tuple[ViewAugment, ViewAugment]:
    """The reference's asymmetric pair: blur always in view 1, with p 0.1 in view 2."""
    size = (int(size[0]), int(size[-1]))
    scale = (float(crop_scale[0]), float(crop_scale[1]))
    return ViewAugment(size, crop_scale=scale, blur_p=1.0), ViewAugment(size, crop_scale=scale, blur_p=0.1)


class TwoViewDataset(torch.utils.data.Dataset):
    """Pairs of views of the tiles of a reader; labels, masks and class names are never read.

    Args:
        reader: anything with ``__len__``, ``read_image(i) -> (C, H, W)`` float array (NaN = no data) and ``ids``.
        views: ``"augment"`` (two draws on all bands) or ``"cross_modal"`` (S2 bands vs the last ``s1_chans``).
        size: the model input (H, W).
        normalize: the band normalisation applied to the whole tile first (no-data filled there).
        s1_chans: Sentinel-1 bands at the end of the tile (``cross_modal``).

    The draws use torch's global generator, which ``lightning.seed_everything(seed, workers=True)`` seeds in the
    main process and in every DataLoader worker: a seed fixes the views.

    Items: ``{"view1": (C1, H, W), "view2": (C2, H, W), "id": str}``; for ``cross_modal`` view 1 holds the S2
    bands and view 2 the S1 bands.
    """

    def __init__(self, reader: Any, views: str, size: Sequence[int], normalize: Normalize, s1_chans: int = 0,
                 crop_scale: Sequence[float] = (0.08, 1.0)) -> None:
        if views not in VIEW_MODES:
            raise ConfigError(f"unknown views {views!r} (--views); choose from {list(VIEW_MODES)}")
        if views == "cross_modal" and s1_chans <= 0:
            raise ConfigError("--views cross_modal pairs the Sentinel-1 and Sentinel-2 bands of a tile: it needs "
                              "--multimodal (DFC2020 S1 + S2)")
        self.reader = reader
        self.views = views
        self.normalize = normalize
        self.s1_chans = s1_chans
        self.augments = view_augments(size, crop_scale)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict[str, Any]:
        raw = torch.from_numpy(np.ascontiguousarray(self.reader.read_image(i)))  # (C, H, W), NaN = no data
        image = self.normalize({"image": raw})["image"]  # no-data filled
        if self.views == "cross_modal":
            s2, s1 = image[:-self.s1_chans], image[-self.s1_chans:]
            return {"view1": self.augments[0](s2), "view2": self.augments[1](s1), "id": self.reader.ids[i]}
        return {"view1": self.augments[0](image), "view2": self.augments[1](image), "id": self.reader.ids[i]}
