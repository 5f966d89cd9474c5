"""Tests of the shared maps -> masks rules: arg-max, own-mean threshold, normalisation, upsampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weakseg.masks import class_maps_to_masks, normalize_maps, upsample_maps

LABELS_0_2 = torch.tensor([[True, False, True]])


def maps_1x4(class0: list[float], class2: list[float], class1: float = 100.0) -> torch.Tensor:
    """(1, 3, 1, 4) maps of labels 0 and 2 on one row; class 1 (not a label) is large everywhere."""
    return torch.tensor([[[class0], [[class1] * 4], [class2]]])


def probs(p0: float = 0.9, p1: float = 0.2, p2: float = 0.7) -> torch.Tensor:
    return torch.tensor([[p0, p1, p2]])


def masks_of(maps, p=None, labels=LABELS_0_2, out_size=(1, 4), **kw):
    return class_maps_to_masks(maps, probs() if p is None else p, labels, out_size, **kw)


# ---- normalisation and upsampling --------------------------------------------------------------------------
def test_normalize_max_and_minmax_by_hand() -> None:
    maps = torch.tensor([[[[0.0, 2.0], [1.0, 4.0]], [[1.0, 3.0], [2.0, 1.0]], [[3.0, 3.0], [3.0, 3.0]],
                          [[0.0, 0.0], [0.0, 0.0]]]])  # (1, 4, 2, 2)
    normed, locatable = normalize_maps(maps, "max")
    torch.testing.assert_close(normed[0, 0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    torch.testing.assert_close(normed[0, 1], torch.tensor([[1 / 3, 1.0], [2 / 3, 1 / 3]]))
    torch.testing.assert_close(normed[0, 2], torch.ones(2, 2))  # flat but positive: locatable by its max
    assert (normed[0, 3] == 0).all()  # all zero: no division by zero
    assert locatable.tolist() == [[True, True, True, False]]

    normed, locatable = normalize_maps(maps, "minmax")
    torch.testing.assert_close(normed[0, 0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    torch.testing.assert_close(normed[0, 1], torch.tensor([[0.0, 1.0], [0.5, 0.0]]))
    assert (normed[0, 2] == 0).all() and (normed[0, 3] == 0).all()  # flat maps: 0, not NaN
    assert locatable.tolist() == [[True, True, False, False]]
    with pytest.raises(ValueError, match=r"unknown normalisation 'sum'; choose from \['max', 'minmax'\]"):
        normalize_maps(maps, "sum")  # type: ignore[arg-type]


def test_upsample_is_half_pixel_bilinear_and_keeps_height_and_width() -> None:
    maps = torch.tensor([[[[0.0, 1.0]]]])  # (1, 1, 1, 2)
    up = upsample_maps(maps, (3, 4))
    assert up.shape == (1, 1, 3, 4)
    torch.testing.assert_close(up[0, 0], torch.tensor([[0.0, 0.25, 0.75, 1.0]] * 3))  # as cv2 INTER_LINEAR
    tall = torch.arange(6.0).reshape(1, 1, 3, 2)
    assert upsample_maps(tall, (9, 4)).shape == (1, 1, 9, 4)
    assert upsample_maps(tall, (4, 9)).shape == (1, 1, 4, 9)
    assert upsample_maps(tall, (3, 2)) is tall  # already the right size: untouched


# ---- arg-max rule ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("normalize", "row", "confidence"),
    [
        # class 0 -> [1, .5, .25, 0] either way; class 2 -> max: [1/3, .6, 1, 1], minmax: [0, .4, 1, 1]
        ("max", [0, 2, 2, 2], [2 / 3, 0.1, 0.75, 1.0]),
        ("minmax", [0, 0, 2, 2], [1.0, 0.1, 0.75, 1.0]),
    ],
)
def test_argmax_takes_the_best_normalised_label_with_the_margin_as_confidence(normalize, row,
                                                                              confidence) -> None:
    maps = maps_1x4([4.0, 2.0, 1.0, 0.0], [1.0, 1.8, 3.0, 3.0])
    res = masks_of(maps, rule="argmax", normalize=normalize)
    np.testing.assert_array_equal(res.masks[0], [row])
    np.testing.assert_allclose(res.confidence[0], [confidence], atol=1e-6)
    assert res.status == ["ok"] and res.reason == ["map_argmax"]
    assert res.masks.dtype == np.uint8 and res.confidence.dtype == np.float32


def test_argmax_fills_unclaimed_pixels_from_the_nearest_with_zero_confidence() -> None:
    maps = maps_1x4([3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0])
    res = masks_of(maps)
    np.testing.assert_array_equal(res.masks[0], [[0, 0, 2, 2]])
    np.testing.assert_allclose(res.confidence[0], [[1.0, 0.0, 0.0, 1.0]])


def test_non_labels_never_win() -> None:
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 1] = torch.tensor([[0.0, 5.0], [5.0, 0.0]])  # class 1 is not a label, with a clear structure
    maps[0, 0] = torch.tensor([[1.0, 0.2], [0.0, 0.0]])
    maps[0, 2] = torch.tensor([[0.0, 0.0], [0.1, 1.0]])
    for normalize in ("max", "minmax"):
        res = masks_of(maps, normalize=normalize, out_size=(2, 2))
        assert 1 not in res.masks
        np.testing.assert_array_equal(res.masks[0], [[0, 0], [2, 2]])


@pytest.mark.parametrize(("normalize", "flat"), [("max", 0.0), ("minmax", 0.0), ("minmax", 3.0)])
def test_a_flat_label_map_gets_no_pixel_and_is_reported(normalize: str, flat: float) -> None:
    maps = maps_1x4([0.0, 1.0, 0.0, 0.0], [flat] * 4)
    res = masks_of(maps, normalize=normalize, multi_reason="cam_argmax", empty_reason="empty_cam")
    assert (res.masks == 0).all()  # class 0 painted once, then filled everywhere; class 2 nowhere
    assert res.status == ["ok"] and res.reason == ["cam_argmax;empty_cam:2"]
    np.testing.assert_allclose(res.confidence[0], [[0.0, 1.0, 0.0, 0.0]])


def test_nothing_painted_falls_back_to_the_most_probable_label() -> None:
    maps = maps_1x4([2.0] * 4, [2.0] * 4)
    res = masks_of(maps, p=probs(p0=0.6, p2=0.8), normalize="minmax")
    assert (res.masks == 2).all() and (res.confidence == 0).all()
    assert res.status == ["fallback"]
    assert res.reason == ["map_argmax;empty_map:0;empty_map:2;nothing_painted"]
    np.testing.assert_array_equal(res.used_labels, LABELS_0_2.numpy())


def test_zero_and_one_label_images_use_the_label_set_rules() -> None:
    maps = maps_1x4([4.0, 2.0, 1.0, 0.0], [1.0, 1.8, 3.0, 3.0]).repeat(3, 1, 1, 1)
    p = torch.tensor([[0.1, 0.3, 0.2], [0.1, 0.2, 0.9], [0.9, 0.2, 0.7]])
    res = masks_of(maps, p=p, labels=p > 0.5)
    assert (res.masks[0] == 1).all() and (res.masks[1] == 2).all()
    assert res.reason == ["no_label_above_threshold", "single_label", "map_argmax"]
    np.testing.assert_array_equal(res.masks[2], [[0, 2, 2, 2]])
    assert (res.confidence[0] == 0).all() and (res.confidence[1] == 1).all()


@pytest.mark.parametrize("rule", ["argmax", "threshold"])
def test_maps_are_upsampled_keeping_height_and_width(rule: str) -> None:
    maps = torch.zeros(1, 3, 1, 2)
    maps[0, 0, 0, 0] = 1.0  # class 0 on the left patch
    maps[0, 2, 0, 1] = 1.0  # class 2 on the right patch
    res = masks_of(maps, out_size=(3, 8), rule=rule)
    assert res.masks.shape == (1, 3, 8) and res.confidence.shape == (1, 3, 8)
    np.testing.assert_array_equal(res.masks[0], [[0] * 4 + [2] * 4] * 3)


def test_bad_inputs_are_rejected() -> None:
    maps = maps_1x4([1.0, 0, 0, 0], [0, 0, 0, 1.0])
    with pytest.raises(ValueError, match=r"unknown mask rule 'vote'; choose from \['argmax', 'threshold', 'background'\]"):
        masks_of(maps, rule="vote")
    with pytest.raises(ValueError, match=r"maps must be \(B, C, h, w\)"):
        masks_of(maps[0])
    with pytest.raises(ValueError, match="maps have 2 classes but probs have 3"):
        class_maps_to_masks(maps[:, :2], probs(), LABELS_0_2, (1, 4))


# ---- threshold rule ----------------------------------------------------------------------------------------
# class 0: [4, 2, 0, 0], mean 1.5, foreground pixels 0-1, confidence (v - 1.5) / 2.5 = [1, 0.2, -, -]
# class 2: [0, 3, 3, 2.5], mean 2.125, foreground pixels 1-3, confidence (v - 2.125) / 0.875 = [-, 1, 1, 3/7]
THRESHOLD_MAPS = maps_1x4([4.0, 2.0, 0.0, 0.0], [0.0, 3.0, 3.0, 2.5])


def test_threshold_rule_more_probable_label_wins_overlaps() -> None:
    res = masks_of(THRESHOLD_MAPS, p=probs(p0=0.9, p2=0.7), rule="threshold", multi_reason="map_threshold")
    np.testing.assert_array_equal(res.masks[0], [[0, 0, 2, 2]])
    np.testing.assert_allclose(res.confidence[0], [[1.0, 0.2, 1.0, 3 / 7]], atol=1e-6)
    assert res.status == ["ok"] and res.reason == ["map_threshold"]

    swapped = masks_of(THRESHOLD_MAPS, p=probs(p0=0.7, p2=0.9), rule="threshold")
    np.testing.assert_array_equal(swapped.masks[0], [[0, 2, 2, 2]])
    np.testing.assert_allclose(swapped.confidence[0], [[1.0, 1.0, 1.0, 3 / 7]], atol=1e-6)


def test_threshold_rule_is_scale_invariant_and_ignores_non_labels() -> None:
    scaled = THRESHOLD_MAPS.clone()
    scaled[0, 0] *= 10.0
    scaled[0, 2] = scaled[0, 2] * 0.01 + 7.0  # a floor does not matter either
    res = masks_of(scaled, p=probs(p0=0.9, p1=0.99, p2=0.7), rule="threshold")  # class 1: not a label
    np.testing.assert_array_equal(res.masks[0], [[0, 0, 2, 2]])
    np.testing.assert_allclose(res.confidence[0], [[1.0, 0.2, 1.0, 3 / 7]], atol=1e-4)  # float32 after +7


def test_threshold_rule_fills_holes_and_reports_flat_maps() -> None:
    holes = masks_of(maps_1x4([2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]), rule="threshold")
    np.testing.assert_array_equal(holes.masks[0], [[0, 0, 2, 2]])
    np.testing.assert_allclose(holes.confidence[0], [[1.0, 0.0, 0.0, 1.0]])

    flat = masks_of(maps_1x4([0.0, 0.0, 1.0, 0.0], [4.0] * 4), rule="threshold", multi_reason="map_threshold")
    assert (flat.masks == 0).all()
    assert flat.status == ["ok"] and flat.reason == ["map_threshold;empty_map:2"]

    nothing = masks_of(maps_1x4([1.0] * 4, [0.0] * 4), rule="threshold", multi_reason="map_threshold")
    assert (nothing.masks == 0).all() and (nothing.confidence == 0).all()
    assert nothing.status == ["fallback"]
    assert nothing.reason == ["map_threshold;empty_map:0;empty_map:2;nothing_painted"]


# ---- background plane (WeakTr, VOC) -------------------------------------------------------------------------
def test_background_rule_against_a_constant_plane_by_hand() -> None:
    """Classes: 0 background, 1 and 2 foreground. Min-max maps of label 1 [0, .25, .5, 1] and label 2
    [1, .4, .0, .2] against t = 0.45: pixel 0 -> 2, pixel 1 -> background (.45 > .4 > .25), pixel 2 -> 1
    (.5 > .45), pixel 3 -> 1. Background's own map is never read, and it is a label even when not predicted."""
    maps = torch.tensor([[[[9.0, 9.0, 9.0, 9.0]], [[0.0, 1.0, 2.0, 4.0]], [[5.0, 2.0, 0.0, 1.0]]]])
    labels = torch.tensor([[False, True, True]])
    res = masks_of(maps, p=torch.tensor([[0.1, 0.9, 0.8]]), labels=labels, rule="background", normalize="minmax",
                   background_index=0, background_threshold=0.45)
    assert res.masks.tolist() == [[[2, 0, 1, 1]]]
    np.testing.assert_allclose(res.confidence[0, 0], [1.0 - 0.45, 0.45 - 0.4, 0.5 - 0.45, 1.0 - 0.45], atol=1e-6)
    # a higher threshold gives background more pixels; the one-label image is split, not painted whole
    high = masks_of(maps, p=torch.tensor([[0.1, 0.9, 0.8]]), labels=labels, rule="background",
                    normalize="minmax", background_index=0, background_threshold=0.95)
    assert high.masks.tolist() == [[[2, 0, 0, 1]]]
    one = masks_of(maps, p=torch.tensor([[0.1, 0.9, 0.2]]), labels=torch.tensor([[False, True, False]]),
                   rule="background", normalize="minmax", background_index=0, background_threshold=0.45)
    assert one.masks.tolist() == [[[0, 0, 1, 1]]]


def test_background_rule_needs_the_background_index() -> None:
    with pytest.raises(ValueError, match="background class index"):
        masks_of(maps_1x4([0, 1, 2, 3], [3, 2, 1, 0]), rule="background")
