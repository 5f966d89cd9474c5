"""What every reader shares: the sample dict, the optional in-memory cache, labels after the transform, plotting.

A reader (:class:`~weakseg.data.dfc2020.DFC2020Dataset`, :class:`~weakseg.data.folder.FolderDataset`) only says
how to read one tile's image and mask (``_read_image``, ``_read_mask``) and where they live (``source_path``,
``mask_path``); this base turns that into samples ``{'image', 'mask', 'valid', 'label', 'id', 'index'}``. The
transform (crop, augmentation, normalisation) runs before the image-level labels are computed, so labels describe
the crop the model sees (``datasets.md`` 1.5); a reader whose labels come from elsewhere (a CSV) overrides
:meth:`TileDataset.image_labels` and sets :attr:`TileDataset.labels_from_crop` False.

No data (:mod:`weakseg.data.nodata`): ``read_image`` holds NaN in every band of a pixel without data. A sample's
``valid`` (H, W) bool marks the pixels with data at the resolution of its ``mask`` (the transforms move it with
the mask); after the transform such pixels are 255 in ``mask`` and any NaN left in ``image`` (a transform without
normalisation) is filled like ``Normalize('none')`` does, so a sample's image is always finite.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weakseg.data.classes import IGNORE_INDEX
from weakseg.data.nodata import all_true, finite_entries, pixel_validity, raster_may_hold_invalid
from weakseg.data.normalization import fill_invalid
from weakseg.errors import DataError

Transform = Callable[[dict[str, Any]], dict[str, Any]]


def multi_hot_from_mask(
    mask: torch.Tensor, num_classes: int, threshold: float = 0.10, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Image-level labels by the >= 10 % rule (sparse-vit-wsss, citing arXiv 2104.00704).

    Class c is present iff its pixel count divided by the crop area is >= ``threshold``. The area is the whole
    crop, or with ``valid`` its pixels with data: a pixel without data is no evidence for or against a class, so
    a crop half outside the satellite swath still gets the labels of the half it shows. Pixels the ground truth
    ignores (255: DFC2020's no-data, Savanna, Snow) stay in the denominator and are never a label.

    Args:
        mask: (H, W) integer class ids, 255 = ignore.
        valid: (H, W) bool, True where the image has data (None: every pixel); a crop without one valid pixel
            has no label.
    Returns:
        (num_classes,) float32 multi-hot.
    """
    flat = mask.numpy().reshape(-1)  # (H*W,) in numpy: ~10 small torch ops cost more than the counting itself
    if valid is None:
        area = flat.size
    else:
        keep = valid.numpy().reshape(-1)
        area = int(keep.sum())
        if area < flat.size:
            flat = flat[keep]
    if area == 0:
        return torch.zeros(num_classes)
    # Ignored pixels (255) and any id >= num_classes fall in bins past the slice; float32 as torch would divide.
    counts = np.bincount(flat, minlength=num_classes)[:num_classes].astype(np.float32)
    return torch.from_numpy((counts / np.float32(area) >= np.float32(threshold)).astype(np.float32))


def ignore_invalid(sample: dict[str, Any]) -> dict[str, Any]:
    """A transformed sample made safe: 255 in ``mask`` where ``valid`` is False, no NaN left in ``image``.

    NaN survives in ``image`` only when the transform did not normalise (no transform, or a custom one); it is
    then filled with the image's own band mean over its valid pixels, as ``Normalize('none')`` fills.
    """
    out = dict(sample)
    image = sample["image"]  # (C, h, w)
    finite = finite_entries(image)
    if not all_true(finite):
        out["image"] = fill_invalid(image, ~finite)
    valid, mask = sample.get("valid"), sample.get("mask")  # (H, W) bool, (H, W) int64
    if valid is not None and mask is not None and valid.shape == mask.shape and not all_true(valid):
        out["mask"] = mask.masked_fill(~valid, IGNORE_INDEX)
    return out


