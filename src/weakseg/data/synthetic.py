"""Built-in synthetic Sentinel-1/2 land-cover dataset in the official DFC2020 layout.

The generator writes GeoTIFFs that the real DFC2020 reader reads unchanged (``datasets.md`` sections
1.2-1.4)::

    root/ROIs0000_validation/{s1,s2,dfc}_validation/ROIs0000_validation_{s1,s2,dfc}_0_p{N}.tif
    root/ROIs0000_test/{s1,s2,dfc}_0/ROIs0000_test_{s1,s2,dfc}_0_p{N}.tif
    root/synthetic_dfc2020.json        (parameters, counts, class pixel frequencies, generator version)

S1 is float64 sigma0 in dB (VV, VH), S2 is uint16 L1C-style top-of-atmosphere reflectance x 10000 in the 13
bands of :data:`weakseg.data.classes.S2_BANDS` (B10 included), dfc is int32 with DFC ids (1, 2, 4, 5, 6, 7, 9,
10 via :data:`weakseg.data.classes.TRAIN_ID_TO_DFC`) and 0 = no data on a few tiles. Tiles are georeferenced
in EPSG:32632 (UTM 32N) with 10 m pixels, each at its own offset, so pseudomasks written later can copy a real
georeference.

**Design.** The aim is a dataset on which weakly supervised segmentation is *possible but not trivial*, with
no knob turned towards any method:

1. *Layout.* Each tile draws 1-4 classes from a non-uniform prior (:data:`CLASS_PRIOR`). Regions are the
   argmax of smooth Gaussian random fields (a random correlation length per tile gives region sizes from a few
   pixels to the whole tile) plus fine-scale noise for ragged boundaries. Croplands are snapped to a randomly
   rotated grid of rectangular fields, Urban to a finer grid of blocks separated by streets, and Water is
   drawn on half of its tiles as a curvy river band instead of a blob. Classes covering less than
   :data:`MIN_CLASS_FRACTION` of the labelled pixels are merged into their neighbours (nearest-pixel fill), so
   every label in a file is visible in its image.
2. *Sentinel-2.* Each pixel is a linear mixture (the standard linear spectral mixture model) of endmember
   surface reflectance spectra (:data:`ENDMEMBER_REFLECTANCE`). Each class has Dirichlet concentrations over
   endmembers (:data:`CLASS_ENDMEMBER_ALPHA`); one mixture is drawn per segment (field, block, connected
   region) and perturbed per pixel by a smooth log-normal field. Shrubland, Grassland and Croplands mix the
   same green-vegetation, dry-grass and soil endmembers in different proportions, so their means are close and
   their spreads overlap (their cues are spatial shape and context, as in the real data). The surface is then
   turned into top-of-atmosphere reflectance like DFC2020's L1C data: a per-tile illumination factor, additive
   path reflectance (strongest in B01/B02, calibrated on the real validation tile p0: its forest has B01 about
   1000 over a surface near 250), band transmittance (B09 water-vapour and B10 cirrus absorption), haze/thin
   cloud on some tiles (seen in B10 as well), a box blur of the 20 m and 60 m bands (they are resampled to
   10 m in DFC2020), and additive sensor noise.
3. *Sentinel-1.* sigma0 per class (:data:`CLASS_S1_DB`), per-segment offsets (field phenology, wind on water,
   block orientation), a smooth per-tile relief term, strong multiplicative texture on Urban (bright point
   scatterers), a damping by the water fraction of the S2 mixture (flooded wetland), a noise floor, and fully
   developed speckle: sigma0 (linear) times Gamma(L, 1/L) with L = 4.4 looks, then 10 log10. Radar does not
   see the haze.

Every tile draws from its own ``numpy.random.Generator`` seeded by ``(seed, split, tile index)``: the same
seed gives byte-identical files, and changing a split's tile count does not change the other tiles.

**Where the numbers come from.** They are rounded, typical values, not measurements of a particular scene:

- Endmember spectra: typical curves of green leaves/canopies (chlorophyll absorption in B04, red edge B05-B07,
  NIR plateau B08/B8A near 0.3-0.45, water absorption lowering B11/B12), senescent grass, loamy and sandy
  soils (reflectance rising from visible to SWIR), concrete, asphalt, tile roofs and clear/turbid water (low
  everywhere, near zero beyond 800 nm), as shown in the textbook curves of Lillesand, Kiefer & Chipman,
  *Remote Sensing and Image Interpretation* (7th ed., 2015, ch. 1.6) and in the USGS Spectral Library
  Version 7 (Kokaly et al., 2017, USGS Data Series 1035) and the ECOSTRESS spectral library (Meerdink et
  al., 2019, *Remote Sensing of Environment* 230:111196); read off by eye at the Sentinel-2 band centres (ESA
  Sentinel-2 User Handbook), not convolved with the spectral response functions.
- Sentinel-1: C-band sigma0 of forest about -7 to -8 dB VV and -12 to -14 dB VH (volume scattering), grass and
  crops -9 to -12 dB VV and -15 to -18 dB VH, bare soil -12 to -18 dB VV depending on roughness and moisture,
  urban around -5 dB VV and brighter (double bounce), calm water below -18 dB VV and at the noise floor in VH
  (specular reflection): Ulaby & Dobson, *Handbook of Radar Scattering Statistics for Terrain* (1989) and
  Ulaby & Long, *Microwave Radar and Radiometric Remote Sensing* (2014), textbook values. Noise-equivalent
  sigma0 of IW mode about -22 dB and 4.4 equivalent looks for IW GRD high-resolution products: ESA Sentinel-1
  User Handbook / Product Definition. The real DFC2020 validation tile p0 (the
  Minerva test fixture, ``datasets.md`` section 5) has class means of about -9 to -15 dB VV and -15 to -20 dB
  VH with 3-6 dB standard deviations, which these values reproduce after speckle.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine
from scipy import ndimage

from weakseg.data.classes import DFC_CLASS_NAMES, NUM_DFC_CLASSES, S1_BANDS, S2_BANDS, TRAIN_ID_TO_DFC
from weakseg.errors import ConfigError, DataError
from weakseg.io import atomic_path, atomic_write_json

#: Bump whenever the same parameters would produce other files; stored in the metadata, compared on re-runs.
GENERATOR_VERSION = 1
METADATA_FILE = "synthetic_dfc2020.json"
DEFAULT_NUM_TILES: dict[str, int] = {"validation": 256, "test": 64}
SPLITS = ("validation", "test")
MIN_TILE_SIZE = 16

#: Classes covering less than this fraction of a tile's labelled pixels are merged into their neighbours.
MIN_CLASS_FRACTION = 0.02
#: Probability that a tile has a no-data (DFC id 0) strip along one edge, to exercise the ignore path.
NODATA_TILE_PROBABILITY = 0.08
#: Probability of haze / thin cloud on a tile.
HAZE_TILE_PROBABILITY = 0.12

CRS_EPSG = 32632  # UTM zone 32N: central Europe, where the coordinates below are plausible.
PIXEL_SIZE_M = 10.0
_ORIGIN_EASTING = 300_000.0
_ORIGIN_NORTHING = {"validation": 5_400_000.0, "test": 5_000_000.0}
_TILES_PER_ROW = 64

# Class ids (8-class space, weakseg.data.classes.DFC_CLASS_NAMES order).
FOREST, SHRUBLAND, GRASSLAND, WETLANDS, CROPLANDS, URBAN, BARREN, WATER = range(NUM_DFC_CLASSES)

#: How often a class is drawn into a tile (not uniform; roughly the ordering of DFC2020's label frequencies).
CLASS_PRIOR = np.array([0.20, 0.10, 0.18, 0.05, 0.18, 0.10, 0.07, 0.12])
#: Probability of 1, 2, 3 or 4 classes in a tile (before tiny regions are merged away).
NUM_CLASSES_PROBABILITY = np.array([0.15, 0.35, 0.30, 0.20])

# ----------------------------------------------------------------------------------------------------------
# Sentinel-2: endmember surface reflectance (0..1) at the 13 band centres
#   B01 443, B02 492, B03 560, B04 665, B05 704, B06 740, B07 783, B08 833, B8A 865, B09 945, B10 1374,
#   B11 1614, B12 2202 nm. B10's surface value is mostly absorbed by the atmosphere (see _S2_TRANSMITTANCE).
# ----------------------------------------------------------------------------------------------------------
ENDMEMBER_NAMES: tuple[str, ...] = (
    "broadleaf_canopy",
    "conifer_canopy",
    "shrub_canopy",
    "green_herbaceous",
    "dry_grass",
    "loam_soil",
    "wet_dark_soil",
    "bright_sand",
    "dark_rock",
    "concrete",
    "asphalt",
    "tile_roof",
    "clear_water",
    "turbid_water",
)
#: (endmember, band) surface reflectance. Sources: see the module docstring.
# fmt: off
ENDMEMBER_REFLECTANCE = (
    np.array(
        [
            # B01 B02  B03  B04  B05  B06  B07  B08  B8A  B09  B10  B11  B12   (reflectance x 1000)
            [ 30,  35,  70,  40, 110, 300, 380, 410, 420, 410, 210, 210, 100],  # broadleaf
            [ 20,  25,  45,  25,  60, 160, 200, 220, 230, 220, 110, 110,  50],  # conifer
            [ 30,  40,  65,  50, 100, 220, 270, 290, 300, 290, 220, 220, 120],  # shrub
            [ 30,  40,  80,  45, 130, 300, 370, 400, 410, 400, 240, 240, 120],  # green herbaceous
            [ 50,  70, 110, 140, 190, 230, 260, 280, 290, 290, 360, 360, 250],  # dry grass
            [ 70,  90, 130, 180, 210, 230, 250, 260, 270, 270, 340, 340, 280],  # loam soil
            [ 40,  50,  70,  90, 110, 120, 130, 140, 150, 150, 170, 170, 130],  # wet dark soil
            [140, 180, 250, 310, 340, 360, 380, 390, 400, 400, 480, 480, 420],  # bright sand
            [ 80,  90, 100, 110, 120, 130, 140, 140, 150, 150, 180, 180, 160],  # dark rock
            [180, 200, 230, 240, 250, 260, 270, 270, 280, 280, 300, 300, 270],  # concrete
            [ 50,  60,  65,  70,  75,  80,  85,  90,  90,  90, 100, 100,  90],  # asphalt
            [ 60,  70,  90, 200, 250, 280, 300, 310, 320, 320, 380, 380, 300],  # tile roof
            [ 50,  50,  40,  25,  15,   8,   6,   5,   4,   4,   2,   2,   1],  # clear water
            [ 70,  80, 100,  90,  70,  40,  30,  25,  20,  20,   6,   6,   3],  # turbid water
        ]
    )
    / 1000.0
)
# fmt: on

_EM = {name: i for i, name in enumerate(ENDMEMBER_NAMES)}
_WATER_ENDMEMBERS = [_EM["clear_water"], _EM["turbid_water"]]


def _alpha(**weights: float) -> np.ndarray:
    row = np.zeros(len(ENDMEMBER_NAMES))
    for name, weight in weights.items():
        row[_EM[name]] = weight
    return row


#: (class, endmember) Dirichlet concentration of the per-segment mixture. Shrubland / Grassland / Croplands
#: share green vegetation, dry grass and soil, so they are spectral look-alikes; Croplands' low concentrations
#: make fields differ strongly (bare, green, stubble), Forest mixes broadleaf and conifer stands.
CLASS_ENDMEMBER_ALPHA = np.stack(
    [
        _alpha(broadleaf_canopy=2.0, conifer_canopy=2.0),
        _alpha(shrub_canopy=2.5, loam_soil=1.5, dry_grass=1.0),
        _alpha(green_herbaceous=2.5, dry_grass=1.5, loam_soil=0.5),
        _alpha(green_herbaceous=2.0, clear_water=1.2, wet_dark_soil=1.0, turbid_water=0.3),
        _alpha(green_herbaceous=1.2, loam_soil=1.0, dry_grass=0.8, wet_dark_soil=0.3),
        _alpha(concrete=2.0, asphalt=2.0, tile_roof=1.0, green_herbaceous=0.8),
        _alpha(loam_soil=1.5, bright_sand=1.5, dark_rock=1.0),
        _alpha(clear_water=3.0, turbid_water=1.0),
    ]
)
#: (class, band) expected surface reflectance: the Dirichlet-mean mixture of the endmembers.
CLASS_S2_SURFACE_MEAN = (
    CLASS_ENDMEMBER_ALPHA / CLASS_ENDMEMBER_ALPHA.sum(1, keepdims=True)
) @ ENDMEMBER_REFLECTANCE

#: Per-pixel log-normal perturbation of the mixture fractions (spatially smooth), per class.
_CLASS_MIX_JITTER = np.array([0.35, 0.45, 0.40, 0.50, 0.30, 0.50, 0.40, 0.30])
#: Per-pixel multiplicative brightness texture (1 sigma), per class: canopy shadows, roof/street contrast.
_CLASS_TEXTURE = np.array([0.08, 0.06, 0.04, 0.05, 0.03, 0.15, 0.05, 0.02])
#: Per-segment brightness factor (log-normal sigma), per class.
_CLASS_SEGMENT_BRIGHTNESS = np.array([0.08, 0.10, 0.10, 0.10, 0.12, 0.12, 0.12, 0.10])

# L1C-style atmosphere: TOA = path + transmittance * illumination * surface. Path reflectance is calibrated
# on the real DFC2020 validation tile p0 (dark forest reads ~1000 in B01, ~740 in B02); B09 sits in a
# water-vapour band, B10 in a saturated absorption band (real tiles read ~10-20 there).
_S2_PATH_REFLECTANCE = np.array(
    [0.080, 0.050, 0.032, 0.022, 0.018, 0.012, 0.010, 0.008, 0.007, 0.004, 0.0008, 0.002, 0.001]
)
_S2_TRANSMITTANCE = np.array([0.75, 0.80, 0.85, 0.88, 0.88, 0.90, 0.90, 0.91, 0.92, 0.45, 0.002, 0.92, 0.88])
#: Relative haze brightening per band (bluish, visible in B10 for thin cirrus).
_S2_HAZE_SPECTRUM = np.array([1.00, 0.95, 0.90, 0.85, 0.80, 0.78, 0.75, 0.72, 0.70, 0.50, 0.30, 0.55, 0.45])
#: Additive sensor noise (reflectance units, 1 sigma) per band.
_S2_NOISE = np.array(
    [0.003, 0.002, 0.0015, 0.0015, 0.002, 0.0025, 0.0025, 0.0015, 0.003, 0.003, 0.0003, 0.002, 0.002]
)
#: 0-based indices of the bands recorded at 20 m and 60 m (blurred by the resampling to 10 m).
_S2_BANDS_20M = [S2_BANDS.index(b) for b in ("B05", "B06", "B07", "B8A", "B11", "B12")]
_S2_BANDS_60M = [S2_BANDS.index(b) for b in ("B01", "B09", "B10")]

# ----------------------------------------------------------------------------------------------------------
# Sentinel-1: sigma0 in dB, C band, ~30-45 deg incidence (IW). Sources: see the module docstring.
# ----------------------------------------------------------------------------------------------------------
#: (class, [VV, VH]) mean sigma0 in dB before the water-fraction damping and speckle.
CLASS_S1_DB = np.array(
    [
        [-7.5, -13.5],  # Forest: volume scattering, bright VH
        [-9.5, -16.0],  # Shrubland
        [-10.5, -17.0],  # Grassland
        [-7.5, -15.5],  # Wetlands: emergent vegetation over water (double bounce); water fraction damps it
        [-10.0, -16.5],  # Croplands: depends strongly on the field's crop stage (per-segment spread below)
        [-4.5, -11.5],  # Urban/Built-up: double bounce, point scatterers
        [-15.0, -23.0],  # Barren: smooth dry soil / sand
        [-21.0, -26.5],  # Water: specular; VH near the noise floor
    ]
)
#: Per-segment offset (dB, 1 sigma), per class: field phenology, wind roughening of water, block orientation.
_CLASS_S1_SEGMENT_SD = np.array([0.8, 1.2, 1.2, 2.0, 2.0, 2.0, 2.0, 2.5])
#: Per-pixel log-normal texture of linear sigma0 beyond speckle (urban point scatterers, canopy gaps).
_CLASS_S1_TEXTURE = np.array([0.25, 0.15, 0.10, 0.20, 0.10, 0.60, 0.15, 0.05])
#: dB added per unit water fraction of the S2 mixture on non-water classes (open water inside wetlands).
_S1_WATER_DAMPING_DB = -8.0
#: Residual noise floor (dB) after thermal-noise removal; IW NESZ is about -22 dB.
_S1_NOISE_FLOOR_DB = -25.0
#: Equivalent number of looks of IW GRD high-resolution products.
_S1_LOOKS = 4.4


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def split_paths(root: Path, split: str) -> dict[str, Path]:
    """Folders of the ``s1``, ``s2`` and ``dfc`` files of a split in the official DFC2020 layout.

    Validation folders end in ``_validation``, test folders in ``_0`` (``datasets.md`` section 1.2).
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    split_dir = Path(root) / f"ROIs0000_{split}"
    suffix = "validation" if split == "validation" else "0"
    return {sensor: split_dir / f"{sensor}_{suffix}" for sensor in ("s1", "s2", "dfc")}


