"""Tests of image label sets: predicted and oracle labels, the top class, labels ordered by probability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weakseg.masks import (
    check_label_inputs,
    oracle_label_sets,
    predicted_label_sets,
    sort_labels_by_probability,
    top_class,
)


def test_predicted_labels_are_strictly_above_half() -> None:
    probs = torch.tensor([[0.5, 0.5001, 0.2]])
    np.testing.assert_array_equal(predicted_label_sets(probs).numpy(), [[False, True, False]])
    np.testing.assert_array_equal(predicted_label_sets(probs, threshold=0.1).numpy(), [[True, True, True]])
    np.testing.assert_array_equal(predicted_label_sets(probs, threshold=0.2).numpy(), [[True, True, False]])


def test_oracle_labels_come_from_the_multi_hot_targets() -> None:
    targets = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    labels = oracle_label_sets(targets)
    assert labels.dtype == torch.bool
    np.testing.assert_array_equal(labels.numpy(), [[False, True, False, True], [False] * 4])


def test_top_class_is_the_most_probable_label_or_class_without_labels() -> None:
    probs = torch.tensor([[0.9, 0.6, 0.7], [0.9, 0.6, 0.7], [0.1, 0.3, 0.2]])
    labels = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    assert top_class(probs, labels).tolist() == [2, 0, 0]  # a label beats a more probable non-label
    assert top_class(probs).tolist() == [0, 0, 1]


def test_labels_sorted_by_descending_probability_ties_lower_id_first() -> None:
    probs = torch.tensor([[0.6, 0.9, 0.1, 0.6, 0.8]])
    labels = torch.tensor([[True, True, False, True, False]])
    order = sort_labels_by_probability(probs, labels)
    assert order.shape == (1, 5)
    assert order[0, :3].tolist() == [1, 0, 3]  # 0.9, then the 0.6 tie by id; non-label 4 (0.8) comes after


def test_check_label_inputs_rejects_wrong_shapes_and_types() -> None:
    probs = torch.rand(2, 3)
    check_label_inputs(probs, probs > 0.5, batch=2)
    with pytest.raises(ValueError, match=r"must both be \(B, C\); got \(2, 3\) and \(2, 4\)"):
        check_label_inputs(probs, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be a bool tensor"):
        check_label_inputs(probs, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="probs cover 2 images but the maps cover 3"):
        check_label_inputs(probs, probs > 0.5, batch=3)
    with pytest.raises(ValueError, match="at most 255 classes"):
        check_label_inputs(torch.rand(1, 256), torch.zeros(1, 256, dtype=torch.bool))
