"""Multi-scale + flip inference shared by the class-map methods (WeakTr's CAM inference)."""

from __future__ import annotations

import pytest
import torch

from weakseg.errors import ConfigError
from weakseg.methods import get_method
from weakseg.methods.base import multiscale_class_maps, parse_scales
from weakseg.models.vit import GatedViT, ViTConfig


def _model(**kw) -> GatedViT:
    torch.manual_seed(0)
    cfg = dict(img_size=(16, 16), patch_size=4, in_chans=3, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    from weakseg.models.architectures import build_classifier

    return build_classifier(ViTConfig(**{**cfg, **kw})).eval()


def test_parse_scales():
    assert parse_scales("1") == [1.0] and parse_scales("1, 1.5") == [1.0, 1.5]
    for bad in ("", "1,x", "0", "1,1", "-1"):
        with pytest.raises(ConfigError, match="--scales"):
            parse_scales(bad)
    with pytest.raises(ConfigError, match="--scales"):
        get_method("gradcam", scales="1,,a")


def test_views_are_summed_at_the_output_size_and_flips_are_undone():
    model = _model()
    calls = []

    def maps_of(m, x, label_sets):
        calls.append(tuple(x.shape[-2:]))
        return x[:, :2, ::4, ::4]  # (B, 2, h, w) on the patch grid of this view

    ones = torch.ones(1, 3, 16, 16)
    total = multiscale_class_maps(maps_of, model, ones, None, [1.0, 1.5, 2.0], flip=True, out_size=(20, 20))
    assert calls == [(16, 16), (16, 16), (24, 24), (24, 24), (32, 32), (32, 32)]  # sides in whole patches
    torch.testing.assert_close(total, torch.full((1, 2, 20, 20), 6.0))  # six views of a constant map
    # flip on: the merged maps of a mirrored image are the mirrored maps (each view pairs with its flip)
    x = torch.rand(2, 3, 16, 16)
    a = multiscale_class_maps(maps_of, model, x, None, [1.0, 1.25], flip=True, out_size=(16, 16))
    b = multiscale_class_maps(maps_of, model, x.flip(-1), None, [1.0, 1.25], flip=True, out_size=(16, 16))
    torch.testing.assert_close(b, a.flip(-1))


@pytest.mark.parametrize("method,arch", [("gradcam", {}), ("class_attention", {"num_cls_tokens": 3,
                                                                              "head_type": "per_class"}),
                                         ("weaktr", {"num_cls_tokens": 3, "head_type": "mean", "aaf": "v2",
                                                     "final_norm": False})])
def test_methods_run_at_several_scales_with_flip(method, arch):
    model = _model(**arch)
    images = torch.rand(2, 3, 16, 16)
    probs = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.9, 0.7]])
    labels = probs > 0.5
    single = get_method(method).pseudomasks(model, images, probs, labels, (24, 24))
    multi = get_method(method, scales="1,1.5", flip="on").pseudomasks(model, images, probs, labels, (24, 24))
    assert multi.masks.shape == single.masks.shape == (2, 24, 24)
    for b in range(2):  # only the image's labels appear
        assert set(multi.masks[b].flatten().tolist()) <= set(torch.nonzero(labels[b]).flatten().tolist())