def tile_path(root: Path, split: str, sensor: str, index: int) -> Path:
    """Path of one file, e.g. ``root/ROIs0000_test/s2_0/ROIs0000_test_s2_0_p7.tif``."""
    return split_paths(root, split)[sensor] / f"ROIs0000_{split}_{sensor}_0_p{index}.tif"


def generate_synthetic_dfc2020(
    root: Path,
    num_tiles: Mapping[str, int] | None = None,
    tile_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic Sentinel-1/2 land-cover dataset in the official DFC2020 layout under ``root``.

    Idempotent: if ``root`` already holds a complete dataset written with the same parameters and generator
    version, nothing is rewritten and its stored summary is returned. An interrupted run (metadata marked
    incomplete) or one with missing files is regenerated. Each file is written atomically
    (:func:`weakseg.io.atomic_path`), so a reader never sees a half-written tile.

    Args:
        root: dataset folder; created if missing.
        num_tiles: tiles per split, keys ``"validation"`` and ``"test"``; a missing key takes its default
            (:data:`DEFAULT_NUM_TILES`), 0 skips the split.
        tile_size: height and width of every tile in pixels (real DFC2020 tiles are 256).
        seed: master seed; tile ``i`` of a split uses ``numpy.random.default_rng([seed, split, i])``.
        overwrite: regenerate even if ``root`` holds a synthetic dataset with other parameters; tiles of the
            old dataset beyond the new counts are deleted.

    Returns:
        The summary also stored in ``root/synthetic_dfc2020.json``: generator version, seed, tile size, tile
        counts, CRS, pixel size, class names, and per split the class pixel counts and frequencies (over
        labelled pixels), the number of no-data pixels and of tiles with no data, and how many tiles contain
        each class.

    Raises:
        ConfigError: invalid ``num_tiles`` or ``tile_size``.
        DataError: ``root`` holds a synthetic dataset with other parameters (and ``overwrite`` is False), or
            DFC2020 files that this generator did not write (it never overwrites those).
    """
    root = Path(root)
    counts = _resolve_num_tiles(num_tiles)
    if not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size < MIN_TILE_SIZE:
        raise ConfigError(f"tile_size must be an integer >= {MIN_TILE_SIZE}, got {tile_size!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    params = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "tile_size": tile_size,
        "num_tiles": counts,
    }

    metadata_path = root / METADATA_FILE
    existing = _read_metadata(metadata_path) if metadata_path.exists() else None
    if existing is None:
        foreign = _existing_dfc_files(root)
        if foreign:
            raise DataError(
                f"{root} already holds DFC2020-layout files not written by the synthetic generator "
                f"(e.g. {foreign[0]}) and no {METADATA_FILE}; choose an empty folder"
            )
    else:
        old_params = {key: existing.get(key) for key in params}
        if old_params != params:
            if not overwrite:
                differences = ", ".join(
                    f"{key}: {old_params[key]!r} there, {params[key]!r} requested"
                    for key in params
                    if old_params[key] != params[key]
                )
                raise DataError(
                    f"{root} holds a synthetic DFC2020 dataset with other parameters ({differences}); "
                    "pass overwrite=True or choose another folder"
                )
        elif existing.get("complete") and not overwrite and _all_files_exist(root, counts):
            return existing

    atomic_write_json(metadata_path, {**params, "complete": False})
    _remove_stale_tiles(root, counts)
    summary: dict = {
        **params,
        "complete": True,
        "crs": f"EPSG:{CRS_EPSG}",
        "pixel_size_m": PIXEL_SIZE_M,
        "class_names": list(DFC_CLASS_NAMES),
        "dfc_ids": [int(i) for i in TRAIN_ID_TO_DFC],
        "splits": {},
    }
    crs = CRS.from_epsg(CRS_EPSG)
    for split_code, split in enumerate(SPLITS):
        if counts[split] == 0:
            continue
        for folder in split_paths(root, split).values():
            folder.mkdir(parents=True, exist_ok=True)
        class_pixels = np.zeros(NUM_DFC_CLASSES, dtype=np.int64)
        tiles_with_class = np.zeros(NUM_DFC_CLASSES, dtype=np.int64)
        nodata_pixels = 0
        nodata_tiles = 0
        for index in range(counts[split]):
            rng = np.random.default_rng([seed, split_code, index])
            s1_db, s2_dn, dfc = synthesize_tile(rng, tile_size)
            transform = _tile_transform(split, index, tile_size)
            _write_geotiff(tile_path(root, split, "s1", index), s1_db, transform, crs, S1_BANDS, "pixel")
            _write_geotiff(tile_path(root, split, "s2", index), s2_dn, transform, crs, S2_BANDS, "pixel")
            _write_geotiff(tile_path(root, split, "dfc", index), dfc[None], transform, crs, ("dfc",), "band")
            train_ids = _dfc_to_train_ids(dfc)  # (H, W), -1 = no data
            per_class = np.bincount(train_ids[train_ids >= 0], minlength=NUM_DFC_CLASSES)
            class_pixels += per_class
            tiles_with_class += per_class > 0
            nodata = int((dfc == 0).sum())
            nodata_pixels += nodata
            nodata_tiles += nodata > 0
        summary["splits"][split] = {
            "tiles": counts[split],
            "nodata_pixels": nodata_pixels,
            "tiles_with_nodata": nodata_tiles,
            **_frequency_summary(class_pixels),
            "tiles_with_class": {
                name: int(n) for name, n in zip(DFC_CLASS_NAMES, tiles_with_class, strict=True)
            },
        }
    atomic_write_json(metadata_path, summary)
    return summary


def class_frequencies(root: Path, split: str) -> dict[str, float]:
    """Pixel frequency of each of the 8 classes over the labelled (non-zero) pixels of a split on disk.

    Works on any dataset in the official layout (synthetic or real), reading only the ``dfc`` label files; the
    validation label folder may be spelled ``dfc_validation`` or ``dfc_0``.

    Raises:
        DataError: the label folder is missing or holds no ``*_dfc_*_p<N>.tif`` files.
    """
    split_dir = Path(root) / f"ROIs0000_{split}"
    candidates = [split_paths(root, split)["dfc"], split_dir / "dfc_0"]
    label_dir = next((d for d in candidates if d.is_dir()), None)
    if label_dir is None:
        looked_for = ", ".join(d.name for d in candidates)
        raise DataError(f"no DFC2020 label folder under {split_dir} (looked for {looked_for})")
    files = sorted(p for p in label_dir.iterdir() if re.fullmatch(r".+_dfc_\d+_p\d+\.tif", p.name))
    if not files:
        raise DataError(f"{label_dir} holds no label files (*_dfc_<scene>_p<N>.tif)")
    class_pixels = np.zeros(NUM_DFC_CLASSES, dtype=np.int64)
    for path in files:
        with rasterio.open(path) as src:
            train_ids = _dfc_to_train_ids(src.read(1))
        class_pixels += np.bincount(train_ids[train_ids >= 0], minlength=NUM_DFC_CLASSES)
    return _frequency_summary(class_pixels)["class_frequencies"]


def synthesize_tile(rng: np.random.Generator, tile_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one tile: the arrays written to the s1, s2 and dfc files.

    Args:
        rng: the tile's own generator (all randomness of the tile comes from it).
        tile_size: height and width.

    Returns:
        ``s1_db`` float64 (2, H, W) sigma0 in dB (VV, VH); ``s2`` uint16 (13, H, W) TOA reflectance x 10000;
        ``dfc`` int32 (H, W) DFC ids, 0 = no data.
    """
    size = tile_size
    classes = _draw_tile_classes(rng)
    label, crop_parcels, urban_blocks = _draw_layout(rng, classes, size)  # (H, W) 8-class ids
    nodata = _draw_nodata(rng, size)  # (H, W) bool
    label = _merge_small_classes(label, ~nodata, MIN_CLASS_FRACTION)
    segments, segment_class = _segments(label, crop_parcels, urban_blocks)  # (H, W), (S,)
    street = _streets(urban_blocks) & (label == URBAN)

    fractions = _mixture_fractions(rng, label, segments, segment_class, street)  # (H, W, E)
    s2 = _sentinel2(rng, label, segments, segment_class, fractions)  # (13, H, W) uint16
    water_fraction = fractions[..., _WATER_ENDMEMBERS].sum(-1)  # (H, W)
    s1 = _sentinel1(rng, label, segments, segment_class, water_fraction, street)  # (2, H, W) float64

    dfc = TRAIN_ID_TO_DFC[label].astype(np.int32)
    dfc[nodata] = 0
    return s1, s2, dfc


# ----------------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------------
def _draw_tile_classes(rng: np.random.Generator) -> np.ndarray:
    num_classes = int(rng.choice(4, p=NUM_CLASSES_PROBABILITY)) + 1
    return rng.choice(NUM_DFC_CLASSES, size=num_classes, replace=False, p=CLASS_PRIOR)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """White noise low-passed with a Gaussian of ``sigma`` pixels (last two axes), rescaled to unit std."""
    sigmas = (0,) * (len(shape) - 2) + (sigma, sigma)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigmas)
    std = field.std(axis=(-2, -1), keepdims=True)
    return field / np.maximum(std, 1e-12)


