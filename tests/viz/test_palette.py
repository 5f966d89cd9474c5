"""Tests of weakseg.viz.palette: distinct colours for any class count, the dataset's own colours first."""

from __future__ import annotations

import numpy as np
import pytest

from tests.data.test_folder import make_folder
from weakseg.data import open_dataset
from weakseg.data.classes import DFC_CLASS_COLORS
from weakseg.errors import DataError
from weakseg.viz.palette import (
    IGNORE_COLOR,
    QUALITATIVE_COLORS,
    class_palette,
    color_distances,
    hex_to_rgb,
    srgb_to_lab,
)

#: CIE76 distance every two palette colours (and each colour and "unlabelled") must keep; about 2.3 is just
#: noticeable, so 25 is unmistakable. The palette keeps >= 28.9 between colours and >= 32.3 to unlabelled (K <= 40).
MIN_DISTANCE = 25.0


def test_cielab_of_known_colours() -> None:
    # Reference values of the sRGB -> CIELAB (D65) conversion: white, black, pure red.
    np.testing.assert_allclose(srgb_to_lab([255, 255, 255]), [100.0, 0.0, 0.0], atol=0.01)
    np.testing.assert_allclose(srgb_to_lab([0, 0, 0]), [0.0, 0.0, 0.0], atol=0.01)
    np.testing.assert_allclose(srgb_to_lab([255, 0, 0]), [53.24, 80.09, 67.20], atol=0.05)


@pytest.mark.parametrize("k", range(1, 41))
def test_palette_colours_are_pairwise_distinct_and_far_from_unlabelled(k: int) -> None:
    colors = class_palette(k)
    assert len(colors) == k and len(set(colors)) == k
    distances = color_distances([*colors, IGNORE_COLOR])
    np.fill_diagonal(distances, np.inf)
    assert distances[:k, :k].min() >= MIN_DISTANCE, k
    assert distances[k, :k].min() >= MIN_DISTANCE, "a class colour is too close to the unlabelled colour"


def test_small_palettes_are_the_hand_picked_list_and_every_call_is_the_same() -> None:
    assert class_palette(4) == QUALITATIVE_COLORS[:4]
    assert class_palette(40) == class_palette(40)
    assert class_palette(40)[:12] == class_palette(12)  # growing K never recolours the first classes


def test_dataset_colours_are_used_and_a_short_list_is_extended_away_from_them() -> None:
    assert class_palette(8, DFC_CLASS_COLORS) == tuple(c.lower() for c in DFC_CLASS_COLORS)
    own = ["#ff0000", "#00ff00"]
    colors = class_palette(5, own)
    assert colors[:2] == ("#ff0000", "#00ff00")
    distances = color_distances(colors)
    np.fill_diagonal(distances, np.inf)
    assert distances[2:].min() >= MIN_DISTANCE
    with pytest.raises(ValueError, match="#rrggbb"):
        class_palette(2, ["red", "#00ff00"])


def test_folder_dataset_with_twelve_classes_repeats_no_colour(tmp_path) -> None:
    # The old folder palette cycled 10 colours: class 10 had class 0's colour.
    root = make_folder(tmp_path / "d")
    (root / "classes.txt").write_text("\n".join(["water", "forest", "urban", *(f"c{i}" for i in range(9))]) + "\n")
    ds = open_dataset("folder", root, "all")
    assert len(ds.class_colors) == 12 and len(set(ds.class_colors)) == 12
    assert ds.class_colors == class_palette(12)


def test_folder_dataset_takes_its_colours_from_colors_txt(tmp_path) -> None:
    root = make_folder(tmp_path / "d")
    (root / "colors.txt").write_text("#1F77B4\n\n#ff7f0e\n#2ca02c\n")
    assert open_dataset("folder", root, "all").class_colors == ("#1f77b4", "#ff7f0e", "#2ca02c")
    assert hex_to_rgb(open_dataset("folder", root, "all").class_colors[0]) == (0x1F, 0x77, 0xB4)


def test_folder_colors_txt_errors_name_the_file_and_line(tmp_path) -> None:
    root = make_folder(tmp_path / "d")
    (root / "colors.txt").write_text("#1f77b4\nblue\n#2ca02c\n")
    with pytest.raises(DataError, match=r"colors.txt line 2: 'blue' is not a colour"):
        open_dataset("folder", root, "all")
    (root / "colors.txt").write_text("#1f77b4\n#2ca02c\n")
    with pytest.raises(DataError, match=r"colors.txt lists 2 colour\(s\) but classes.txt lists 3 classes"):
        open_dataset("folder", root, "all")
