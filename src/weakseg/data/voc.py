"""PASCAL VOC 2012 layout (``--dataset voc``): natural images with a background class.

Conventions (``datasets.md`` section 3): 21 classes, 0 = background, 1..20 the objects; 255 = object boundary /
void, ignored in losses and metrics and never mapped to background; masks are index PNGs (palette PNGs of
``SegmentationClass`` or single-channel ones of ``SegmentationClassAug``), read as indices, never as colours.

Layout (``--datadir`` is the ``VOC2012`` folder, or a folder holding ``VOCdevkit/VOC2012`` or ``VOC2012``)::

    JPEGImages/<id>.jpg
    SegmentationClassAug/<id>.png    or SegmentationClass/<id>.png (Aug preferred when both exist)
    ImageSets/Segmentation/<split>.txt   one id per line: train, val, train_aug, ...
    cls_labels.npy                   optional: {id: 20-dim multi-hot without background} (MCTformer / WeakTr)

**Image labels** are whole-image labels: from ``cls_labels.npy`` when it is there, else from the whole mask (a
class is present iff at least one pixel of it is; 255 is never a label). The classifier has all 21 outputs; the
background label is 1 iff the mask has a background pixel, and 1 for every image when the labels come from
``cls_labels.npy`` (which has no background column; nearly every VOC image shows background). Because the labels
describe the whole image, training sees the whole image resized (``labels_from_crop`` False), as prediction does.
Pseudomask rules with a background plane (``--rule background`` / WeakTr's ``auto``) read
:attr:`VOCDataset.background_index`.

**Masks of a split.** When every id of the split has a mask the split is scored; when some lack one (train_aug
with only ``SegmentationClass``), the labels must come from ``cls_labels.npy`` and the split is not scored.
Pixel values: uint8 RGB / 255.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weakseg.data.base import TileDataset, Transform
from weakseg.data.classes import IGNORE_INDEX
from weakseg.data.folder import _read_any, scale_by_dtype, unique_lines
from weakseg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_palette(n: int = 256) -> np.ndarray:
    """VOC's colour map, (n, 3) uint8: the bits of the class id spread over R, G and B (the devkit's rule)."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