def shared_tiles(reader: Any, other: Any) -> list[str]:
    """Ids of the tiles of ``other`` that are tiles of ``reader`` too: the same image file.

    Why: a validation or evaluation split must not hold training tiles (``weakseg train`` refuses one,
    ``weakseg refine`` warns). Files, not ids, are compared: two folders of a dataset may use the same tile names
    for different images, while ``<split>:train`` and ``<split>:holdout`` of one split share files exactly when
    they share tiles.
    """
    files = {os.path.abspath(reader.source_path(i)) for i in range(len(reader.ids))}
    return [tid for i, tid in enumerate(other.ids) if os.path.abspath(other.source_path(i)) in files]


class TileDataset(torch.utils.data.Dataset):
    """Base of the readers; subclasses set ``ids``, ``class_names``, ``class_colors``, ``has_masks``.

    Args:
        transform: callable on the sample dict, applied before labels are computed.
        label_threshold: fraction of the crop a class must cover to be an image-level label.
        cache: keep every tile read in memory (scaled float32), for small datasets read many times, such as
            the built-in synthetic data (256 tiles of 64x64 x 15 bands: 63 MB). Unused when a tile store is
            attached (:meth:`attach_store`): large splits go to ``weakseg prepare`` instead.
    """

    ids: list[str]
    class_names: tuple[str, ...]
    class_colors: tuple[str, ...]
    has_masks: bool
    #: Image-level labels are computed from the mask of the sample the model sees (the >= 10 % rule), so a
    #: training crop gets the labels of the crop. False where they are whole-image labels (a CSV): training then
    #: resizes the whole image instead of cropping (:func:`weakseg.data.datamodule.build_transform`).
    labels_from_crop: bool = True
    #: The background class of datasets that have one (VOC: 0), for the background-plane mask rule
    #: (:mod:`weakseg.masks.rules`); None for land cover, where every class is a class.
    background_index: int | None = None
    #: A fresh :class:`~weakseg.data.tile_store.TileStore` of this split (``weakseg prepare``), attached by
    #: :func:`weakseg.data.open_dataset`: tiles it holds are read from its memory map instead of their files.
    _store: Any = None

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

    def _image_files(self, i: int) -> list[Path]:
        """Every file the image of tile ``i`` is read from (DFC2020 ``s1s2``: S2 and S1)."""
        return [self.source_path(i)]

    def _restrict_files(self, indices: list[int]) -> None:
        """Keep the per-tile file lists of ``indices`` only (in that order)."""
        raise NotImplementedError

    def restrict(self, indices: list[int]) -> None:
        """Keep only the tiles ``indices`` (a part of the split, :mod:`weakseg.data.splits`); before any read."""
        if self._cache:
            raise RuntimeError("restrict() must be called before tiles are read into the cache")
        self.ids = [self.ids[i] for i in indices]
        self._restrict_files(indices)

    def attach_store(self, store: Any) -> None:
        """Read the tiles ``store`` holds from it (by tile id, so a part of the split works too).

        The in-memory cache is dropped: the memory map already serves every process from the page cache, and
        copying its tiles into a per-process dict would only multiply memory by the number of workers.
        """
        self._store = store
        self._cache = None

    # ---- shared ---------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def read_image(self, i: int) -> np.ndarray:
        """Scaled, unnormalised image, float32 (C, H, W), NaN in every band of a pixel without data."""
        k = self._store.index_of(self.ids[i]) if self._store is not None else None
        if k is not None:
            return self._store.image(k)  # a new float32 array: the stored (C, H, W) row
        return self._cached("image", i, self._read_image)

    def read_valid(self, i: int) -> np.ndarray:
        """(H, W) bool: the pixels of tile ``i`` with data in every band (:mod:`weakseg.data.nodata`)."""
        return pixel_validity(self.read_image(i))

    def read_target(self, i: int) -> np.ndarray:
        """The ground truth as a target, uint8 (H, W): :meth:`read_mask` with 255 where the image has no data.

        What evaluation scores: a pixel without image data cannot be predicted, so it is not counted. The image's
        pixels are read only when one of its files can hold no-data (a float band or a nodata tag in the header);
        a tile whose image has no valid pixel at all is entirely 255.
        """
        mask = self.read_mask(i)
        try:
            if not any(raster_may_hold_invalid(Path(p)) for p in self._image_files(i)):
                return mask
            valid = self.read_valid(i)
        except DataError:
            return np.full_like(mask, IGNORE_INDEX)
        if valid.shape != mask.shape:
            return mask  # a size mismatch is reported where the tile is read as a sample
        return np.where(valid, mask, IGNORE_INDEX).astype(np.uint8)

    def read_mask(self, i: int) -> np.ndarray:
        """Class ids, uint8 (H, W), 255 = ignore."""
        if not self.has_masks:
            raise DataError(f"{getattr(self, 'root', 'the dataset')} has no masks/ folder: nothing to evaluate against")
        k = self._store.index_of(self.ids[i]) if self._store is not None and self._store.has_masks else None
        if k is not None:
            return self._store.mask(k)  # a new uint8 (H, W) array
        return self._cached("mask", i, self._read_mask)

    def _cached(self, kind: str, i: int, read: Callable[[int], np.ndarray]) -> np.ndarray:
        if self._cache is None:
            return read(i)
        if (kind, i) not in self._cache:
            self._cache[(kind, i)] = read(i)
        return self._cache[(kind, i)]

    def image_labels(self, i: int, sample: dict[str, Any]) -> torch.Tensor:
        """(num_classes,) multi-hot of the transformed sample: the >= 10 % rule on its mask's valid pixels."""
        valid = sample.get("valid")
        if valid is not None and valid.shape != sample["mask"].shape:
            valid = None
        return multi_hot_from_mask(sample["mask"], self.num_classes, self.label_threshold, valid)

    def __getitem__(self, i: int) -> dict[str, Any]:
        transform = self.transform
        window = self._store_window(i)
        if window is not None:  # a stored tile under a leading crop: read only the crop's window
            k, window, transform = window
            image = self._store.image(k, window)  # (C, h, w) float32
            mask = (self._store.mask(k, window) if self.has_masks
                    else np.full(image.shape[1:], IGNORE_INDEX, dtype=np.uint8))
        else:
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
            "valid": torch.from_numpy(pixel_validity(image)),  # (H, W) bool
            "id": self.ids[i],
            "index": i,
        }
        if window is not None:
            sample["crop"] = (window[0], window[1])
        if transform is not None:
            sample = transform(sample)
        sample = ignore_invalid(sample)
        sample["label"] = self.image_labels(i, sample)
        return sample

    def _store_window(self, i: int) -> tuple[int, tuple[int, int, int, int], Any] | None:
        """(store row, crop window, the transforms after the crop) when tile ``i`` is stored and the transform
        starts with a crop; else None.

        The crop's offsets are drawn here exactly as the crop transform would draw them (same generator, same
        order), so a sample is identical to cropping the whole tile: pixel validity, the mask and the image
        labels are per pixel of the crop. Only the window is widened from float16 and checked.
        """
        if self._store is None or not hasattr(self.transform, "leading_crop"):
            return None
        if self.has_masks and not self._store.has_masks:
            return None
        crop, rest = self.transform.leading_crop()
        k = self._store.index_of(self.ids[i]) if crop is not None else None
        if k is None:
            return None
        H, W = self._store.tile_size
        top, left = crop.offsets(H, W, self.ids[i])
        return k, (top, left, crop.size[0], crop.size[1]), rest

    def plot(self, sample: dict[str, Any], path: str | Path) -> Path:
        """Write true colour | mask (| prediction) for one sample as a PNG."""
        from weakseg.viz.figures import plot_pseudomask_panel

        masks = {"ground truth": sample["mask"].numpy().astype(np.uint8)}
        if "prediction" in sample:
            masks["prediction"] = np.asarray(sample["prediction"], dtype=np.uint8)
        row = {"id": sample["id"], "image": sample["image"].numpy(), **masks}
        return plot_pseudomask_panel([row], list(masks), self.class_names, self.class_colors, path)
