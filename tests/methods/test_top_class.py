"""Tests of the top-class floor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weakseg.errors import ConfigError
from weakseg.methods.top_class import top_class_pseudomasks


def test_every_pixel_is_the_most_probable_class() -> None:
    probs = torch.tensor([[0.1, 0.8, 0.6], [0.3, 0.2, 0.4]])
    result = top_class_pseudomasks(probs, (3, 5))
    assert result.masks.shape == (2, 3, 5) and result.masks.dtype == np.uint8
    assert (result.masks[0] == 1).all() and (result.masks[1] == 2).all()
    assert result.status == ["ok", "ok"] and result.reason == ["top_class", "top_class"]
    np.testing.assert_array_equal(result.used_labels, [[False, True, False], [False, False, True]])


def test_label_set_restricts_the_choice_unless_empty() -> None:
    probs = torch.tensor([[0.1, 0.8, 0.6], [0.3, 0.2, 0.4]])
    oracle = torch.tensor([[True, False, True], [False, False, False]])
    result = top_class_pseudomasks(probs, (2, 2), oracle)
    assert (result.masks[0] == 2).all()  # 1 is more probable but not a ground-truth label
    assert (result.masks[1] == 2).all()  # empty set: overall top class


def test_bad_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="pseudomask size"):
        top_class_pseudomasks(torch.rand(1, 3), (4,))
