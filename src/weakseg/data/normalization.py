"""Input normalisation after the fixed scaling of the readers (``datasets.md`` section 2).

- ``"none"``: keep the readers' scaled values in [0, 1] (the project default: absolute brightness is a class cue
  for water, snow and urban, which per-image normalisation removes).
- ``"per_image_max"``: divide each channel by its maximum over the crop (+1e-5), as sparse-vit-wsss does.
- ``"standardize"``: per-band mean / std computed on the training split (:func:`compute_band_stats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from weakseg.errors import ConfigError

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
        image = sample["image"].float()
        if self.mode == "per_image_max":
            image = image / (image.amax(dim=(-2, -1), keepdim=True) + 1e-5)
        elif self.mode == "standardize":
            assert self.mean is not None and self.std is not None
            if self.mean.shape[0] != image.shape[0]:
                raise ConfigError(
                    f"band statistics have {self.mean.shape[0]} bands but the image has {image.shape[0]}"
                )
            image = (image - self.mean) / self.std
        out = dict(sample)
        out["image"] = image
        return out

    def __repr__(self) -> str:
        return f"Normalize({self.mode!r})"


def compute_band_stats(dataset: Any, max_tiles: int = 512) -> tuple[list[float], list[float]]:
    """Per-band mean and std over (up to ``max_tiles`` evenly spaced) tiles of a reader with ``read_image``."""
    n = len(dataset)
    idx = np.unique(np.linspace(0, n - 1, num=min(n, max_tiles)).round().astype(int))
    s = s2 = None
    count = 0
    for i in idx:
        img = dataset.read_image(int(i)).astype(np.float64)  # (C, H, W)
        flat = img.reshape(img.shape[0], -1)
        s = flat.sum(1) if s is None else s + flat.sum(1)
        s2 = (flat**2).sum(1) if s2 is None else s2 + (flat**2).sum(1)
        count += flat.shape[1]
    assert s is not None and s2 is not None
    mean = s / count
    std = np.sqrt(np.maximum(s2 / count - mean**2, 0.0))
    return mean.tolist(), std.tolist()
