"""No-data: which pixels of an image hold a measurement, and what happens to the others.

**Valid pixel.** A pixel is valid when *every* band of the image has a value there: the value as stored is finite
(not NaN, +inf, -inf) and differs from its band's GeoTIFF nodata tag (rasterio ``nodatavals``, per band, so a file
may tag some bands only). One pixel-level notion serves everything, because the model sees all bands of a pixel
at once: a pixel with one made-up band is made-up input. For Sentinel-1 + Sentinel-2 the S1 and S2 validity are
combined the same way (a pixel must be valid in both files).

**How it travels.** A reader's ``read_image`` returns the scaled image with NaN in every band of an invalid pixel.
The validity then moves with the image through caching, crops and flips without a second array to keep aligned,
and a consumer that forgets it sees NaN at once instead of silently using a number: the old reader wrote 0 there,
which for Sentinel-1 in dB is a bright, valid-looking value that entered the band statistics. The sample dict adds
``valid`` (H, W) bool at the resolution of ``mask`` (:meth:`weakseg.data.base.TileDataset.__getitem__`).

**What uses it.**

- Normalisation statistics (per-band mean / std of ``standardize``, the per-image maximum) count valid pixels
  only (:mod:`weakseg.data.normalization`).
- After normalisation the invalid pixels are filled with a neutral value: 0 for ``standardize`` (the training
  band mean), the image's own band mean over its valid pixels for ``none`` and ``per_image_max`` (they have no
  training statistics; a fixed 0 would be the darkest value there, or 0 dB for raw Sentinel-1).
- Targets: an invalid pixel is 255 (ignore) in the sample's mask, so it is neither trained on nor scored, and the
  >= 10 % image-label rule divides by the number of *valid* pixels (:func:`weakseg.data.base.multi_hot_from_mask`).
  Evaluation reads the ground truth the same way (:meth:`weakseg.data.base.TileDataset.read_target`), and
  pseudomasks write 255 (unlabelled, confidence 0) there.
- A tile with no valid pixel cannot be used: the reader raises :class:`~weakseg.errors.DataError` naming the file.
  Training skips such tiles with the reason (:meth:`weakseg.data.datamodule.WeakSegDataModule.screen_tiles`), the
  pseudomask stage writes a ``skipped`` manifest row.

**Why NaN/inf are found in the values as stored**, before clipping or scaling: clipping would turn +inf into the
clip maximum (1.0 after scaling) and keep it as a bright pixel. **Why a nodata tag is compared in the band's own
type**: a float32 band stores its nodata value rounded to float32 (GDAL compares the same way); an integer band
cannot hold a fractional or out-of-range tag, so no pixel matches it.

NaN/inf values get a warning naming the file (once per file and process: a tile is read every epoch); values
equal to a declared nodata tag do not, since the tag says they are expected.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from rasterio.errors import NotGeoreferencedWarning

from weakseg.errors import DataError

log = logging.getLogger(__name__)

Nodata = Sequence[float | None]
#: Files whose NaN/inf warning was given in this process.
_WARNED: set[str] = set()


def nodata_in_dtype(value: float | None, dtype: np.dtype) -> np.generic | None:
    """The nodata tag as a value of ``dtype``, or None when no pixel of that type can equal it.

    None for no tag and for NaN (NaN is caught by the finite test); integer types: None for a fractional or
    out-of-range tag.
    """
    if value is None or np.isnan(value):
        return None
    dtype = np.dtype(dtype)
    if dtype.kind in "fc":
        with np.errstate(over="ignore"):
            return np.asarray(value).astype(dtype)[()]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if float(value).is_integer() and info.min <= value <= info.max:
            return dtype.type(int(value))
        return None
    return None


def valid_values(raw: np.ndarray, nodata: Nodata | None = None) -> np.ndarray:
    """(C, H, W) bool: each stored value is finite and not its band's nodata tag.

    Args:
        raw: (C, H, W) values as stored in the file.
        nodata: one tag per band (None: no tag), as rasterio's ``nodatavals``.
    """
    valid = np.isfinite(raw) if raw.dtype.kind in "fc" else np.ones(raw.shape, dtype=bool)
    for band, value in enumerate(nodata or ()):
        tag = nodata_in_dtype(value, raw.dtype)
        if tag is not None and band < raw.shape[0]:
            valid[band] &= raw[band] != tag
    return valid


def scale_valid(
    raw: np.ndarray, nodata: Nodata | None, scale: Callable[[np.ndarray], np.ndarray], path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """``scale(raw)`` and its pixel validity, checked: a file with no valid pixel is a :class:`DataError`.

    Args:
        raw: (C, H, W) values as stored.
        nodata: per-band nodata tags (rasterio ``nodatavals``).
        scale: the reader's fixed scaling of the stored values (float32 out).
        path: the file, for the warning and the error.

    Returns:
        (scaled (C, H, W) float32, unmasked; valid (H, W) bool: every band valid).
    """
    values_ok = valid_values(raw, nodata)  # (C, H, W)
    finite = np.isfinite(raw) if raw.dtype.kind in "fc" else None
    if finite is not None and not finite.all():
        if not finite.any():
            raise DataError(f"{path} has no finite pixel (all NaN/inf): the tile cannot be used")
        if str(path) not in _WARNED:
            _WARNED.add(str(path))
            log.warning("%s: %.1f%% of the values are NaN/inf; their pixels are treated as no data (left out of "
                        "the statistics, ignored in targets)", path, 100 * (1.0 - finite.mean()))
    valid = values_ok.all(axis=0)  # (H, W)
    if not valid.any():
        tags = sorted({str(v) for v in (nodata or ()) if v is not None})
        raise DataError(
            f"{path} has no valid pixel: every pixel is NaN/inf or the nodata value ({', '.join(tags) or 'none'}) "
            "in at least one band; the tile cannot be used"
        )
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = scale(raw).astype(np.float32, copy=False)
    return scaled, valid


def mark_invalid(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``image`` (C, H, W) float32 with NaN in every band of the pixels where ``valid`` (H, W) is False."""
    if valid.all():
        return image
    return np.where(valid[None], image, np.float32(np.nan)).astype(np.float32, copy=False)


