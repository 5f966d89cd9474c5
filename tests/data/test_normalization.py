import numpy as np
import pytest
import torch

from weakseg.data.normalization import Normalize, compute_band_stats
from weakseg.errors import ConfigError


def test_per_image_max_divides_each_channel_by_its_maximum():
    image = torch.tensor([[[1.0, 2.0], [4.0, 0.0]], [[0.5, 0.25], [0.0, 0.0]]])
    out = Normalize("per_image_max")({"image": image})["image"]
    assert torch.allclose(out[0], image[0] / (4 + 1e-5)) and torch.allclose(out[1], image[1] / (0.5 + 1e-5))


def test_standardize_with_band_stats_and_errors():
    class Reader:
        def __len__(self):
            return 2

        def read_image(self, i):
            return np.stack([np.full((2, 2), 1.0 + 2 * i), np.full((2, 2), 5.0)]).astype(np.float32)

    mean, std = compute_band_stats(Reader())
    assert mean == pytest.approx([2.0, 5.0]) and std == pytest.approx([1.0, 0.0])
    out = Normalize("standardize", mean, std)({"image": torch.tensor(Reader().read_image(1))})["image"]
    assert torch.allclose(out[0], torch.ones(2, 2))
    with pytest.raises(ConfigError, match="needs per-band mean and std"):
        Normalize("standardize")
    with pytest.raises(ConfigError, match="unknown normalization 'zscore'"):
        Normalize("zscore")
    with pytest.raises(ConfigError, match="2 bands but the image has 3"):
        Normalize("standardize", mean, std)({"image": torch.zeros(3, 2, 2)})