def _rotated_grid(rng: np.random.Generator, size: int, cell_min: float, cell_max: float) -> np.ndarray:
    """Ids of a grid of rectangles with random widths, rotated by a random angle: fields or city blocks."""
    angle = rng.uniform(-np.pi / 6, np.pi / 6)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) - size / 2
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    extent = size * 0.75  # half-diagonal, covers the rotated tile
    n_cells = int(np.ceil(2 * extent / cell_min)) + 1
    u_edges = -extent + np.cumsum(rng.uniform(cell_min, cell_max, n_cells))
    v_edges = -extent + np.cumsum(rng.uniform(cell_min, cell_max, n_cells))
    return np.digitize(u, u_edges) * (n_cells + 1) + np.digitize(v, v_edges)


def _snap_to_cells(label: np.ndarray, cells: np.ndarray, cls: int) -> np.ndarray:
    """Snap ``cls`` to cell boundaries: cells mostly ``cls`` become ``cls``, its other pixels are refilled."""
    _, cell_index = np.unique(cells, return_inverse=True)
    cell_index = cell_index.reshape(cells.shape)
    share = np.bincount(cell_index.ravel(), weights=(label == cls).ravel()) / np.bincount(cell_index.ravel())
    is_cls_cell = share[cell_index] > 0.5  # (H, W)
    out = label.copy()
    out[(label == cls) & ~is_cls_cell] = -1
    out[is_cls_cell] = cls
    if (out == -1).all():
        return label
    return _fill_nearest(out, out == -1)


