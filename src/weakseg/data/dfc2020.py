"""Reader for the IEEE GRSS Data Fusion Contest 2020 (DFC2020) Sentinel-1/2 land-cover dataset.

Schmitt, Hughes, Ghamisi, Yokoya, Haensch, "IEEE GRSS Data Fusion Contest 2020", IEEE DataPort,
doi:10.21227/rha7-m332 (CC-BY). Layout, dtypes and the 8-class remap follow ``datasets.md`` of the project
reference:

    ROIs0000_validation/{s1,s2,dfc}_validation/ROIs0000_validation_{s1,s2,dfc}_0_p{N}.tif
    ROIs0000_test/{s1,s2,dfc}_0/ROIs0000_test_{s1,s2,dfc}_0_p{N}.tif

Both spellings of the sensor folders (``s2_validation`` and ``s2_0``) are accepted, and the split folder is
located below ``root`` whatever wrapping folders the download added (``__MACOSX`` is skipped). The geotransform
is never used for reading (some distributed copies have none).

Scaling (the project default, ``datasets.md`` section 2; the paper's per-image maximum is a normalisation option
in :mod:`weakseg.data.normalization`): S1 dB clipped to [-25, 0] then ``(x + 25) / 25``; S2 clipped to
[0, 10000] then ``/ 10000``. The image is the 13 S2 bands, then (``s1s2``) the 2 S1 bands.

No data (:mod:`weakseg.data.nodata`): a pixel is valid when every band of S2 (and, for ``s1s2``, of S1) is
finite and differs from its band's GeoTIFF nodata tag; both are decided on the values *as read*, before clipping
(clipping would turn +inf into 1.0, the clip maximum, and keep it as a bright pixel). ``read_image`` holds NaN in
every band of an invalid pixel; NaN/inf values get a warning that names the file. A tile with no valid pixel is
a :class:`~weakseg.errors.DataError` naming the file (training skips it with that reason).

Plain GeoTIFFs without a georeference (some distributed copies) are read without rasterio's
``NotGeoreferencedWarning``: the reader never uses the georeference, so the warning would only be noise.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from weakseg.data.base import TileDataset, Transform
from weakseg.data.classes import DFC_CLASS_COLORS, DFC_CLASS_NAMES, remap_dfc
from weakseg.data.nodata import mark_invalid, scale_valid
from weakseg.errors import DataError

log = logging.getLogger(__name__)

Modality = Literal["s2", "s1s2"]
S1_CLIP = (-25.0, 0.0)
S2_CLIP = (0.0, 10000.0)
_PATCH_RE = re.compile(r"^(?P<prefix>.+)_s2_(?P<scene>\d+)_p(?P<num>\d+)\.tiff?$")


def read_raster(path: Path, expected_bands: int | None = None) -> np.ndarray:
    """Read a raster as (C, H, W), turning every failure into a :class:`DataError` that names the file."""
    return read_raster_nodata(path, expected_bands)[0]


def read_raster_nodata(
    path: Path, expected_bands: int | None = None
) -> tuple[np.ndarray, tuple[float | None, ...]]:
    """(values (C, H, W) as stored, the nodata tag of each band or None), failures as :class:`DataError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                arr = src.read()
                nodata = tuple(src.nodatavals)
    except (RasterioError, OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if expected_bands is not None and arr.shape[0] != expected_bands:
        raise DataError(f"{path} has {arr.shape[0]} bands, expected {expected_bands}")
    return arr, nodata


def scale_s1(s1: np.ndarray) -> np.ndarray:
    """S1 sigma0 in dB -> [0, 1]: clip to [-25, 0] dB, then (x + 25) / 25."""
    return ((np.clip(s1, *S1_CLIP) - S1_CLIP[0]) / (S1_CLIP[1] - S1_CLIP[0])).astype(np.float32)


def scale_s2(s2: np.ndarray) -> np.ndarray:
    """S2 reflectance x 10000 -> [0, 1]: clip to [0, 10000], then / 10000."""
    return (np.clip(s2.astype(np.float32), *S2_CLIP) / S2_CLIP[1]).astype(np.float32)


def find_split_root(root: Path, split: str) -> Path:
    """Locate the folder of ``split`` below ``root``.

    A folder named ``<anything>_<split>`` (``ROIs0000_validation``) or ``<split>`` that holds an s2 folder wins;
    otherwise any folder holding ``s2_<split>``. The scene-id spelling ``s2_0`` is accepted only inside a folder
    named for the split, so ``validation`` can never resolve to the test split's ``s2_0``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} " + ("is a file, not a folder" if root.exists() else "does not exist") + " (--datadir)")
    s2_names = _sensor_folder_names("s2", split)
    candidates = [root] + [p for p in sorted(root.rglob("*")) if p.is_dir() and "__MACOSX" not in p.parts]
    candidates = [c for c in candidates if len(c.relative_to(root).parts) <= 3]
    named = [c for c in candidates if c.name == split or c.name.endswith(f"_{split}")]
    for cand in named:
        if any((cand / n).is_dir() for n in s2_names):
            return cand
    for cand in candidates:
        if (cand / f"s2_{split}").is_dir():
            return cand
    raise DataError(
        f"no DFC2020 '{split}' split below {root}: expected a folder ROIs0000_{split}/ with one of "
        f"{', '.join(s2_names)} inside (official DFC2020 layout)"
    )


def _sensor_folder_names(sensor: str, split: str) -> list[str]:
    names = [f"{sensor}_{split}", f"{sensor}_0"]
    return list(dict.fromkeys(names))


class DFC2020Dataset(TileDataset):
    """DFC2020 tiles as dict samples ``{'image', 'mask', 'label', 'id'}``.

    ``read_image`` gives 13 scaled S2 bands, then the 2 S1 bands for ``modality='s1s2'``; ``read_mask`` the
    8-class ids with 255 = ignore (no data, Savanna, Snow/Ice).

    Args:
        root: folder that holds (possibly below wrapping folders) ``ROIs0000_<split>``.
        split: "validation" (986 tiles) or "test" (5,128 tiles), or another split folder name.
        modality: "s2" (13 channels) or "s1s2" (S2 then S1: 15 channels).
        transform, label_threshold, cache: see :class:`~weakseg.data.base.TileDataset`.
    """

    class_names = DFC_CLASS_NAMES
    class_colors = DFC_CLASS_COLORS
    has_masks = True

    def __init__(
        self,
        root: str | Path,
        split: str = "validation",
        modality: Modality = "s2",
        transform: Transform | None = None,
        label_threshold: float = 0.10,
        cache: bool = False,
    ) -> None:
        if modality not in ("s2", "s1s2"):
            raise DataError(f"modality must be 's2' or 's1s2', got {modality!r}")
        super().__init__(transform, label_threshold, cache)
        self.root = Path(root)
        self.split = split
        self.modality = modality
        self.split_root = find_split_root(self.root, split)
        self.s2_dir = self._sensor_dir("s2")
        self.dfc_dir = self._sensor_dir("dfc")
        self.s1_dir = self._sensor_dir("s1") if modality == "s1s2" else None
        # S2 file names, not Path objects: a Path with its parts and cached string is ~0.7 kB that a reader keeps
        # for the whole run, per tile (traced in benchmarks/memory_scale.py's pseudomasks); a name is ~0.1 kB.
        self._s2_names = self._list_s2_names()
        self.ids = [self._tile_id(name) for name in self._s2_names]

    # ---- discovery ------------------------------------------------------------------------------------
    def _sensor_dir(self, sensor: str) -> Path:
        for name in _sensor_folder_names(sensor, self.split):
            if (self.split_root / name).is_dir():
                return self.split_root / name
        raise DataError(
            f"{self.split_root} has no {sensor} folder (expected one of "
            f"{', '.join(_sensor_folder_names(sensor, self.split))})"
        )

    def _list_s2_names(self) -> list[str]:
        files = []
        for p in self.s2_dir.iterdir():
            m = _PATCH_RE.match(p.name)
            if m:
                files.append((int(m["num"]), p.name))
            elif p.suffix.lower() in (".tif", ".tiff"):
                raise DataError(
                    f"{p} does not follow the DFC2020 naming <season>_s2_<scene>_p<N>.tif "
                    "(e.g. ROIs0000_validation_s2_0_p0.tif)"
                )
        if not files:
            raise DataError(f"{self.s2_dir} holds no S2 tiles (*_s2_*_p<N>.tif): the split is empty")
        return [name for _, name in sorted(files)]

    @staticmethod
    def _tile_id(s2_name: str) -> str:
        m = _PATCH_RE.match(s2_name)
        assert m is not None
        return f"{m['prefix']}_p{m['num']}"

    def _paired(self, s2_path: Path, sensor: str, folder: Path) -> Path:
        path = folder / s2_path.name.replace("_s2_", f"_{sensor}_")
        if not path.is_file():
            raise DataError(f"{path} is missing (the {sensor} file paired with {s2_path})")
        return path

    def _restrict_files(self, indices: list[int]) -> None:
        self._s2_names = [self._s2_names[i] for i in indices]

    # ---- reading --------------------------------------------------------------------------------------
    def source_path(self, i: int) -> Path:
        """The S2 file of tile ``i``: outputs copy its georeference."""
        return self.s2_dir / self._s2_names[i]

    def mask_path(self, i: int) -> Path:
        return self._paired(self.source_path(i), "dfc", self.dfc_dir)

    def _image_files(self, i: int) -> list[Path]:
        s2_path = self.source_path(i)
        return [s2_path] if self.s1_dir is None else [s2_path, self._paired(s2_path, "s1", self.s1_dir)]

    def _read_image(self, i: int) -> np.ndarray:
        """Scaled S2 (then S1), NaN in every band of a pixel invalid in either file (module docstring)."""
        s2_path = self.source_path(i)
        s2, valid = scale_valid(*read_raster_nodata(s2_path, 13), scale_s2, s2_path)  # (13, H, W), (H, W)
        if self.s1_dir is None:
            return mark_invalid(s2, valid)
        s1_path = self._paired(s2_path, "s1", self.s1_dir)
        s1, valid_s1 = scale_valid(*read_raster_nodata(s1_path, 2), scale_s1, s1_path)  # (2, H, W), (H, W)
        if s1.shape[1:] != s2.shape[1:]:
            raise DataError(f"{s1_path} is {s1.shape[1]}x{s1.shape[2]} but {s2_path} is {s2.shape[1]}x{s2.shape[2]}")
        valid &= valid_s1
        if not valid.any():
            raise DataError(f"{s2_path} and {s1_path} have no pixel valid in both (each is NaN/inf or nodata where "
                            "the other has a value): the tile cannot be used")
        return mark_invalid(np.concatenate([s2, s1], axis=0), valid)

    def _read_mask(self, i: int) -> np.ndarray:
        return remap_dfc(read_raster(self.mask_path(i), 1)[0])
