"""Class colours that stay visibly distinct for any number of classes, and the colour of "unlabelled".

A mask is only readable when no two classes share a colour. The folder reader used to cycle a 10-colour list, so
class 10 was drawn in class 0's colour on an 11-class dataset. :func:`class_palette` instead returns K colours for
any K whose pairwise distance in CIELAB stays large:

1. **The dataset's own colours** when it has them (DFC2020's official class colours,
   :data:`weakseg.data.classes.DFC_CLASS_COLORS`; a folder dataset's optional ``colors.txt``,
   :mod:`weakseg.data.folder`), because a user compares the figures with maps drawn in those colours.
2. Otherwise **a fixed list of 10 qualitative colours** from Kelly's 22 colours of maximum contrast (K. L.
   Kelly, "Twenty-two colors of maximum contrast", Color Engineering 3(6), 1965): white, black, grey and olive
   green left out (the background, or too close to the unlabelled colour), then, starting from blue, each next
   colour the remaining one farthest from those before it, and the first 10 kept. Every prefix keeps a large
   smallest CIE76 distance: 130 for 2 classes, 73 for 4, 42 for 8, 35 for 10.
3. **Beyond them, farthest-point extension** (past 10 classes, or past a shorter dataset list): each next
   colour is the candidate of a fixed sRGB grid (16 levels per channel) farthest, in CIELAB, from every colour
   already taken, the unlabelled colour and white (the figure background). Deterministic (no randomness, ties go to the first candidate in grid order), and
   greedy max-min keeps the smallest pairwise distance at 35 up to 31 classes and above 28 up to 40 (measured;
   ``tests/viz/test_palette.py`` checks K = 1..40). CIE76 (Euclidean CIELAB) is the distance: a difference of
   about 2.3 is just noticeable, so 28 is far apart.

**Unlabelled (255)** is :data:`IGNORE_COLOR`, a dark grey, an anchor of the extension: up to 40 classes no palette
colour is within 30 CIE76 of it (32.3 at the least, measured). The space runs out slowly beyond: 254 classes still
keep 13.5 between colours and 15.9 to unlabelled.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

#: Colour of ignored / unlabelled pixels (255) in colourised masks: dark grey, far from every palette colour.
IGNORE_COLOR: tuple[int, int, int] = (40, 40, 40)

#: Kelly's colours of maximum contrast, ordered for the largest smallest distance of every prefix (docstring):
#: blue, greenish yellow, red, green, yellowish brown, orange, purplish pink, buff, light blue, purple.
QUALITATIVE_COLORS: tuple[str, ...] = (
    "#0067a5", "#dcd300", "#be0032", "#008856", "#654522", "#f38400", "#e68fac", "#c2b280", "#a1caf1", "#875692",
)
#: Colours a new palette colour must also stay away from: unlabelled and the (white) figure background.
_ANCHORS: tuple[tuple[int, int, int], ...] = (IGNORE_COLOR, (255, 255, 255))
_GRID_LEVELS = 16
_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    """'#rrggbb' -> (r, g, b) 0..255; anything else is a ValueError."""
    if not _HEX.match(color):
        raise ValueError(f"expected a colour '#rrggbb', got {color!r}")
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def rgb_to_hex(rgb: Sequence[int]) -> str:
    r, g, b = (int(c) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def srgb_to_lab(rgb: np.ndarray | Sequence[Sequence[int]] | Sequence[int]) -> np.ndarray:
    """sRGB 0..255 (..., 3) -> CIELAB (..., 3) under the D65 white point (IEC 61966-2-1, CIE 1976)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124564, 0.3575761, 0.1804375],
                       [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])  # relative to the D65 white
    delta = 6.0 / 29.0
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4.0 / 29.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])],
                    axis=-1)


def color_distances(colors: Sequence[str | Sequence[int]]) -> np.ndarray:
    """(K, K) CIE76 distances (Euclidean in CIELAB) between colours given as '#rrggbb' or 0..255 triples."""
    rgb = [hex_to_rgb(c) if isinstance(c, str) else tuple(int(v) for v in c) for c in colors]
    lab = srgb_to_lab(np.asarray(rgb, dtype=np.float64).reshape(-1, 3))  # (K, 3)
    return np.linalg.norm(lab[:, None] - lab[None], axis=-1)


@lru_cache(maxsize=1)
def _candidates() -> tuple[np.ndarray, np.ndarray]:
    """The sRGB grid (N, 3) int and its CIELAB values (N, 3)."""
    levels = np.linspace(0, 255, _GRID_LEVELS).round().astype(int)
    grid = np.array(list(itertools.product(levels, repeat=3)))  # (16^3, 3), in a fixed order
    return grid, srgb_to_lab(grid)


def extend_palette(colors: Sequence[str], num_colors: int) -> tuple[str, ...]:
    """``colors`` followed by farthest-point colours (module docstring) up to ``num_colors`` in all."""
    chosen = [c.lower() for c in colors][:num_colors]
    if len(chosen) >= num_colors:
        return tuple(chosen)
    grid, grid_lab = _candidates()
    taken = srgb_to_lab(np.array([hex_to_rgb(c) for c in chosen] + list(_ANCHORS), dtype=np.float64))
    nearest = np.min(np.linalg.norm(grid_lab[:, None] - taken[None], axis=-1), axis=1)  # (N,)
    while len(chosen) < num_colors:
        best = int(np.argmax(nearest))  # the first of equally far candidates: deterministic
        chosen.append(rgb_to_hex(grid[best]))
        nearest = np.minimum(nearest, np.linalg.norm(grid_lab - grid_lab[best], axis=-1))
    return tuple(chosen)


def class_palette(num_classes: int, dataset_colors: Sequence[str] | None = None) -> tuple[str, ...]:
    """One '#rrggbb' colour per class, pairwise distinct for any ``num_classes`` (module docstring).

    Args:
        num_classes: K >= 0.
        dataset_colors: the dataset's own colours ('#rrggbb'), used as they are for the first classes; a list
            shorter than K is extended with colours far from them.

    Returns:
        K colours, lower-case '#rrggbb'.
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    base = list(dataset_colors) if dataset_colors else list(QUALITATIVE_COLORS)
    for c in base:
        hex_to_rgb(c)  # a malformed colour is a ValueError here, not a wrong figure later
    return extend_palette(base, num_classes)