def _draw_layout(
    rng: np.random.Generator, classes: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class map (H, W) of 8-class ids plus the crop-field and urban-block grids used for it."""
    crop_parcels = _rotated_grid(rng, size, size / 8, size / 3)
    urban_blocks = _rotated_grid(rng, size, max(3.0, size / 14), max(5.0, size / 6))
    if len(classes) == 1:
        return np.full((size, size), classes[0], dtype=np.int64), crop_parcels, urban_blocks

    # Region map: argmax of smooth random fields with a per-tile correlation length, biased by area shares.
    correlation = size * rng.uniform(0.06, 0.22)
    fields = _smooth_noise(rng, (len(classes), size, size), correlation)  # (K, H, W)
    fields += 0.3 * _smooth_noise(rng, (len(classes), size, size), 1.0)  # ragged boundaries
    area_share = rng.dirichlet(np.full(len(classes), 1.5))
    fields += 0.8 * np.log(area_share * len(classes))[:, None, None]
    label = classes[np.argmax(fields, axis=0)]  # (H, W)

    if WATER in classes and rng.random() < 0.5:
        # A river: a curvy band across the tile replaces the water blob.
        others = [c for c in range(len(classes)) if classes[c] != WATER]
        label = classes[others][np.argmax(fields[others], axis=0)]
        angle = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) - size / 2
        along = xx * np.cos(angle) + yy * np.sin(angle)
        across = -xx * np.sin(angle) + yy * np.cos(angle)
        wavelength = size * rng.uniform(0.5, 1.5)
        centre = rng.uniform(-size / 4, size / 4) + size * rng.uniform(0.05, 0.2) * np.sin(
            2 * np.pi * along / wavelength + rng.uniform(0, 2 * np.pi)
        )
        half_width = rng.uniform(1.0, size / 10) + 0.6 * _smooth_noise(rng, (size, size), 2.0)
        label[np.abs(across - centre) < half_width] = WATER
    if CROPLANDS in classes:
        label = _snap_to_cells(label, crop_parcels, CROPLANDS)
    if URBAN in classes:
        label = _snap_to_cells(label, urban_blocks, URBAN)
    return label.astype(np.int64), crop_parcels, urban_blocks


def _draw_nodata(rng: np.random.Generator, size: int) -> np.ndarray:
    """A thin no-data strip along one edge on a few tiles (like a swath or label border)."""
    nodata = np.zeros((size, size), dtype=bool)
    if rng.random() < NODATA_TILE_PROBABILITY:
        width = int(rng.integers(1, max(1, size // 25) + 1))
        side = int(rng.integers(4))
        if side == 0:
            nodata[:width] = True
        elif side == 1:
            nodata[-width:] = True
        elif side == 2:
            nodata[:, :width] = True
        else:
            nodata[:, -width:] = True
    return nodata


def _fill_nearest(label: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """Give every hole pixel the label of its nearest non-hole pixel."""
    indices = ndimage.distance_transform_edt(holes, return_distances=False, return_indices=True)
    return label[tuple(indices)]


def _merge_small_classes(label: np.ndarray, counted: np.ndarray, min_fraction: float) -> np.ndarray:
    """Merge classes with fewer than ``min_fraction`` of the counted pixels into their neighbours."""
    while True:
        pixels = np.bincount(label[counted], minlength=NUM_DFC_CLASSES)
        present = pixels > 0
        small = present & (pixels < min_fraction * counted.sum())
        if not small.any():
            return label
        if small.sum() == present.sum():  # everything is small: keep the largest class only
            small[np.argmax(pixels)] = False
        holes = small[label]
        if holes.all():
            return label
        label = _fill_nearest(label, holes)


def _segments(
    label: np.ndarray, crop_parcels: np.ndarray, urban_blocks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Segment ids (H, W): crop fields, urban blocks, connected regions of other classes; and their class."""
    local = np.zeros(label.shape, dtype=np.int64)
    for cls in np.unique(label):
        mask = label == cls
        if cls == CROPLANDS:
            local[mask] = crop_parcels[mask]
        elif cls == URBAN:
            local[mask] = urban_blocks[mask]
        else:
            local[mask] = ndimage.label(mask)[0][mask]
    key = label * (local.max() + 1) + local
    unique_keys, segments = np.unique(key, return_inverse=True)
    segment_class = unique_keys // (local.max() + 1)
    return segments.reshape(label.shape), segment_class


def _streets(blocks: np.ndarray) -> np.ndarray:
    """One-pixel streets on the lower/right border of each block."""
    street = np.zeros(blocks.shape, dtype=bool)
    street[:-1] |= blocks[:-1] != blocks[1:]
    street[:, :-1] |= blocks[:, :-1] != blocks[:, 1:]
    return street


# ----------------------------------------------------------------------------------------------------------
# Sentinel-2
# ----------------------------------------------------------------------------------------------------------
def _mixture_fractions(
    rng: np.random.Generator,
    label: np.ndarray,
    segments: np.ndarray,
    segment_class: np.ndarray,
    street: np.ndarray,
) -> np.ndarray:
    """Endmember fractions (H, W, E): a Dirichlet draw per segment, perturbed by a smooth log-normal field."""
    num_endmembers = len(ENDMEMBER_NAMES)
    alpha = CLASS_ENDMEMBER_ALPHA[segment_class]  # (S, E)
    segment_fractions = rng.gamma(alpha)  # (S, E); Dirichlet after normalising (gamma(0) = 0 keeps zeros)
    segment_fractions /= segment_fractions.sum(1, keepdims=True)
    size = label.shape[0]
    # Smooth log-normal jitter, drawn only for the endmembers this tile uses (the others stay exactly 0).
    used = np.flatnonzero(alpha.sum(0) > 0)  # (U,)
    jitter = np.zeros((size, size, num_endmembers))
    jitter[..., used] = _smooth_noise(rng, (len(used), size, size), 1.5).transpose(1, 2, 0)  # (H, W, U)
    fractions = segment_fractions[segments] * np.exp(_CLASS_MIX_JITTER[label][..., None] * jitter)  # (H,W,E)
    street_mix = np.zeros(num_endmembers)
    street_mix[[_EM["asphalt"], _EM["concrete"]]] = (0.8, 0.2)
    fractions[street] = 0.5 * fractions[street] / fractions[street].sum(-1, keepdims=True) + 0.5 * street_mix
    return fractions / fractions.sum(-1, keepdims=True)


def _sentinel2(
    rng: np.random.Generator,
    label: np.ndarray,
    segments: np.ndarray,
    segment_class: np.ndarray,
    fractions: np.ndarray,
) -> np.ndarray:
    """L1C-like TOA reflectance x 10000, uint16 (13, H, W)."""
    size = label.shape[0]
    surface = (fractions @ ENDMEMBER_REFLECTANCE).transpose(2, 0, 1)  # (13, H, W)
    num_segments = len(segment_class)
    segment_log_gain = _CLASS_SEGMENT_BRIGHTNESS[segment_class] * rng.standard_normal(num_segments)  # (S,)
    segment_gain = np.exp(segment_log_gain)
    texture = 1.0 + _CLASS_TEXTURE[label] * _smooth_noise(rng, (size, size), 0.7)  # (H, W)
    surface = surface * (segment_gain[segments] * np.clip(texture, 0.5, 1.5))[None]

    illumination = rng.uniform(0.85, 1.1)  # sun elevation / slope, per tile
    aerosol = np.exp(rng.normal(0.0, 0.25))  # per-tile scaling of the path reflectance
    path = _S2_PATH_REFLECTANCE[:, None, None] * aerosol  # (13, 1, 1)
    toa = path + (_S2_TRANSMITTANCE * illumination)[:, None, None] * surface  # (13, H, W)
    if rng.random() < HAZE_TILE_PROBABILITY:
        haze_pattern = np.clip(0.6 + 0.4 * _smooth_noise(rng, (size, size), size / 6), 0, None)  # (H, W)
        haze = rng.uniform(0.03, 0.25) * haze_pattern
        toa = toa * (1 - 0.5 * haze)[None] + _S2_HAZE_SPECTRUM[:, None, None] * haze[None]  # (13, H, W)
    for bands, box in ((_S2_BANDS_20M, 2), (_S2_BANDS_60M, 6)):
        toa[bands] = ndimage.uniform_filter(toa[bands], size=(1, box, box), mode="nearest")
    toa += _S2_NOISE[:, None, None] * rng.standard_normal(toa.shape)
    return np.clip(np.rint(toa * 10000.0), 0, 65535).astype(np.uint16)


# ----------------------------------------------------------------------------------------------------------
# Sentinel-1
# ----------------------------------------------------------------------------------------------------------
def _sentinel1(
    rng: np.random.Generator,
    label: np.ndarray,
    segments: np.ndarray,
    segment_class: np.ndarray,
    water_fraction: np.ndarray,
    street: np.ndarray,
) -> np.ndarray:
    """sigma0 in dB, float64 (2, H, W): class mean, segment offset, relief, texture, noise floor, speckle."""
    size = label.shape[0]
    num_segments = len(segment_class)
    vv_offset = _CLASS_S1_SEGMENT_SD[segment_class] * rng.standard_normal(num_segments)  # (S,)
    vh_offset = 0.8 * vv_offset + 0.5 * rng.standard_normal(num_segments)  # correlated polarisations
    mean_db = CLASS_S1_DB[label].transpose(2, 0, 1)  # (2, H, W)
    mean_db = mean_db + np.stack([vv_offset[segments], vh_offset[segments]])
    relief = rng.uniform(0.0, 1.5) * _smooth_noise(rng, (size, size), size / 8)  # (H, W), same for both pols
    damping = np.where(label == WATER, 0.0, _S1_WATER_DAMPING_DB * water_fraction)  # (H, W)
    streets_db = np.where(street, -3.0, 0.0)
    sigma0_db = mean_db + (relief + damping + streets_db)[None]  # (2, H, W)

    texture = np.exp(_CLASS_S1_TEXTURE[label] * rng.standard_normal((2, size, size)))  # (2, H, W)
    sigma0 = 10.0 ** (sigma0_db / 10.0) * texture + 10.0 ** (_S1_NOISE_FLOOR_DB / 10.0)
    speckle = rng.gamma(_S1_LOOKS, 1.0 / _S1_LOOKS, size=sigma0.shape)  # (2, H, W), mean 1
    return 10.0 * np.log10(sigma0 * speckle)


# ----------------------------------------------------------------------------------------------------------
# Files and metadata
# ----------------------------------------------------------------------------------------------------------
def _resolve_num_tiles(num_tiles: Mapping[str, int] | None) -> dict[str, int]:
    counts = dict(DEFAULT_NUM_TILES)
    if num_tiles is not None:
        unknown = set(num_tiles) - set(SPLITS)
        if unknown:
            raise ConfigError(f"num_tiles keys must be {SPLITS}, got unknown {sorted(unknown)}")
        for split, count in num_tiles.items():
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ConfigError(f"num_tiles[{split!r}] must be a non-negative integer, got {count!r}")
            counts[split] = count
    if sum(counts.values()) == 0:
        raise ConfigError("num_tiles asks for no tiles at all")
    return {split: counts[split] for split in SPLITS}


def _tile_transform(split: str, index: int, tile_size: int) -> Affine:
    """North-up 10 m geotransform; tiles on a grid with one tile of gap, validation and test 400 km apart."""
    spacing = 2 * tile_size * PIXEL_SIZE_M
    row, col = divmod(index, _TILES_PER_ROW)
    west = _ORIGIN_EASTING + col * spacing
    north = _ORIGIN_NORTHING[split] - row * spacing
    return Affine(PIXEL_SIZE_M, 0.0, west, 0.0, -PIXEL_SIZE_M, north)


def _write_geotiff(
    path: Path,
    array: np.ndarray,
    transform: Affine,
    crs: CRS,
    band_names: tuple[str, ...],
    interleave: str,
) -> None:
    """Write a (C, H, W) array as an uncompressed GeoTIFF (like the real files), atomically."""
    profile = {
        "driver": "GTiff",
        "dtype": array.dtype.name,
        "count": array.shape[0],
        "height": array.shape[1],
        "width": array.shape[2],
        "crs": crs,
        "transform": transform,
        "interleave": interleave,
    }
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(array)
        for band, name in enumerate(band_names, start=1):
            dst.set_band_description(band, name)


def _read_metadata(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not a readable synthetic-dataset metadata file: {error}") from error
    if not isinstance(content, dict):
        raise DataError(f"{path} is not a synthetic-dataset metadata file (expected a JSON object)")
    return content


def _dfc_to_train_ids(dfc: np.ndarray) -> np.ndarray:
    """DFC ids -> 8-class ids, -1 for no data and for ids outside the 8 classes."""
    lut = np.full(11, -1, dtype=np.int64)
    lut[TRAIN_ID_TO_DFC] = np.arange(NUM_DFC_CLASSES)
    valid = (dfc >= 0) & (dfc <= 10)
    return np.where(valid, lut[np.clip(dfc, 0, 10)], -1)


def _frequency_summary(class_pixels: np.ndarray) -> dict[str, dict]:
    total = max(int(class_pixels.sum()), 1)
    return {
        "class_pixel_counts": {name: int(n) for name, n in zip(DFC_CLASS_NAMES, class_pixels, strict=True)},
        "class_frequencies": {
            name: round(int(n) / total, 6) for name, n in zip(DFC_CLASS_NAMES, class_pixels, strict=True)
        },
    }


def _all_files_exist(root: Path, counts: dict[str, int]) -> bool:
    return all(
        tile_path(root, split, sensor, index).is_file()
        for split in SPLITS
        for index in range(counts[split])
        for sensor in ("s1", "s2", "dfc")
    )


def _existing_dfc_files(root: Path) -> list[Path]:
    found: list[Path] = []
    for split in SPLITS:
        for folder in split_paths(root, split).values():
            if folder.is_dir():
                found.extend(sorted(folder.glob("*.tif")))
    return found


def _remove_stale_tiles(root: Path, counts: dict[str, int]) -> None:
    """Delete generator-named tiles beyond the requested counts (left by a larger earlier dataset)."""
    for split in SPLITS:
        for sensor, folder in split_paths(root, split).items():
            if not folder.is_dir():
                continue
            # Also temporary files of a killed run: ".<name>.<pid>.tmp" (weakseg.io.atomic_path).
            pattern = re.compile(rf"\.?ROIs0000_{split}_{sensor}_0_p(\d+)\.tif(\.\d+\.tmp)?")
            for path in folder.iterdir():
                match = pattern.fullmatch(path.name)
                if match and (match.group(2) or int(match.group(1)) >= counts[split]):
                    path.unlink()
