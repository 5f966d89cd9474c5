"""Tests of PseudomaskResult, the shared label-set rules and the exact nearest fill."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weakseg.errors import ConfigError
from weakseg.masks import PseudomaskResult, check_out_size, constant_masks, label_set_rules, nearest_fill


def result(n: int, reason: str, status: str = "ok", regions: bool = False, k: int = 2) -> PseudomaskResult:
    """A hand-made result of ``n`` 4x4 images, mask value = image index, confidence = 0.5."""
    masks = np.stack([np.full((4, 4), i, np.uint8) for i in range(n)])
    return PseudomaskResult(
        masks=masks, status=[status] * n, reason=[reason] * n, used_labels=np.zeros((n, 8), bool),
        confidence=np.full((n, 4, 4), 0.5, np.float32),
        regions=np.zeros((n, 4, 4), np.int16) if regions else None,
        region_class=np.arange(n * k).reshape(n, k) if regions else None,
    )


# ---- nearest fill ------------------------------------------------------------------------------------------
def test_nearest_fill_matches_brute_force_distances() -> None:
    rng = np.random.default_rng(0)
    labels = np.where(rng.random((3, 9, 13)) < 0.15, rng.integers(0, 5, (3, 9, 13)), -1)
    labels[:, 0, 0] = 2  # at least one assigned pixel per image
    filled = nearest_fill(labels)
    for b in range(3):
        have = np.argwhere(labels[b] >= 0)
        np.testing.assert_array_equal(filled[b][labels[b] >= 0], labels[b][labels[b] >= 0])
        for y, x in np.argwhere(labels[b] < 0):
            d = np.hypot(have[:, 0] - y, have[:, 1] - x)
            nearest = {int(labels[b][tuple(p)]) for p in have[np.isclose(d, d.min())]}
            assert filled[b, y, x] in nearest
    with pytest.raises(ValueError, match="no assigned pixel"):
        nearest_fill(np.full((1, 3, 3), -1))


def test_nearest_fill_of_one_image_keeps_shape_dtype_and_input() -> None:
    labels = np.array([[3, -1, -1, -1, 7]], dtype=np.int16)
    filled = nearest_fill(labels)
    assert filled.shape == (1, 5) and filled.dtype == np.int16
    assert filled[0, 1] == 3 and filled[0, 3] == 7 and filled[0, 2] in (3, 7)
    assert labels[0, 1] == -1  # the input is not modified


# ---- the result --------------------------------------------------------------------------------------------
def test_result_concatenates_and_counts_reasons() -> None:
    a = result(1, "clustered")
    b = result(1, "no_label_above_threshold", status="fallback")
    joined = PseudomaskResult.concatenate([a, b])
    assert joined.masks.shape == (2, 4, 4) and len(joined) == 2
    assert joined.reason_counts() == {"clustered": 1, "no_label_above_threshold": 1}
    assert joined.status_counts() == {"fallback": 1, "ok": 1}
    assert joined.regions is None and joined.region_class is None


def test_reason_counts_count_every_token_once_per_image() -> None:
    reasons = ["clustered;empty_foreground:7", "clustered", "clustered;empty_foreground:2;nothing_painted"]
    r = PseudomaskResult(np.zeros((3, 1, 1), np.uint8), ["ok", "ok", "fallback"], reasons,
                         np.zeros((3, 8), bool))
    assert r.reason_counts() == {"clustered": 3, "empty_foreground:2": 1, "empty_foreground:7": 1,
                                 "nothing_painted": 1}
    assert r.confidence.shape == (3, 1, 1) and (r.confidence == 1).all()  # default confidence: 1


def test_concatenate_keeps_order_confidence_and_pads_region_classes() -> None:
    a = result(1, "clustered", regions=True, k=2)
    b = result(2, "clustered", regions=True, k=3)
    b.regions[1, 0, 0] = 2
    b.confidence[1] = 0.25
    joined = PseudomaskResult.concatenate([a, b])
    np.testing.assert_array_equal(joined.masks[:, 0, 0], [0, 0, 1])
    np.testing.assert_array_equal(joined.confidence[:, 0, 0], [0.5, 0.5, 0.25])
    assert joined.regions.shape == (3, 4, 4) and joined.regions[2, 0, 0] == 2
    np.testing.assert_array_equal(joined.region_class, [[0, 1, -1], [0, 1, 2], [3, 4, 5]])
    without = PseudomaskResult.concatenate([a, result(1, "single_label")])  # one without regions: dropped
    assert without.regions is None and without.region_class is None and len(without) == 2
    with pytest.raises(ValueError, match="at least one result"):
        PseudomaskResult.concatenate([])


# ---- the label-set rules -----------------------------------------------------------------------------------
def test_label_set_rules_for_zero_one_and_more_labels() -> None:
    probs = torch.tensor([[0.1, 0.3, 0.2, 0.4], [0.1, 0.6, 0.2, 0.9], [0.6, 0.1, 0.2, 0.8]])
    labels = torch.tensor([[False] * 4, [False, True, False, False], [True, False, False, True]])
    res, multi = label_set_rules(probs, labels, (2, 3), "my_rule")
    assert multi == [2]
    assert res.masks.shape == (3, 2, 3) and res.masks.dtype == np.uint8
    np.testing.assert_array_equal(res.masks[:, 0, 0], [3, 1, 3])  # top class; the single label; the top label
    assert all((m == m[0, 0]).all() for m in res.masks)
    assert res.status == ["fallback", "ok", "ok"]
    assert res.reason == ["no_label_above_threshold", "single_label", "my_rule"]
    np.testing.assert_array_equal(res.confidence[:, 0, 0], [0.0, 1.0, 0.0])
    assert all((c == c[0, 0]).all() for c in res.confidence)
    np.testing.assert_array_equal(res.used_labels, [[False, False, False, True], *labels[1:].tolist()])
    assert labels[0].sum() == 0  # the caller's label sets are not modified


def test_label_set_rules_check_the_inputs() -> None:
    probs = torch.rand(2, 3)
    with pytest.raises(ConfigError, match="pseudomask size"):
        label_set_rules(probs, probs > 0.5, (4, 0), "x")
    with pytest.raises(ValueError, match="bool"):
        label_set_rules(probs, (probs > 0.5).float(), (4, 4), "x")


def test_out_size_and_constant_masks() -> None:
    assert check_out_size([3, 5]) == (3, 5)
    with pytest.raises(ConfigError, match=r"two positive integers \(height, width\), got \[3\]"):
        check_out_size([3])
    masks = constant_masks(torch.tensor([2, 7]), (2, 3))
    assert masks.dtype == np.uint8 and masks.shape == (2, 2, 3)
    assert (masks[0] == 2).all() and (masks[1] == 7).all()
    masks[0, 0, 0] = 5  # writable, not a broadcast view
    assert masks[0, 0, 1] == 2