def pixel_validity(image: np.ndarray) -> np.ndarray:
    """(H, W) bool validity of a reader's image (C, H, W): no NaN/inf in any band."""
    return np.isfinite(image).all(axis=0)


def finite_entries(image: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite(image)`` (a bool tensor of ``image``'s shape), computed by numpy for a CPU tensor.

    Why: the sample transforms check every training crop for no data, and the CPU build of torch this project
    pins computes ``isfinite`` about 20x slower than numpy (13 x 64 x 64 float32: 97 vs 5 us; 13 x 256 x 256:
    1.5 ms vs 72 us, ``benchmarks/data.py``); per sample that was a quarter of the data time. The numpy result
    is shared with torch without a copy. A tensor on a GPU, or one that needs its autograd graph, stays on torch.
    """
    if image.device.type != "cpu" or image.requires_grad or image.dtype in (torch.bfloat16, torch.complex32):
        return torch.isfinite(image)
    return torch.from_numpy(np.isfinite(image.numpy()))


def all_true(flags: torch.Tensor) -> bool:
    """``bool(flags.all())`` of a bool tensor, by numpy on the CPU (4 vs 15 us a 64 x 64 crop, as above)."""
    return bool(flags.numpy().all() if flags.device.type == "cpu" else flags.all())


def raster_may_hold_invalid(path: Path) -> bool:
    """Whether a GeoTIFF can hold invalid values (a float band or a nodata tag), from its header only.

    Lets evaluation skip reading the pixels of integer images without a tag (Sentinel-2 uint16, PNG masks' RGB
    images), which are valid everywhere. Unreadable: True (the pixel read then reports the problem).
    """
    if path.suffix.lower() not in (".tif", ".tiff"):
        return False  # PNG / JPEG: integer values, no nodata tag
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return any(np.dtype(d).kind in "fc" for d in src.dtypes) or any(
                    v is not None for v in src.nodatavals
                )
    except (RasterioError, OSError, ValueError):
        return True


def unlabel_invalid(
    mask: np.ndarray, confidence: np.ndarray | None, valid: object
) -> tuple[np.ndarray, np.ndarray | None]:
    """A written mask (H, W) with 255 (unlabelled) and confidence 0 where the image has no data.

    Args:
        mask: (H, W) class ids; confidence: (H, W) in [0, 1] or None.
        valid: (H, W) bool (a tensor or array) of the pixels with data; None: every pixel.
    """
    mask = np.asarray(mask, dtype=np.uint8)
    if valid is None:
        return mask, confidence
    ok = np.asarray(valid.cpu() if hasattr(valid, "cpu") else valid, dtype=bool)  # (H, W)
    if ok.shape != mask.shape or ok.all():
        return mask, confidence
    mask = np.where(ok, mask, np.uint8(255)).astype(np.uint8)
    if confidence is not None:
        confidence = np.where(ok, confidence, 0.0).astype(np.asarray(confidence).dtype)
    return mask, confidence
