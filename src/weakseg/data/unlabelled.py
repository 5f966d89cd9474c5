"""Unlabelled images for self-supervised pretraining (``weakseg pretrain --dataset images``).

A folder of images and nothing else: ``<root>/images/*`` when that folder exists, else the files of ``<root>``
itself (GeoTIFF with any band count, PNG or JPEG; :data:`weakseg.data.folder.IMAGE_SUFFIXES`). Pixel values are
scaled by their stored type exactly as the folder dataset does (:func:`weakseg.data.folder.scale_by_dtype`), so
a backbone pretrained here sees the same numbers when its classifier is trained on a labelled folder of the same
images. No classes, labels or masks are read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from weakseg.data.folder import IMAGE_SUFFIXES, _index_folder, _read_any_nodata, scale_by_dtype
from weakseg.data.nodata import mark_invalid, scale_valid
from weakseg.data.normalization import BandStats
from weakseg.errors import DataError


class UnlabelledImageFolder:
    """Reader of a folder of unlabelled images: ``ids``, ``read_image(i)``, ``source_path(i)``, ``restrict``.

    Raises:
        DataError: the folder does not exist or holds no image file.
    """

    split = "all"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} " + ("is a file, not a folder" if self.root.exists()
                                                              else "does not exist") + " (--datadir)")
        folder = self.root / "images" if (self.root / "images").is_dir() else self.root
        files = _index_folder(folder, IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{folder} holds no image ({', '.join(IMAGE_SUFFIXES)}): nothing to pretrain on")
        self.folder = folder
        self.ids = list(files)
        self._files = [files[i] for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def source_path(self, i: int) -> Path:
        return self._files[i]

    def restrict(self, indices: list[int]) -> None:
        self.ids = [self.ids[i] for i in indices]
        self._files = [self._files[i] for i in indices]

    def read_image(self, i: int) -> np.ndarray:
        """Scaled float32 (C, H, W), NaN in every band of a pixel without data."""
        return read_scaled_image(self._files[i])


def read_scaled_image(path: Path, rgb: bool = False) -> np.ndarray:
    """One image file as the folder dataset reads it: scaled float32 (C, H, W)
    (:func:`weakseg.data.folder.scale_by_dtype`), NaN in every band of a pixel without data. ``rgb`` converts a
    PNG / JPEG to 3 channels first (grey, palette or RGBA photos for an RGB model); GeoTIFFs keep their bands.

    Raises:
        DataError: naming the file, when it cannot be read.
    """
    if rgb and path.suffix.lower() not in (".tif", ".tiff"):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB")).transpose(2, 0, 1)  # (3, H, W) uint8
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}") from e
        return scale_by_dtype(arr)
    arr, nodata = _read_any_nodata(path)
    image, valid = scale_valid(arr, nodata, scale_by_dtype, path)
    return mark_invalid(image, valid)


def check_readable(reader: object, message_root: str | Path, stats: BandStats | None = None,
                   ) -> tuple[list[int], list[tuple[str, str, str]]]:
    """Read every tile of ``reader`` once: (indices usable, [(id, file, reason)] skipped).

    A tile is skipped when it cannot be read (:class:`DataError`), has no valid pixel, or has another band count
    than the first readable tile. ``stats``, when given, collects the band statistics of the usable tiles in
    the same pass.

    Raises:
        DataError: no tile can be read, naming the folder and the first reasons.
    """
    usable: list[int] = []
    skipped: list[tuple[str, str, str]] = []
    bands: tuple[int, str] | None = None
    for i in range(len(reader)):  # type: ignore[arg-type]
        tile, path = reader.ids[i], str(reader.source_path(i))  # type: ignore[attr-defined]
        try:
            image = reader.read_image(i)  # type: ignore[attr-defined]
        except DataError as e:
            skipped.append((tile, path, str(e)))
            continue
        if not np.isfinite(image).all(axis=0).any():
            skipped.append((tile, path, "no valid pixel"))
            continue
        if bands is None:
            bands = (int(image.shape[0]), path)
        elif image.shape[0] != bands[0]:
            skipped.append((tile, path, f"{image.shape[0]} bands, expected {bands[0]} like {bands[1]}"))
            continue
        usable.append(i)
        if stats is not None:
            stats.add(image)
    if not usable:
        reasons = "; ".join(f"{p}: {r}" for _, p, r in skipped[:5])
        raise DataError(f"no readable image in {message_root} ({len(skipped)} file(s) tried): {reasons}")
    return usable, skipped
