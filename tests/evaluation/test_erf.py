"""Effective receptive fields (weakseg.evaluation.erf): the known shapes of Luo et al.'s ERF on small networks."""

import numpy as np
import pytest
import torch

from weakseg.evaluation.erf import (
    OUTPUT,
    effective_receptive_fields,
    erf_candidates,
    mass_radius,
    normalise_map,
    pick_evenly,
)
from weakseg.models.unet import UNet
from weakseg.models.vit import build_vit


def _vit(**kw):
    torch.manual_seed(0)
    return build_vit(img_size=32, patch_size=8, in_chans=3, embed_dim=24, depth=2, num_heads=4, **kw)


def test_patch_embedding_erf_is_exactly_the_centre_patch():
    model = _vit()
    layers = erf_candidates(model)
    assert [layer.name for layer in layers] == ["patch embedding", "block 0", "block 1"]
    maps = effective_receptive_fields(model, [torch.randn(3, 3, 32, 48)], layers[:1])
    m = maps["patch embedding"]
    assert m.shape == (32, 48)
    # grid 4 x 6: centre patch (2, 3) covers rows 16..23 and columns 24..31
    inside = np.zeros_like(m, dtype=bool)
    inside[16:24, 24:32] = True
    assert (m[inside] > 0).all()
    assert (m[~inside] == 0).all()


def test_erf_after_a_block_spreads_beyond_the_patch():
    model = _vit(gated=False)
    layers = erf_candidates(model)
    maps = effective_receptive_fields(model, [torch.randn(2, 3, 32, 32)], layers)
    block = maps["block 0"]
    outside = np.ones_like(block, dtype=bool)
    outside[16:24, 16:24] = False
    assert (block[outside] > 0).mean() > 0.9  # global attention: every patch reaches the centre token
    assert mass_radius(block) > mass_radius(maps["patch embedding"])


def test_running_mean_does_not_depend_on_the_batches():
    model = _vit(gated=False)
    layers = erf_candidates(model)[1:2]
    x = torch.randn(4, 3, 32, 32)
    one = effective_receptive_fields(model, [x], layers)["block 0"]
    uneven = effective_receptive_fields(model, list(x.split(3)), layers)["block 0"]  # batches of 3 and 1
    np.testing.assert_allclose(uneven, one, rtol=1e-5, atol=1e-12)


def test_unet_erf_is_centred_and_grows_with_depth():
    torch.manual_seed(0)
    model = UNet(3, 4, widths=(8, 16, 32))
    layers = erf_candidates(model)
    assert [layer.name for layer in layers] == ["stem", "encoder 1", "encoder 2", "decoder 1", "decoder 2", OUTPUT]
    maps = effective_receptive_fields(model, [torch.randn(4, 3, 32, 32)], layers)
    stem = maps["stem"]
    support = np.argwhere(stem > 0)
    # two 3x3 convolutions: exactly the 5x5 window around the centre pixel (16, 16)
    assert support.min(axis=0).tolist() == [14, 14] and support.max(axis=0).tolist() == [18, 18]
    for name in ("encoder 2", OUTPUT):
        m = maps[name]
        yy, xx = np.mgrid[: m.shape[0], : m.shape[1]]
        centroid = np.array([(yy * m).sum(), (xx * m).sum()]) / m.sum()
        assert np.abs(centroid - 16).max() < 2.5, (name, centroid)
    assert mass_radius(maps["encoder 2"]) > mass_radius(maps["encoder 1"]) > mass_radius(stem)


def test_the_pass_leaves_the_model_as_it_was():
    model = _vit(gated=False).train()
    effective_receptive_fields(model, [torch.randn(1, 3, 32, 32)], erf_candidates(model))
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_pick_evenly_includes_the_first_and_the_last():
    items = list(range(13))
    assert pick_evenly(items, 4) == [0, 4, 8, 12]
    assert pick_evenly(items, 1) == [12]
    assert pick_evenly(items, 20) == items
    assert pick_evenly(items, 2) == [0, 12]


def test_normalise_and_radius():
    m = np.zeros((5, 5))
    assert (normalise_map(m) == 0).all() and mass_radius(m) == 0.0
    m[2, 2] = 4.0
    m[2, 3] = 2.0
    n = normalise_map(m)
    assert n.max() == 1.0 and n.min() == 0.0 and n[2, 3] == 0.5
    assert mass_radius(m, 0.5) == 0.0 and mass_radius(m, 0.9) == 1.0


def test_unknown_network_is_a_config_error():
    from weakseg.errors import ConfigError

    with pytest.raises(ConfigError, match="no ERF layers"):
        erf_candidates(torch.nn.Linear(2, 2))


def test_log_map_keeps_four_decades():
    from weakseg.evaluation.erf import log_map

    m = np.array([[1.0, 1e-2], [1e-6, 0.0]])
    np.testing.assert_allclose(log_map(m), [[1.0, 0.5], [0.0, 0.0]])
