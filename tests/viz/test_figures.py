"""Tests of weakseg.viz.figures: exact colours and stretch, DINO mass sets, PNG files and pixel sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weakseg.data.classes import DFC_CLASS_COLORS, DFC_CLASS_NAMES
from weakseg.errors import WeaksegError
from weakseg.viz.figures import (
    IGNORE_COLOR,
    attention_mass_mask,
    colorize_mask,
    plot_attention_grid,
    plot_class_maps,
    plot_gate_map,
    plot_metric_bars,
    plot_pseudomask_panel,
    s2_true_color,
)


def png_size(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size  # (width, height)


# ---- arrays ----------------------------------------------------------------------------------------------
def test_colorize_mask_exact_colours() -> None:
    mask = np.array([[0, 7], [255, 1]], dtype=np.uint8)
    rgb = colorize_mask(mask, DFC_CLASS_COLORS)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [0x00, 0x99, 0x00]  # Forest #009900
    assert rgb[0, 1].tolist() == [0x1C, 0x0D, 0xFF]  # Water #1c0dff
    assert rgb[1, 1].tolist() == [0xC6, 0xB0, 0x44]  # Shrubland #c6b044
    assert rgb[1, 0].tolist() == list(IGNORE_COLOR)


def test_colorize_mask_accepts_rgb_tuples_and_custom_ignore() -> None:
    mask = np.array([[1, 255, 0]], dtype=np.uint8)
    rgb = colorize_mask(mask, [(10, 20, 30), (1, 2, 3)], ignore_color=(0, 0, 0))
    assert rgb.tolist() == [[[1, 2, 3], [0, 0, 0], [10, 20, 30]]]


def test_colorize_mask_rejects_ids_without_colour() -> None:
    with pytest.raises(WeaksegError, match=r"class ids \[9\] but only 8 class colours"):
        colorize_mask(np.array([[0, 9]], dtype=np.uint8))


def test_true_color_uses_b04_b03_b02_and_stretches_2_to_98_percent() -> None:
    image = np.zeros((13, 10, 10), dtype=np.uint16)
    ramp = np.arange(100, dtype=np.uint16).reshape(10, 10)
    image[3] = ramp * 10  # B04 -> red
    image[2] = 500  # B03 constant -> green black
    image[1] = 99 - ramp  # B02 -> blue, reversed
    rgb = s2_true_color(image)
    assert rgb.dtype == np.uint8 and rgb.shape == (10, 10, 3)
    # np.percentile of 0..99 (linear): 2 % -> 1.98, 98 % -> 97.02; values outside are clipped.
    lo, hi = 1.98, 97.02
    expected_red = np.round(np.clip((ramp - lo) / (hi - lo), 0, 1) * 255)
    assert np.array_equal(rgb[..., 0], expected_red.astype(np.uint8))
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255
    assert (rgb[..., 0][ramp < lo] == 0).all()  # 0 and 1 clip to black
    assert (rgb[..., 0][ramp > hi] == 255).all()  # 98 and 99 clip to white
    assert (rgb[..., 1] == 0).all()
    assert np.array_equal(rgb[..., 2], expected_red[::-1, ::-1].astype(np.uint8))


def test_true_color_three_channels_and_nan() -> None:
    image = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    image[0, 0, 0] = np.nan
    rgb = s2_true_color(image)
    assert rgb[0, 0, 0] == 0 and rgb[..., 1].max() == 255
    with pytest.raises(WeaksegError, match="cannot render 5 channels"):
        s2_true_color(np.zeros((5, 4, 4)))


def test_attention_mass_mask_hand_computed() -> None:
    attn = np.array([[0.1, 0.5], [0.3, 0.1]])
    assert attention_mass_mask(attn, 0.6).tolist() == [[False, True], [True, False]]  # 0.5 + 0.3 >= 0.6
    assert attention_mass_mask(attn, 0.5).tolist() == [[False, True], [False, False]]  # 0.5 alone suffices
    assert attention_mass_mask(attn, 0.85).tolist() == [[True, True], [True, False]]  # tie: earlier 0.1 first
    assert not attention_mass_mask(np.zeros((3, 2, 2)), 0.6).any()  # pruned heads: empty
    batched = attention_mass_mask(np.stack([attn, attn[::-1]]), 0.6)
    assert batched.shape == (2, 2, 2) and batched[1].tolist() == [[True, False], [False, True]]
    with pytest.raises(WeaksegError, match="mass"):
        attention_mass_mask(attn, 0.0)


# ---- figures ---------------------------------------------------------------------------------------------
def _rows(n: int, size: int = 16) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        mask = rng.integers(0, 8, (size, size)).astype(np.uint8)
        mask[0] = 255
        image = rng.random((13, size, size))
        rows.append({"id": f"tile{i}", "image": image, "ground truth": mask, "refined": mask})
    return rows


def test_pseudomask_panel_png_size(tmp_path: Path) -> None:
    rows = _rows(2)
    del rows[1]["refined"]  # a missing column is drawn as "n/a", not an error
    path = plot_pseudomask_panel(
        rows, ["ground truth", "refined"], DFC_CLASS_NAMES, DFC_CLASS_COLORS, tmp_path / "sub" / "panel.png",
        title="panel", panel_size=2.0, dpi=50,
    )
    assert path == tmp_path / "sub" / "panel.png"
    width, height = png_size(path)
    assert width == 3 * 2.0 * 50
    assert 2 * 2.0 * 50 < height < 2 * 2.0 * 50 + 100  # rows plus title and legend band
    assert not list(path.parent.glob("*.tmp"))


def test_attention_grid_png_size_single_block_and_layers(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((4, 4, 4))
    kept = np.array([True, False, True, False])
    maps[~kept] = 0
    path = plot_attention_grid(maps, kept, tmp_path / "attn.png", image=rng.random((13, 8, 8)), mass=0.6,
                               panel_size=1.0, dpi=50)
    assert png_size(path)[0] == (4 + 1) * 1.0 * 50
    maps4 = rng.random((2, 3, 4, 6))
    path4 = plot_attention_grid(maps4, np.ones((2, 3), bool), tmp_path / "attn4.png", panel_size=1.0, dpi=50)
    width, height = png_size(path4)
    assert width == 3 * 50 and height == round((2 * 1.0 + 0.1) * 50)
    with pytest.raises(WeaksegError, match="kept mask has shape"):
        plot_attention_grid(maps4, kept, tmp_path / "bad.png")


def test_gate_map_png_size(tmp_path: Path) -> None:
    kept = np.array([[True, False, True], [False, False, True]])
    path = plot_gate_map(kept, tmp_path / "gates.png", log_alpha=np.where(kept, 1.5, -2.0), dpi=50)
    width, height = png_size(path)
    # 3 heads, 2 blocks, 0.55 in per cell with log alpha text, plus margins for labels and legend.
    assert abs(width - (3 * 0.55 + 2.2) * 50) <= 1 and abs(height - (2 * 0.55 + 1.1) * 50) <= 1
    wider = plot_gate_map(np.ones((2, 12), bool), tmp_path / "gates12.png", dpi=50)
    assert png_size(wider)[0] > width
    with pytest.raises(WeaksegError, match="log_alpha has shape"):
        plot_gate_map(kept, tmp_path / "bad.png", log_alpha=np.zeros((3, 3)))


def test_metric_bars_png_and_missing_metric(tmp_path: Path) -> None:
    scores = {"Grad-CAM": {"mIoU": 0.3, "OA": 0.5}, "attention": {"mIoU": 0.4, "OA": 0.6}}
    path = plot_metric_bars(scores, tmp_path / "bars.png", dpi=50)
    assert png_size(path) == (round(3.5 * 50), round(3.2 * 50))
    assert png_size(plot_metric_bars(scores, tmp_path / "bars2.png", metric=["mIoU", "OA"], dpi=50))[1] == 160
    with pytest.raises(WeaksegError, match=r"method 'Grad-CAM' has no score for \['AA'\]"):
        plot_metric_bars(scores, tmp_path / "bad.png", metric="AA")


def test_existing_png_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "bars.png"
    path.write_bytes(b"old")
    plot_metric_bars({"a": {"mIoU": 0.5}}, path, dpi=40)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_class_maps_one_panel_per_label_of_the_busiest_tile(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tile = rng.random((13, 16, 16)).astype(np.float32)
    mask = rng.integers(0, 8, (16, 16)).astype(np.uint8)
    rows = [
        {"id": "a", "image": tile, "ground truth": mask, "mask": mask, "maps": rng.random((8, 4, 4)),
         "labels": [3, 1, 6], "probs": rng.random(8)},
        {"id": "b", "image": tile, "ground truth": None, "mask": mask, "maps": np.zeros((8, 4, 4)), "labels": [2]},
    ]
    path = plot_class_maps(rows, DFC_CLASS_NAMES, DFC_CLASS_COLORS, tmp_path / "maps.png", title="t", dpi=50)
    width, _ = png_size(path)
    assert width == round((3 + 3) * 1.8 * 50)  # true colour, ground truth, mask + 3 maps (the busiest row)
    with pytest.raises(WeaksegError, match="at least one row"):
        plot_class_maps([], DFC_CLASS_NAMES, DFC_CLASS_COLORS, tmp_path / "x.png")


# ---- any band count, heat-map columns (figures of weakseg pseudomasks / refine) ----------------------------
@pytest.mark.parametrize("bands, caption, rgb", [
    (13, "true colour", (3, 2, 1)), (15, "true colour", (3, 2, 1)), (3, "RGB", (0, 1, 2)),
    (4, "bands 1-3 as RGB", (0, 1, 2)), (1, "band 1 (grey)", (0, 0, 0)),
])
def test_render_image_shows_any_band_count_and_says_which_bands(bands, caption, rgb) -> None:
    from weakseg.viz.figures import render_image

    image = np.random.default_rng(bands).random((bands, 8, 8)).astype(np.float32)
    out, text = render_image(image)
    assert text == caption and out.shape == (8, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, s2_true_color(image, rgb))


def test_heat_columns_are_drawn_with_viridis_not_as_class_ids(tmp_path: Path) -> None:
    mask = np.zeros((16, 16), dtype=np.uint8)
    row = {"id": "a", "image": np.zeros((16, 16, 3), dtype=np.uint8), "mask": mask, "confidence": np.ones((16, 16))}
    path = plot_pseudomask_panel([row], ["mask", "confidence"], ["x", "y"], ["#0067a5", "#dcd300"],
                                 tmp_path / "p.png", dpi=50, heat_columns=["confidence"])
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    viridis_top = np.array([253, 231, 36])  # viridis(1.0)
    assert (pixels == viridis_top).all(axis=1).sum() > 0.6 * (2 * 50) ** 2  # most of the 100 x 100 px panel
    assert (pixels == [0xDC, 0xD3, 0x00]).all(axis=1).sum() < 500  # class 1's colour: its legend patch only
