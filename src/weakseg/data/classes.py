"""DFC2020 land-cover classes, the 8-class remap and their display colours.

The DFC2020 high-resolution labels use ids 1..10 with 0 = no data. Savanna (3) and Snow/Ice (8) never occur in
the released high-resolution labels, so, like sparse-vit-wsss, GFM-Bench and EarthNets, we evaluate 8 classes and map
0, 3 and 8 to the ignore index 255 (``datasets.md`` section 1.4).
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255

DFC_CLASS_NAMES: tuple[str, ...] = (
    "Forest",
    "Shrubland",
    "Grassland",
    "Wetlands",
    "Croplands",
    "Urban/Built-up",
    "Barren",
    "Water",
)
NUM_DFC_CLASSES = len(DFC_CLASS_NAMES)

#: Official DFC2020 colours of the 8 evaluated classes, as RGB hex.
DFC_CLASS_COLORS: tuple[str, ...] = (
    "#009900",
    "#c6b044",
    "#b6ff05",
    "#27ff87",
    "#c24f44",
    "#a5a5a5",
    "#f9ffa4",
    "#1c0dff",
)

#: DFC id (0..10) -> 8-class id, 255 = ignore (no data, Savanna, Snow/Ice).
DFC_TO_TRAIN_ID = np.array([255, 0, 1, 255, 2, 3, 4, 5, 255, 6, 7], dtype=np.uint8)

#: 8-class id -> DFC id (used when writing DFC-layout label files, e.g. by the synthetic generator).
TRAIN_ID_TO_DFC = np.array([1, 2, 4, 5, 6, 7, 9, 10], dtype=np.int32)

S1_BANDS: tuple[str, ...] = ("VV", "VH")
S2_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12",
)
#: 0-based indices of B04, B03, B02 in the 13-band S2 stack (true colour).
S2_RGB_INDICES = (3, 2, 1)


def remap_dfc(dfc: np.ndarray) -> np.ndarray:
    """Map DFC ids (0..10) to 8-class ids with 255 = ignore; out-of-range ids become 255 too."""
    dfc = np.asarray(dfc)
    out = np.full(dfc.shape, IGNORE_INDEX, dtype=np.uint8)
    valid = (dfc >= 0) & (dfc < len(DFC_TO_TRAIN_ID))
    out[valid] = DFC_TO_TRAIN_ID[dfc[valid].astype(np.int64)]
    return out

