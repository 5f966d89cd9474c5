import pytest
import torch

from weakseg.errors import ConfigError
from weakseg.models.vit import GatedViT, ViTConfig, build_vit

TINY = dict(embed_dim=24, depth=2, num_heads=4, mlp_ratio=2.0, patch_size=4)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(img_size=(16, 24), in_chans=13),
        dict(img_size=(16, 16), in_chans=15, s1_chans=2, fusion="sum"),
        dict(img_size=(16, 16), in_chans=15, s1_chans=2, fusion="concat"),
        dict(img_size=(16, 16), in_chans=13, num_cls_tokens=8, num_register_tokens=1),
        dict(img_size=(16, 16), in_chans=13, gated=False),
    ],
)
def test_contract_shapes(kwargs):
    model = build_vit(**TINY, **kwargs).eval()
    x = torch.randn(2, kwargs["in_chans"], *kwargs["img_size"])
    out = model.forward_features(x, attention_blocks=[0, -1])
    h, w = kwargs["img_size"][0] // 4, kwargs["img_size"][1] // 4
    P = model.num_prefix_tokens
    assert out.prefix.shape == (2, P, 24)
    assert out.patches.shape == (2, h * w, 24)
    assert out.patch_grid().shape == (2, 24, h, w)
    assert set(out.attentions) == {0, 1}
    assert out.attentions[1].shape == (2, 4, P + h * w, P + h * w)
    assert out.cls_to_patch_attention(1).shape == (2, 4, h, w)
    assert model.forward_head(out).shape == (2, 8)
    assert model.forward_head(out, pre_logits=True).shape == (2, 24)
    assert torch.isfinite(model(x)).all()


def test_patch_grid_is_row_major_over_height_and_width():
    # Non-square input: the grid must be (h, w) = (4, 6), not swapped (defect 15 of the original).
    model = build_vit(**TINY, img_size=(16, 24), in_chans=3).eval()
    out = model.forward_features(torch.randn(1, 3, 16, 24))
    grid = out.patch_grid()
    assert grid.shape[-2:] == (4, 6)
    assert torch.equal(grid[0, :, 1, 2], out.patches[0, 1 * 6 + 2])


def test_fused_and_explicit_attention_agree_and_maps_only_where_asked():
    torch.manual_seed(0)
    model = build_vit(**TINY, img_size=(16, 16), in_chans=13).eval()
    x = torch.randn(2, 13, 16, 16)
    fused = model(x)
    model.set_attention_impl("explicit")
    explicit = model(x)
    assert torch.allclose(fused, explicit, atol=1e-5)
    model.set_attention_impl("fused")
    assert model.forward_features(x).attentions == {}
    assert set(model.forward_features(x, attention_blocks=[-1]).attentions) == {1}


def test_pruned_heads_have_zero_attention_and_no_influence():
    torch.manual_seed(0)
    model = build_vit(**TINY, img_size=(16, 16), in_chans=13).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.gate.log_alpha.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 4, 1, 1))
    x = torch.randn(2, 13, 16, 16)
    attn = model.forward_features(x, attention_blocks=[-1]).attentions[1]
    assert attn[:, [1, 3]].abs().max() == 0
    assert torch.allclose(attn[:, [0, 2]].sum(-1), torch.ones(2, 2, 17), atol=1e-5)
    assert model.head_mask().tolist() == [[True, False, True, False]] * 2
    assert model.pruned_heads_per_layer() == [2, 2]
    assert model.pruned_fraction() == 0.5
    before = model(x)
    with torch.no_grad():  # change the value weights of pruned head 1 only
        model.blocks[0].attn.qkv.weight[2 * 24 + 6 : 2 * 24 + 12] += 5.0
    assert torch.allclose(model(x), before, atol=1e-6)


def test_every_parameter_gets_a_gradient_in_training():
    torch.manual_seed(0)
    model = build_vit(**TINY, img_size=(16, 16), in_chans=15, s1_chans=2, fusion="sum").train()
    with torch.no_grad():
        for g in model.gates:
            g.log_alpha.fill_(0.0)  # s near 0.5: clamp not saturated, gradient flows
    loss = model(torch.randn(4, 15, 16, 16)).sum() + model.l0_penalty()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_no_weight_decay_covers_gates_and_embeddings():
    model = build_vit(**TINY, img_size=(16, 16), in_chans=13)
    nwd = model.no_weight_decay()
    assert "blocks.0.attn.gate.log_alpha" in nwd and "pos_embed" in nwd and "cls_token" in nwd
    assert "blocks.0.attn.qkv.weight" not in nwd


def test_ungated_model_reports_all_heads_kept():
    model = build_vit(**TINY, img_size=(16, 16), in_chans=13, gated=False)
    assert model.gates == [] and model.pruned_fraction() == 0.0


def test_bad_configuration_errors_name_the_setting():
    with pytest.raises(ConfigError, match="100x100 is not divisible by patch size 14"):
        ViTConfig(img_size=(100, 100), patch_size=14)
    with pytest.raises(ConfigError, match="224x224 is not divisible by patch size 12"):
        ViTConfig(img_size=(224, 224), patch_size=12)  # the original CLI default
    with pytest.raises(ConfigError, match="num_heads"):
        ViTConfig(embed_dim=10, num_heads=3)
    model = GatedViT(ViTConfig(**TINY, img_size=(16, 16), in_chans=13))
    with pytest.raises(ConfigError, match="expects 13 input channels, got 3"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="expects 16x16 inputs, got 32x16"):
        model(torch.randn(1, 13, 32, 16))