VOC_COLORS: tuple[str, ...] = tuple("#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb)) for rgb in voc_palette(21))
MASK_FOLDERS = ("SegmentationClassAug", "SegmentationClass")


def find_voc_root(root: Path) -> Path:
    """The folder holding ``JPEGImages``: ``root`` itself, ``root/VOC2012`` or ``root/VOCdevkit/VOC2012``."""
    if not root.is_dir():
        raise DataError(f"data folder {root} " + ("is a file, not a folder" if root.exists() else "does not exist")
                        + " (--datadir)")
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DataError(f"{root} is not a PASCAL VOC folder: no JPEGImages/ in it (nor in VOC2012/ or "
                    "VOCdevkit/VOC2012/ below it)")


class VOCDataset(TileDataset):
    """PASCAL VOC reader (module docstring); the same sample dicts as every reader.

    Args:
        root: the VOC2012 folder or a folder above it.
        split: a list name of ``ImageSets/Segmentation`` (train, val, train_aug, ...).
        modality: only "s2" (the images as they are), for the common reader interface.
        transform, label_threshold, cache: see :class:`~weakseg.data.base.TileDataset` (``label_threshold``
            is unused: VOC labels are whole-image labels).
    """

    class_names = VOC_CLASSES
    class_colors = VOC_COLORS
    background_index = 0
    labels_from_crop = False

    def __init__(self, root: str | Path, split: str = "train", transform: Transform | None = None,
                 label_threshold: float = 0.10, modality: str = "s2", cache: bool = False) -> None:
        if modality != "s2":
            raise ConfigError(f"modality {modality!r} (--multimodal) applies to DFC2020, not to VOC images")
        super().__init__(transform, label_threshold, cache)
        self.root = find_voc_root(Path(root))
        self.split = split
        lists = self.root / "ImageSets" / "Segmentation"
        if not lists.is_dir():
            raise DataError(f"{self.root} has no ImageSets/Segmentation/ folder: the split lists (train.txt, "
                            "val.txt, ...) go there")
        path = lists / f"{split}.txt"
        if not path.is_file():
            have = sorted(p.stem for p in lists.glob("*.txt"))
            raise DataError(f"split {split!r} not found: no {path}; available: {have}")
        lines = unique_lines(path, "id")
        if not lines:
            raise DataError(f"split {split!r} is empty: {path} lists no id")
        images_dir = self.root / "JPEGImages"
        for line_no, tile in lines:
            image = images_dir / f"{tile}.jpg"
            if not image.is_file():
                raise DataError(f"{path} line {line_no} names {tile!r}, but {image} does not exist")
        self.ids = [tile for _, tile in lines]
        self._images = [images_dir / f"{t}.jpg" for t in self.ids]
        self._cls_labels = self._read_cls_labels(self.root / "cls_labels.npy")
        masks_dir = next((self.root / m for m in MASK_FOLDERS if (self.root / m).is_dir()), None)
        masks = [masks_dir / f"{t}.png" for t in self.ids] if masks_dir is not None else []
        missing = [m for m in masks if not m.is_file()] if masks_dir is not None else []
        self.has_masks = masks_dir is not None and not missing
        if not self.has_masks and self._cls_labels is None:
            where = (f"{len(missing)} of {len(self.ids)} ids of {path} have no mask in {masks_dir}, e.g. "
                     f"{missing[0].name}" if missing else f"{self.root} has no {' or '.join(MASK_FOLDERS)}/ folder")
            raise DataError(f"{where}; image labels need masks or {self.root / 'cls_labels.npy'}")
        if missing:
            log.info("%d of %d ids of %s have no mask in %s: labels from cls_labels.npy, the split is not scored",
                     len(missing), len(self.ids), path, masks_dir)
        self._masks = masks if self.has_masks else None
        self._mask_labels: dict[int, np.ndarray] = {}

    def _read_cls_labels(self, path: Path) -> dict[str, np.ndarray] | None:
        """``cls_labels.npy`` -> {id: 21-dim float32 with background 1}; None when the file does not exist."""
        if not path.is_file():
            return None
        try:
            raw = np.load(path, allow_pickle=True).item()
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise DataError(f"{path} is not a cls_labels.npy dictionary (id -> 20 multi-hot values): {e}") from e
        if not isinstance(raw, dict):
            raise DataError(f"{path} holds a {type(raw).__name__}, not a dictionary id -> 20 multi-hot values")
        out: dict[str, np.ndarray] = {}
        for tile in self.ids:
            if tile not in raw:
                raise DataError(f"{path} has no entry for {tile!r} of split {self.split!r}")
            v = np.asarray(raw[tile], dtype=np.float32).reshape(-1)
            if v.shape[0] != len(VOC_CLASSES) - 1:
                raise DataError(f"{path}: the entry of {tile!r} has {v.shape[0]} values, expected "
                                f"{len(VOC_CLASSES) - 1} (the object classes, without background)")
            out[tile] = np.concatenate([[1.0], (v > 0.5).astype(np.float32)])
        return out

    def _restrict_files(self, indices: list[int]) -> None:
        self._images = [self._images[i] for i in indices]
        if self._masks is not None:
            self._masks = [self._masks[i] for i in indices]
        self._mask_labels = {}

    def source_path(self, i: int) -> Path:
        return self._images[i]

    def mask_path(self, i: int) -> Path:
        if self._masks is None:
            raise DataError(f"split {self.split!r} of {self.root} has no masks")
        return self._masks[i]

    def _read_image(self, i: int) -> np.ndarray:
        arr = _read_any(self._images[i])
        if arr.shape[0] == 1:  # a grey JPEG: the same value in R, G and B
            arr = np.repeat(arr, 3, axis=0)
        if arr.shape[0] != 3:
            raise DataError(f"{self._images[i]} has {arr.shape[0]} bands; VOC images are RGB")
        return scale_by_dtype(arr).astype(np.float32)

    def _read_mask(self, i: int) -> np.ndarray:
        path = self.mask_path(i)
        mask = _read_any(path, 1)[0]
        bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= len(VOC_CLASSES)))
        if bad.any():
            values = np.unique(mask[bad]).tolist()
            raise DataError(f"{path} holds values {', '.join(map(str, values[:10]))}: a VOC mask holds class ids "
                            f"0..{len(VOC_CLASSES) - 1} and 255 (read as indices; is it an RGB rendering?)")
        return mask.astype(np.uint8)

    def image_labels(self, i: int, sample: dict[str, Any]) -> torch.Tensor:
        """cls_labels.npy, else the classes with at least one pixel in the whole mask (module docstring)."""
        if self._cls_labels is not None:
            return torch.from_numpy(self._cls_labels[self.ids[i]].copy())
        if i not in self._mask_labels:
            mask = self.read_mask(i)
            present = np.bincount(mask[mask != IGNORE_INDEX].astype(np.int64), minlength=len(VOC_CLASSES))
            self._mask_labels[i] = (present[: len(VOC_CLASSES)] > 0).astype(np.float32)
        return torch.from_numpy(self._mask_labels[i].copy())
