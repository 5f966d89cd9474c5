"""Bring-your-own data: a folder of images with image-level labels (the point of weak supervision).

Layout (see the README for an example)::

    mydata/
      classes.txt            one class name per line; line order = class id (0, 1, ...)
      images/<id>.tif        GeoTIFF with any band count, or <id>.png / <id>.jpg RGB
      labels.csv             optional: header "id,labels", labels separated by ';' (e.g. "tile7,water;forest")
      masks/<id>.tif|.png    optional: uint8 class ids, 255 = ignore; labels then follow the >= 10 % rule and
                             the masks serve evaluation
      splits/<name>.txt      optional: one id per line; split "all" (the default) is every image

At least one of ``labels.csv`` and ``masks/`` must exist. When both do, ``labels.csv`` gives the training labels
and the masks are used for evaluation only. Pixel values: uint8 images are divided by 255 and uint16 images by
10000 (the Sentinel-2 reflectance convention); float images are used as they are (choose
``--normalization standardize`` for arbitrary ranges).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from weakseg.data.base import TileDataset, Transform
from weakseg.data.classes import IGNORE_INDEX
from weakseg.data.dfc2020 import read_raster, replace_nonfinite
from weakseg.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
_DEFAULT_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)


def _read_any(path: Path, bands: int | None = None) -> np.ndarray:
    """(C, H, W) array from a GeoTIFF or a PNG/JPEG."""
    if path.suffix.lower() in (".tif", ".tiff"):
        return read_raster(path, bands)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if bands is not None and arr.shape[0] != bands:
        raise DataError(f"{path} has {arr.shape[0]} bands, expected {bands}")
    return arr


def _index_folder(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            if p.stem in files:
                raise DataError(f"{folder} holds two files for id {p.stem!r}: {files[p.stem].name} and {p.name}")
            files[p.stem] = p
    return files


class FolderDataset(TileDataset):
    """Images with image-level labels (CSV) and/or masks, as dict samples like :class:`DFC2020Dataset`.

    Args:
        root: the dataset folder (layout in the module docstring).
        split: "all" or the name of a list in ``splits/``.
        modality: accepted for the common reader interface; only "s2" (meaning: the images as they are) is
            valid, because a folder's images already carry all their bands.
        transform, label_threshold, cache: see :class:`~weakseg.data.base.TileDataset`.
    """

    has_masks: bool

    def __init__(
        self,
        root: str | Path,
        split: str = "all",
        transform: Transform | None = None,
        label_threshold: float = 0.10,
        modality: str = "s2",
        cache: bool = False,
    ) -> None:
        if modality != "s2":
            raise ConfigError(
                f"modality {modality!r} (--multimodal) applies to DFC2020; a folder dataset's images are used with "
                "all their bands: stack S1 and S2 into one GeoTIFF per tile instead"
            )
        super().__init__(transform, label_threshold, cache)
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise DataError(f"data folder {self.root} does not exist (--datadir)")
        self.class_names = self._read_classes()
        self.class_colors = tuple(_DEFAULT_COLORS[i % len(_DEFAULT_COLORS)] for i in range(self.num_classes))
        images_dir = self.root / "images"
        if not images_dir.is_dir():
            raise DataError(f"{images_dir} does not exist: put the images in an images/ folder")
        images = _index_folder(images_dir)
        masks_dir = self.root / "masks"
        self.has_masks = masks_dir.is_dir()
        masks = _index_folder(masks_dir) if self.has_masks else {}
        labels_csv = self.root / "labels.csv"
        self._csv_labels = self._read_labels(labels_csv) if labels_csv.is_file() else None
        if self._csv_labels is None and not self.has_masks:
            raise DataError(f"{self.root} has neither labels.csv nor masks/: image-level labels are needed")
        ids = self._split_ids(images)
        missing_img = [i for i in ids if i not in images]
        if missing_img:
            raise DataError(f"split {split!r} lists {len(missing_img)} id(s) with no image in {images_dir}: {missing_img[:5]}")
        if self._csv_labels is not None:
            unlabelled = [i for i in ids if i not in self._csv_labels]
            if unlabelled:
                raise DataError(f"{len(unlabelled)} image(s) have no row in {labels_csv}: {unlabelled[:5]}")
            orphan = sorted(set(self._csv_labels) - set(images))
            if orphan:
                raise DataError(f"{labels_csv} has rows for {len(orphan)} id(s) with no image in {images_dir}: {orphan[:5]}")
        if self.has_masks:
            no_mask = [i for i in ids if i not in masks]
            if no_mask:
                raise DataError(f"{len(no_mask)} image(s) have no mask in {masks_dir}: {no_mask[:5]}")
        if not ids:
            raise DataError(f"split {split!r} of {self.root} is empty")
        self.ids = ids
        self._images = [images[i] for i in ids]
        self._masks = [masks[i] for i in ids] if self.has_masks else None
        self._bands: int | None = None

    # ---- metadata files ---------------------------------------------------------------------------------
    def _read_classes(self) -> tuple[str, ...]:
        path = self.root / "classes.txt"
        if not path.is_file():
            raise DataError(f"{path} does not exist: list one class name per line")
        names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
        if not names:
            raise DataError(f"{path} lists no class")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DataError(f"{path} lists class(es) twice: {dup}")
        if len(names) >= IGNORE_INDEX:
            raise DataError(f"{path} lists {len(names)} classes; at most {IGNORE_INDEX - 1} are supported")
        return names

    def _read_labels(self, path: Path) -> dict[str, np.ndarray]:
        index = {n.lower(): i for i, n in enumerate(self.class_names)}
        out: dict[str, np.ndarray] = {}
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"id", "labels"} <= set(reader.fieldnames):
                raise DataError(f"{path} must have a header with columns 'id' and 'labels'")
            for row_no, row in enumerate(reader, start=2):
                tile = (row["id"] or "").strip()
                if not tile:
                    raise DataError(f"{path} line {row_no}: empty id")
                if tile in out:
                    raise DataError(f"{path} line {row_no}: id {tile!r} appears twice")
                vec = np.zeros(len(self.class_names), dtype=np.float32)
                for name in filter(None, (s.strip() for s in (row["labels"] or "").split(";"))):
                    if name.lower() not in index:
                        raise DataError(
                            f"{path} line {row_no}: unknown class {name!r} for {tile!r}; classes.txt has "
                            f"{list(self.class_names)}"
                        )
                    vec[index[name.lower()]] = 1.0
                out[tile] = vec
        return out

    def _split_ids(self, images: dict[str, Path]) -> list[str]:
        if self.split == "all":
            return sorted(images)
        path = self.root / "splits" / f"{self.split}.txt"
        if not path.is_file():
            have = sorted(p.stem for p in (self.root / "splits").glob("*.txt")) if (self.root / "splits").is_dir() else []
            raise DataError(f"split {self.split!r} not found: no {path}; available: {['all', *have]}")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    def _restrict_files(self, indices: list[int]) -> None:
        self._images = [self._images[i] for i in indices]
        if self._masks is not None:
            self._masks = [self._masks[i] for i in indices]

    # ---- reading ----------------------------------------------------------------------------------------
    def source_path(self, i: int) -> Path:
        return self._images[i]

    def mask_path(self, i: int) -> Path:
        assert self._masks is not None
        return self._masks[i]

    def _read_image(self, i: int) -> np.ndarray:
        path = self._images[i]
        arr = _read_any(path, self._bands)
        if self._bands is None:
            self._bands = arr.shape[0]
        if arr.dtype == np.uint8:
            img = arr.astype(np.float32) / 255.0
        elif arr.dtype == np.uint16:
            img = arr.astype(np.float32) / 10000.0
        else:
            img = arr.astype(np.float32)
        return replace_nonfinite(img, path)

    def _read_mask(self, i: int) -> np.ndarray:
        path = self.mask_path(i)
        mask = _read_any(path, 1)[0]
        bad = (mask != IGNORE_INDEX) & (mask >= self.num_classes)
        if bad.any():
            raise DataError(
                f"{path} holds class id {int(mask[bad].max())} but classes.txt lists {self.num_classes} classes"
            )
        return mask.astype(np.uint8)

    def image_labels(self, i: int, sample: dict[str, Any]) -> torch.Tensor:
        """labels.csv when present (whole-image labels, crops do not change them); else the >= 10 % rule."""
        if self._csv_labels is not None:
            return torch.from_numpy(self._csv_labels[self.ids[i]].copy())
        return super().image_labels(i, sample)
