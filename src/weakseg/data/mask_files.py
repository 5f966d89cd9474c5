"""Mask and confidence files: how every stage stores per-tile label images.

A mask folder holds one ``<id>.tif`` per tile: single-band ``uint8`` class ids, 255 = unlabelled, written as a
GeoTIFF with the source tile's CRS and transform when it has them (the masks open in GIS tools over the imagery).

Beside it, ``confidence/<id>.tif`` holds the method's per-pixel confidence in [0, 1], stored as ``uint8``
``round(255 * confidence)`` (enough for a threshold; 4x smaller than float32 on the real DFC2020). Refinement
reads it to ignore the least confident pixels (:mod:`weakseg.pipeline.refine`).

Every file is complete or absent. GDAL does not report a failed write (on a full disk it prints
``_tiffSeekProc: No space left on device`` and returns, leaving a 0-byte file), so GDAL only encodes the GeoTIFF
into memory; the bytes are written, checked and renamed into place by :func:`weakseg.io.atomic_write_bytes`, which
raises on any failure. The writers return the file's :class:`~weakseg.io.FileRecord` (size, sha256), which
``weakseg pseudomasks`` stores in its manifest and checks before it counts a tile as done.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import MemoryFile

from weakseg.data.classes import IGNORE_INDEX
from weakseg.errors import DataError, WeaksegError
from weakseg.io import FileRecord, atomic_write_bytes

#: Sub-folder of a mask folder that holds the confidence maps.
CONFIDENCE_DIR = "confidence"


#: The first bytes of a TIFF (little / big endian) and a BigTIFF: what an encoded GeoTIFF must start with.
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def encode_uint8_geotiff(array: np.ndarray, source: Path | None, nodata: int | None) -> bytes:
    """A single-band uint8 GeoTIFF (deflate) of ``array`` in memory, georeferenced like ``source`` when it can be.

    The georeference is copied when ``source`` is a GeoTIFF with a CRS and the same height and width.
    """
    profile: dict[str, Any] = dict(driver="GTiff", height=array.shape[0], width=array.shape[1], count=1,
                                   dtype="uint8", compress="deflate")
    if nodata is not None:
        profile["nodata"] = nodata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # plain PNG/TIFF sources have no georeference
        if source is not None and source.suffix.lower() in (".tif", ".tiff"):
            with rasterio.open(source) as src:
                if src.crs is not None and (src.height, src.width) == array.shape:
                    profile.update(crs=src.crs, transform=src.transform)
        with MemoryFile() as mem:
            with mem.open(**profile) as dst:
                dst.write(array[None])
            data = bytes(mem.getbuffer())
    if not data.startswith(_TIFF_MAGIC):
        raise WeaksegError(f"GDAL produced no GeoTIFF ({len(data)} bytes) for an array of shape {array.shape}")
    return data


def _write_uint8_geotiff(path: Path, array: np.ndarray, source: Path | None, nodata: int | None) -> FileRecord:
    try:
        data = encode_uint8_geotiff(array, source, nodata)
    except (RasterioError, OSError) as e:  # the source's georeference could not be read
        raise WeaksegError(f"cannot write {path}: {e}") from e
    return atomic_write_bytes(path, data)


def write_mask_geotiff(path: Path, mask: np.ndarray, source: Path | None) -> FileRecord:
    """Single-band uint8 GeoTIFF (255 = unlabelled) with the source's CRS and transform when it has them.

    Returns:
        Size and sha256 of the file written (see the module docstring).

    Raises:
        WeaksegError: the file cannot be written (disk full, permissions, ...); the message names it.
    """
    return _write_uint8_geotiff(Path(path), np.asarray(mask, dtype=np.uint8), source, IGNORE_INDEX)


def confidence_path(mask_dir: Path, tile_id: str) -> Path:
    """Where the confidence of tile ``tile_id`` of mask folder ``mask_dir`` lives."""
    return Path(mask_dir) / CONFIDENCE_DIR / f"{tile_id}.tif"


def write_confidence_geotiff(path: Path, confidence: np.ndarray, source: Path | None) -> FileRecord:
    """Confidence in [0, 1] as uint8 ``round(255 * c)``, georeferenced and written like :func:`write_mask_geotiff`."""
    quantised = np.rint(np.clip(np.asarray(confidence, dtype=np.float32), 0.0, 1.0) * 255).astype(np.uint8)
    return _write_uint8_geotiff(Path(path), quantised, source, None)


def read_confidence(path: Path) -> np.ndarray:
    """A confidence file as float32 (H, W) in [0, 1].

    Raises:
        DataError: the file cannot be read or is not a single uint8 band.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                if src.count != 1 or src.dtypes[0] != "uint8":
                    raise DataError(f"confidence file {path} must be one uint8 band, got {src.count} x {src.dtypes[0]}")
                values = src.read(1)
    except (RasterioError, OSError) as e:
        raise DataError(f"cannot read confidence file {path}: {e}") from e
    return values.astype(np.float32) / 255.0
