"""Dense CRF post-processing: borders snap to colour edges, only the mask's classes, unlabelled stays unlabelled."""

import builtins

import numpy as np
import pytest

from weakseg.errors import ConfigError
from weakseg.masks.crf import CRFSettings, crf_image, crf_refine, require_crf

pytest.importorskip("pydensecrf.densecrf", reason="the crf extra (pydensecrf2) is part of the test extra")


def _two_halves(border: int = 16, size: int = 32) -> np.ndarray:
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[:, border:] = (200, 180, 40)
    return rgb


def test_a_misplaced_border_moves_to_the_colour_edge():
    mask = np.full((32, 32), 3, np.uint8)
    mask[:, 10:] = 6  # the colour edge is at column 16: columns 10-15 are wrong
    out = crf_refine(mask, _two_halves())
    assert out.dtype == np.uint8 and set(np.unique(out)) == {3, 6}  # the mask's ids, not 0..n-1
    assert (out[:, :16] == 3).mean() > 0.95 and (out[:, 16:] == 6).mean() > 0.95
    assert (mask[:, :16] == 3).mean() == pytest.approx(10 / 16)  # before: 6 of 16 columns wrong


def test_unlabelled_pixels_stay_unlabelled_and_give_no_evidence():
    mask = np.full((32, 32), 0, np.uint8)
    mask[:, 16:] = 1
    mask[:4, :] = 255
    out, confidence = crf_refine(mask, _two_halves(), return_confidence=True)
    assert (out[:4] == 255).all() and (confidence[:4] == 0).all()
    assert (out[4:, :16] == 0).all() and (out[4:, 16:] == 1).all()
    assert confidence.dtype == np.float32 and 0.5 < confidence[4:].min() <= confidence[4:].max() <= 1.0


def test_a_single_class_mask_is_returned_unchanged():
    mask = np.full((8, 8), 2, np.uint8)
    mask[0, 0] = 255
    out, confidence = crf_refine(mask, _two_halves(4, 8), return_confidence=True)
    assert np.array_equal(out, mask) and confidence is None


def test_without_a_colour_edge_the_larger_class_absorbs_the_smaller():
    # The same mask on a flat image: the bilateral kernel (83 px, wider than the tile) sees one colour everywhere,
    # so nothing holds the border and the majority class (22 of 32 columns) takes the tile; with the edge it holds.
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 10:] = 1
    assert (crf_refine(mask, np.full((32, 32, 3), 90, np.uint8)) == 1).all()
    held = crf_refine(mask, _two_halves(10))
    assert (held == mask).all()


def test_multispectral_tiles_are_seen_through_a_true_colour_composite():
    image = np.zeros((13, 6, 6), np.float32)
    image[3, :, 3:] = 0.3  # B04 (red) bright on the right half
    rgb = crf_image(image)
    assert rgb.shape == (6, 6, 3) and rgb.dtype == np.uint8
    assert rgb[:, 3:, 0].min() > rgb[:, :3, 0].max()  # red channel follows B04
    nan_tile = np.full((3, 4, 4), np.nan, np.float32)
    assert crf_image(nan_tile).shape == (4, 4, 3)  # no data does not break the composite


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="gt_prob must be in"):
        CRFSettings(gt_prob=1.0)
    with pytest.raises(ConfigError, match="iterations must be at least 1"):
        CRFSettings(iterations=0)


def test_missing_extra_names_it(monkeypatch):
    real_import = builtins.__import__

    def no_crf(name, *args, **kwargs):
        if name.startswith("pydensecrf"):
            raise ImportError("No module named 'pydensecrf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_crf)
    with pytest.raises(ConfigError, match=r"pip install 'weakseg\[crf\]'"):
        require_crf()
