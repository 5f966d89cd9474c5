"""What every reader shares: the sample dict, the optional in-memory cache, labels after the transform, plotting.

A reader (:class:`~weakseg.data.dfc2020.DFC2020Dataset`, :class:`~weakseg.data.folder.FolderDataset`) only says
how to read one tile's image and mask (``_read_image``, ``_read_mask``) and where they live (``source_path``,
``mask_path``); this base turns that into samples ``{'image', 'mask', 'label', 'id', 'index'}``. The transform
(crop, augmentation, normalisation) runs before the image-level labels are computed, so labels describe the crop
the model sees (``datasets.md`` 1.5); a reader whose labels come from elsewhere (a CSV) overrides
:meth:`TileDataset.image_labels`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weakseg.data.classes import IGNORE_INDEX
from weakseg.errors import DataError

Transform = Callable[[dict[str, Any]], dict[str, Any]]


def multi_hot_from_mask(mask: torch.Tensor, num_classes: int, threshold: float = 0.10) -> torch.Tensor:
    """Image-level labels by the >= 10 % rule (sparse-vit-wsss, citing arXiv 2104.00704).

    Class c is present iff its pixel count divided by the **whole** crop area is >= ``threshold``; ignored
    pixels (255) stay in the denominator and are never a label.

    Args:
        mask: (H, W) integer class ids, 255 = ignore.
    Returns:
        (num_classes,) float32 multi-hot.
    """
    flat = mask.reshape(-1).long()
    valid = flat[flat != IGNORE_INDEX]
    counts = torch.bincount(valid.clamp_max(num_classes), minlength=num_classes + 1)[:num_classes]
    return (counts.float() / flat.numel() >= threshold).float()


class TileDataset(torch.utils.data.Dataset):
    """Base of the readers; subclasses set ``ids``, ``class_names``, ``class_colors``, ``has_masks``.

    Args:
        transform: callable on the sample dict, applied before labels are computed.
        label_threshold: fraction of the crop a class must cover to be an image-level label.
        cache: keep every tile read in memory (scaled float32), for small datasets read many times, such as
            the built-in synthetic data (256 tiles of 64x64 x 15 bands: 63 MB).
    """

    ids: list[str]
    class_names: tuple[str, ...]
    class_colors: tuple[str, ...]
    has_masks: bool

    def __init__(self, transform: Transform | None, label_threshold: float, cache: bool) -> None:
        self.transform = transform
        self.label_threshold = label_threshold
        self._cache: dict[tuple[str, int], np.ndarray] | None = {} if cache else None

    # ---- what a reader provides -------------------------------------------------------------------------
    def _read_image(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def _read_mask(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def source_path(self, i: int) -> Path:
        """The image file of tile ``i``: outputs copy its georeference."""
        raise NotImplementedError

    def mask_path(self, i: int) -> Path:
        raise NotImplementedError

    def _restrict_files(self, indices: list[int]) -> None:
        """Keep the per-tile file lists of ``indices`` only (in that order)."""
        raise NotImplementedError

    def restrict(self, indices: list[int]) -> None:
        """Keep only the tiles ``indices`` (a part of the split, :mod:`weakseg.data.splits`); before any read."""
        if self._cache:
            raise RuntimeError("restrict() must be called before tiles are read into the cache")
        self.ids = [self.ids[i] for i in indices]
        self._restrict_files(indices)

    # ---- shared ---------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def read_image(self, i: int) -> np.ndarray:
        """Scaled, unnormalised image, float32 (C, H, W)."""
        return self._cached("image", i, self._read_image)

    def read_mask(self, i: int) -> np.ndarray:
        """Class ids, uint8 (H, W), 255 = ignore."""
        if not self.has_masks:
            raise DataError(f"{getattr(self, 'root', 'the dataset')} has no masks/ folder: nothing to evaluate against")
        return self._cached("mask", i, self._read_mask)

    def _cached(self, kind: str, i: int, read: Callable[[int], np.ndarray]) -> np.ndarray:
        if self._cache is None:
            return read(i)
        if (kind, i) not in self._cache:
            self._cache[(kind, i)] = read(i)
        return self._cache[(kind, i)]

    def image_labels(self, i: int, sample: dict[str, Any]) -> torch.Tensor:
        """(num_classes,) multi-hot of the transformed sample: the >= 10 % rule on its mask."""
        return multi_hot_from_mask(sample["mask"], self.num_classes, self.label_threshold)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.read_image(i)
        if self.has_masks:
            mask = self.read_mask(i)
            if mask.shape != image.shape[1:]:
                raise DataError(
                    f"{self.mask_path(i)} is {mask.shape[0]}x{mask.shape[1]} but {self.source_path(i)} is "
                    f"{image.shape[1]}x{image.shape[2]}"
                )
        else:
            mask = np.full(image.shape[1:], IGNORE_INDEX, dtype=np.uint8)
        sample: dict[str, Any] = {
            "image": torch.from_numpy(image.copy() if self._cache is not None else image),
            "mask": torch.from_numpy(mask.astype(np.int64)),  # astype copies
            "id": self.ids[i],
            "index": i,
        }
        if self.transform is not None:
            sample = self.transform(sample)
        sample["label"] = self.image_labels(i, sample)
        return sample

    def plot(self, sample: dict[str, Any], path: str | Path) -> Path:
        """Write true colour | mask (| prediction) for one sample as a PNG."""
        from weakseg.viz.figures import plot_pseudomask_panel

        masks = {"ground truth": sample["mask"].numpy().astype(np.uint8)}
        if "prediction" in sample:
            masks["prediction"] = np.asarray(sample["prediction"], dtype=np.uint8)
        row = {"id": sample["id"], "image": sample["image"].numpy(), **masks}
        return plot_pseudomask_panel([row], list(masks), self.class_names, self.class_colors, path)
