"""Tests of the class-attention pseudomasks: class token c's attention to the patches maps class c."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weakseg.errors import ConfigError
from weakseg.methods import get_method
from weakseg.methods.class_attention import ClassAttention, class_attention_maps
from weakseg.models.vit import GatedViT, build_vit

C = 3


def class_token_model(depth: int = 3) -> GatedViT:
    """Block 0 keeps head 0 only, block 1 is fully pruned, block 2 keeps both heads."""
    torch.manual_seed(0)
    model = build_vit(img_size=(16, 24), patch_size=8, in_chans=3, embed_dim=12, depth=depth, num_heads=2,
                      num_classes=C, num_cls_tokens=C, num_register_tokens=1, head_type="per_class",
                      gate_init=1.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 and not name.endswith("log_alpha"):
                p.normal_(0, 0.3)  # a sharper, less uniform attention than the init
        model.blocks[0].attn.gate.log_alpha.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
        model.blocks[1].attn.gate.log_alpha.fill_(-1.0)
    return model.eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(1))


def rows(model: GatedViT, images: torch.Tensor, gated: bool = True) -> dict[int, torch.Tensor]:
    """Block -> (B, heads, T, h, w) class-token rows."""
    with torch.no_grad():
        out = model.forward_features(images, attention_blocks=range(model.cfg.depth), gated_maps=gated)
    return {b: out.class_token_attention(b) for b in range(model.cfg.depth)}


def test_mean_over_kept_heads_then_over_blocks_that_kept_one(images) -> None:
    model = class_token_model()
    maps = class_attention_maps(model, images, [0, 1, 2], heads="kept", combine="mean")
    assert maps.shape == (2, C, 2, 3)
    a = rows(model, images)
    expected = (a[0][:, 0] + (a[2][:, 0] + a[2][:, 1]) / 2) / 2  # block 1 has no head; head (0, 1) is pruned
    torch.testing.assert_close(maps, expected)
    only_pruned = class_attention_maps(model, images, [1], heads="kept", combine="mean")
    assert (only_pruned == 0).all()


def test_heads_all_averages_the_pre_gate_maps_of_every_head(images) -> None:
    model = class_token_model()
    maps = class_attention_maps(model, images, [0, 1, 2], heads="all", combine="mean")
    a = rows(model, images, gated=False)
    expected = sum(a[b].mean(dim=1) for b in range(3)) / 3
    torch.testing.assert_close(maps, expected)
    assert (a[1] > 0).all()  # the pruned block's pre-gate maps are real attention, and they count


def gradient_contributions(
    model: GatedViT, images: torch.Tensor, class_sets: torch.Tensor
) -> dict[int, torch.Tensor]:
    """Block -> (B, heads, T, h*w) ``max(0, A[c, p] <g_c, v_p>)``: attention x value x class gradient.

    ``g_c`` is the gradient of logit c with respect to the head's output for class token c (the input of the
    block's output projection), ``v_p`` the head's value vector of patch p (from the block's qkv projection).
    """
    depth, heads, D = model.cfg.depth, model.cfg.num_heads, model.embed_dim
    hd, P, T = D // heads, model.num_prefix_tokens, model.num_class_tokens
    values, head_out = {}, {}
    hooks = []
    for b in range(depth):
        attn = model.blocks[b].attn
        hooks.append(attn.qkv.register_forward_hook(lambda m, i, o, b=b: values.__setitem__(b, o)))
        hooks.append(attn.proj.register_forward_pre_hook(lambda m, i, b=b: head_out.__setitem__(b, i[0])))
    out = model.forward_features(images, attention_blocks=range(depth))
    logits = model.forward_head(out)
    for h in hooks:
        h.remove()
    result = {b: torch.zeros(images.shape[0], heads, T, out.patches.shape[1]) for b in range(depth)}
    for c in range(T):
        outputs = [head_out[b] for b in range(depth)]
        grads = torch.autograd.grad(logits[:, c].sum(), outputs, retain_graph=True)
        for b in range(depth):
            B, N = values[b].shape[:2]
            v = values[b].reshape(B, N, 3, heads, hd)[:, P:, 2]  # (B, h*w, heads, hd)
            g = grads[b][:, c].reshape(B, heads, hd)  # (B, heads, hd)
            a = out.attentions[b][:, :, c, P:]  # (B, heads, h*w)
            contribution = (a * torch.einsum("bphd,bhd->bhp", v, g)).clamp_min(0)
            result[b][:, :, c] = contribution.detach() * class_sets[:, c, None, None]
    return result


def test_gradient_weights_attention_by_value_times_class_gradient(images) -> None:
    model = class_token_model()
    class_sets = torch.tensor([[True, False, True], [True, True, True]])
    maps = class_attention_maps(model, images, [0, 1, 2], combine="gradient", class_sets=class_sets)
    assert maps.shape == (2, C, 2, 3) and (maps >= 0).all()
    r = gradient_contributions(model, images, class_sets)
    expected = (r[0][:, 0] + (r[2][:, 0] + r[2][:, 1]) / 2) / 2  # kept heads of the blocks that kept one
    torch.testing.assert_close(maps, expected.reshape(2, C, 2, 3), rtol=1e-4, atol=1e-7)
    assert (maps[0, 1] == 0).all()  # not requested: not differentiated
    assert (maps[class_sets].flatten(1).amax(dim=1) > 0).all()
    mean = class_attention_maps(model, images, [0, 1, 2], combine="mean")
    assert not torch.allclose(maps[class_sets], mean[class_sets])
    with torch.inference_mode():
        again = class_attention_maps(model, images.clone(), [0, 1, 2], class_sets=class_sets)  # gradient
    torch.testing.assert_close(again, maps)


def test_a_class_no_head_feeds_has_an_empty_gradient_map(images) -> None:
    model = class_token_model()
    with torch.no_grad():
        model.head.weight[1] = 0.0  # logit 1 = its bias: no patch raises class 1
    maps = class_attention_maps(model, images, [0, 1, 2], combine="gradient")
    assert (maps[:, 1] == 0).all() and (maps[:, 0] > 0).any()


def test_pre_gate_maps_only_go_with_the_mean(images) -> None:
    with pytest.raises(ConfigError, match="--heads all .* only goes with --combine mean"):
        class_attention_maps(class_token_model(), images, [0], heads="all", combine="gradient")


@pytest.mark.parametrize("kwargs", [{"combine": "relevance"}, {"heads": "open"}])
def test_unknown_combine_or_heads_values_are_refused(images, kwargs) -> None:
    with pytest.raises((ValueError, ConfigError), match=next(iter(kwargs))):
        class_attention_maps(class_token_model(), images, [0, 1, 2], **kwargs)


def test_maps_leave_the_model_alone(images) -> None:
    model = class_token_model().train()
    class_attention_maps(model, images, [0, 2], combine="gradient")
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_check_model_refuses_a_one_cls_classifier_and_names_the_checkpoint() -> None:
    method = ClassAttention()
    one_cls = build_vit(img_size=(16, 16), patch_size=8, in_chans=3, embed_dim=12, depth=2, num_heads=2,
                        num_classes=C)
    with pytest.raises(ConfigError, match=r"checkpoint runs/x/last\.ckpt is a 'vit' classifier.*"
                                          r"train one with `weakseg train --arch class_tokens`"):
        method.check_model(one_cls, "runs/x/last.ckpt")
    method.check_model(class_token_model(), "runs/y/last.ckpt")  # no error


@pytest.mark.parametrize(
    ("rule", "reason"), [("argmax", "class_attention_argmax"), ("threshold", "map_threshold")]
)
def test_pseudomasks_place_the_labels_of_each_image(images, rule: str, reason: str) -> None:
    model = class_token_model()
    method = get_method("class_attention", rule=rule)  # default combine: gradient
    probs = torch.tensor([[0.9, 0.2, 0.7], [0.1, 0.8, 0.3]])
    res = method.pseudomasks(model, images, probs, probs > 0.5, (8, 12))
    assert res.masks.shape == (2, 8, 12) and res.confidence.shape == (2, 8, 12)
    assert set(np.unique(res.masks[0])) <= {0, 2} and (res.masks[1] == 1).all()
    assert res.reason[0].split(";")[0] == reason and res.reason[1] == "single_label"
    assert ((res.confidence >= 0) & (res.confidence <= 1)).all()


def test_released_threshold_rule_paints_labels_in_ascending_probability(images, monkeypatch) -> None:
    """``--rule threshold`` (as released): each label's map above its own mean; where foregrounds overlap the
    most probable label wins. Three labels in a cyclic probability order (not a swap of two), so a probability
    order taken from argsort instead of the ranks paints the wrong label."""
    maps = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0],   # label 0: foreground 0-3
                         [0.0, 1.0, 1.0, 0.0, 0.0, 0.0],   # label 1: foreground 1-2
                         [0.0, 0.0, 1.0, 1.0, 0.8, 1.0]])  # label 2: foreground 2-5 (mean 0.633)
    method = get_method("class_attention", rule="threshold", combine="mean", heads="all")
    hand_maps = maps[None, :, None, :].expand(2, -1, -1, -1)  # (B=2, C=3, h=1, w=6)
    monkeypatch.setattr(method, "class_maps", lambda model, x, label_sets: hand_maps)
    probs = torch.tensor([[0.7, 0.9, 0.6], [0.9, 0.6, 0.7]])  # image 0: 1 > 0 > 2; image 1: 0 > 2 > 1
    res = method.pseudomasks(None, images, probs, probs > 0.5, (1, 6))
    np.testing.assert_array_equal(res.masks[0, 0], [0, 1, 1, 0, 2, 2])
    np.testing.assert_array_equal(res.masks[1, 0], [0, 0, 0, 0, 2, 2])
    assert res.reason == ["map_threshold", "map_threshold"]
    # confidence: how far above its own mean the winning map is, relative to its maximum
    weak = (0.8 - 3.8 / 6) / (1 - 3.8 / 6)
    np.testing.assert_allclose(res.confidence[0, 0], [1, 1, 1, 1, weak, 1], rtol=1e-5)
