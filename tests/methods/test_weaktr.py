"""``--method weaktr``: the CAMs it reads, its defaults, the background rule choice and the architectures."""

from __future__ import annotations

import pytest
import torch

from weakseg.errors import ConfigError
from weakseg.methods import get_method
from weakseg.methods.weaktr import weaktr_cams
from weakseg.models.architectures import get_architecture
from weakseg.models.vit import ViTConfig, build_vit
from weakseg.models.architectures import build_classifier

C = 3


def weaktr_model():
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=(16, 16), patch_size=4, in_chans=3, embed_dim=16, depth=2, num_heads=4,
                    num_classes=C, final_norm=False, gated=False, **get_architecture("weaktr").model_fields(C))
    return build_classifier(cfg).eval()


def test_defaults_are_weaktr_v2_voc_inference() -> None:
    m = get_method("weaktr")
    o = m.options
    assert (o.cam, o.rule, o.normalize, o.scales, o.flip, o.background_threshold) == \
        ("fused", "auto", "minmax", "1,1.2", "on", 0.43)


def test_cams_are_the_model_maps_restricted_to_the_labels() -> None:
    model = weaktr_model()
    x = torch.rand(2, 3, 16, 16)
    out = model.forward_features(x, attention_blocks=range(2), attention_outputs=True)
    maps = model.weaktr_maps(out)
    torch.testing.assert_close(weaktr_cams(model, x, "fine"), maps["fine_cam"])
    torch.testing.assert_close(weaktr_cams(model, x, "fused"), maps["fused_cam"])
    torch.testing.assert_close(weaktr_cams(model, x, "coarse"), maps["coarse_logits"].clamp_min(0))
    labels = torch.tensor([[True, False, True], [False, True, False]])
    got = get_method("weaktr").class_maps(model, x, labels)
    torch.testing.assert_close(got, maps["fused_cam"] * labels[:, :, None, None])  # the default CAM
    fine = get_method("weaktr", cam="fine").class_maps(model, x, labels)
    torch.testing.assert_close(fine, maps["fine_cam"] * labels[:, :, None, None])


def test_auto_rule_is_background_only_where_the_data_has_one() -> None:
    model = weaktr_model()
    x = torch.rand(2, 3, 16, 16)
    probs = torch.tensor([[0.1, 0.9, 0.8], [0.9, 0.9, 0.2]])
    labels = probs > 0.5
    m = get_method("weaktr", scales="1", flip="off")
    m.bind_dataset(["a", "b", "c"], None)
    assert m.resolved_rule() == "argmax"
    land = m.pseudomasks(model, x, probs, labels, (20, 20))
    assert set(land.masks[0].flatten().tolist()) <= {1, 2}
    m.bind_dataset(["background", "b", "c"], 0)
    assert m.resolved_rule() == "background"
    voc = m.pseudomasks(model, x, probs, labels, (20, 20))
    assert voc.reason == ["map_background", "map_background"]
    assert set(voc.masks[1].flatten().tolist()) <= {0, 1}  # one foreground label: split against the plane
    with pytest.raises(ConfigError, match="--rule background needs a dataset with a background class"):
        get_method("gradcam", rule="background").bind_dataset(["a", "b", "c"], None)


def test_threshold_out_of_range_is_refused() -> None:
    with pytest.raises(ConfigError, match="--background_threshold must be in"):
        get_method("weaktr", background_threshold=1.5)


def test_weaktr_needs_a_weaktr_classifier_and_others_read_it() -> None:
    small = dict(img_size=(16, 16), patch_size=4, in_chans=3, embed_dim=16, depth=2, num_heads=4, num_classes=C)
    tokens = build_vit(**small, num_cls_tokens=C, head_type="per_class")
    with pytest.raises(ConfigError, match="--method weaktr needs a classifier with architecture weaktr.*"
                                          "weakseg train --arch weaktr"):
        get_method("weaktr").check_model(tokens, "b.ckpt")
    model = weaktr_model()
    for name in ("weaktr", "class_attention", "gradcam", "top_class"):
        get_method(name).check_model(model, "w.ckpt")


def test_head_weights_are_the_mean_aaf_weights() -> None:
    model = weaktr_model()
    x = torch.rand(3, 3, 16, 16)
    out = model.forward_features(x, attention_blocks=range(2), attention_outputs=True)
    expected = model.weaktr_maps(out)["weights"].mean(dim=0)
    got = get_method("weaktr").head_weights(model, x)
    assert got.shape == (2, 4)
    torch.testing.assert_close(got, expected)
    assert get_method("gradcam").head_weights(model, x) is None
