"""Input normalisation after the fixed scaling of the readers (``datasets.md`` section 2).

- ``"none"``: keep the readers' scaled values (absolute brightness is a class cue for water, snow and urban,
  which per-image normalisation removes).
- ``"per_image_max"``: divide each channel by its maximum over the valid pixels of the crop (+1e-5), as
  sparse-vit-wsss does.
- ``"standardize"`` (the training default): per-band mean / std computed on the training split
  (:func:`compute_band_stats`); it keeps absolute brightness and copes with any value range.

No data (:mod:`weakseg.data.nodata`): pixels without data (NaN in the reader's image, or ``valid`` False in the
sample) take no part in any statistic (the band mean / std, the per-image maximum) and are filled after
normalisation with a neutral value, :func:`fill_invalid`: 0 for ``standardize``, which is the training band
mean; for ``none`` and ``per_image_max``, which have no training statistics, the image's own mean of that band
over its valid pixels (0 if it has none). A fixed 0 there would be the darkest value of the scaled range, or a
bright 0 dB for raw Sentinel-1 in a folder dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from weakseg.data.nodata import all_true, finite_entries
from weakseg.errors import ConfigError, DataError

NormalizationMode = Literal["none", "per_image_max", "standardize"]
NORMALIZATION_MODES = ("none", "per_image_max", "standardize")


class Normalize:
    """Apply a normalisation mode to ``sample['image']`` (C, H, W)."""

    def __init__(
        self, mode: NormalizationMode = "none", mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ) -> None:
        if mode not in NORMALIZATION_MODES:
            raise ConfigError(f"unknown normalization {mode!r}; choose from {list(NORMALIZATION_MODES)}")
        if mode == "standardize" and (mean is None or std is None):
            raise ConfigError("normalization 'standardize' needs per-band mean and std (compute_band_stats)")
        self.mode = mode
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).clamp_min(1e-6)[:, None, None]

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = sample["image"].float()  # (C, H, W), NaN = no data
        finite = finite_entries(image)  # (C, H, W)
        valid = sample.get("valid")  # (H, W) bool or None
        if valid is not None and tuple(valid.shape) != tuple(image.shape[-2:]):
            valid = None
        any_invalid = not all_true(finite) or (valid is not None and not all_true(valid))
        invalid = (~finite | ~valid[None] if valid is not None else ~finite) if any_invalid else None
        if self.mode == "per_image_max":
            peak = (image if invalid is None else image.masked_fill(invalid, float("-inf"))).amax(
                dim=(-2, -1), keepdim=True)  # (C, 1, 1)
            peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
            image = image / (peak + 1e-5)
        elif self.mode == "standardize":
            assert self.mean is not None and self.std is not None
            if self.mean.shape[0] != image.shape[0]:
                raise ConfigError(
                    f"band statistics have {self.mean.shape[0]} bands but the image has {image.shape[0]}"
                )
            image = torch.sub(image, self.mean).div_(self.std)  # one new tensor, not two
        if invalid is not None:
            image = fill_invalid(image, invalid, 0.0 if self.mode == "standardize" else None)
        out = dict(sample)
        out["image"] = image
        return out

    def __repr__(self) -> str:
        return f"Normalize({self.mode!r})"


def fill_invalid(image: torch.Tensor, invalid: torch.Tensor, value: float | None = None) -> torch.Tensor:
    """``image`` (C, H, W) with the entries where ``invalid`` (C, H, W) is True replaced by a neutral value.

    Args:
        value: the fill; None: each band's mean over its valid entries (0 for a band without one).
    """
    if value is not None:
        return image.masked_fill(invalid, value)
    ok = ~invalid
    count = ok.sum(dim=(-2, -1), keepdim=True)  # (C, 1, 1)
    total = torch.where(ok, image, torch.zeros_like(image)).sum(dim=(-2, -1), keepdim=True)
    mean = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    return torch.where(invalid, mean.expand_as(image), image)


class BandStats:
    """Running per-band sum, sum of squares and count of the valid values (float64) of images added one by one."""

    def __init__(self) -> None:
        self.sum: np.ndarray | None = None
        self.sum_sq: np.ndarray | None = None
        self.count: np.ndarray | None = None
        self.tiles = 0

    def add(self, image: np.ndarray) -> None:
        """Add one reader image (C, H, W); its NaN/inf entries (no data) are left out."""
        flat = np.asarray(image, dtype=np.float64).reshape(image.shape[0], -1)  # (C, H*W)
        ok = np.isfinite(flat)
        values = np.where(ok, flat, 0.0)
        s, s2, n = values.sum(1), (values**2).sum(1), ok.sum(1)
        if self.sum is None:
            self.sum, self.sum_sq, self.count = s, s2, n
        else:
            assert self.sum_sq is not None and self.count is not None
            self.sum, self.sum_sq, self.count = self.sum + s, self.sum_sq + s2, self.count + n
        self.tiles += 1

    def result(self) -> tuple[list[float], list[float]]:
        """(mean per band, std per band) of every valid value added."""
        if self.sum is None or self.sum_sq is None or self.count is None or not (self.count > 0).all():
            raise DataError("no valid pixel to compute the band statistics of 'standardize' from")
        mean = self.sum / self.count
        std = np.sqrt(np.maximum(self.sum_sq / self.count - mean**2, 0.0))
        return mean.tolist(), std.tolist()


def compute_band_stats(dataset: Any, max_tiles: int = 512) -> tuple[list[float], list[float]]:
    """Per-band mean and std of the valid pixels of (up to ``max_tiles`` evenly spaced) tiles of a reader.

    Pixels without data (NaN in ``read_image``) are left out, so a no-data value never shifts the statistics.
    """
    n = len(dataset)
    idx = np.unique(np.linspace(0, n - 1, num=min(n, max_tiles)).round().astype(int))
    stats = BandStats()
    for i in idx:
        stats.add(dataset.read_image(int(i)))  # (C, H, W)
    return stats.result()
