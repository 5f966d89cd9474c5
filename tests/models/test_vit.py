import pytest
import torch
import torch.nn.functional as F

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


# ---- class tokens, head types and the backbone contract's new parts ----------------------------------------
SMALL = dict(img_size=(16, 24), patch_size=8, in_chans=3, embed_dim=12, depth=2, num_heads=2, num_classes=3,
             gate_init=1.0)  # every head kept unless a test prunes it


def class_token_model(head_type: str = "per_class", **kwargs) -> GatedViT:
    torch.manual_seed(0)
    cfg = {**SMALL, "num_cls_tokens": 3, "num_register_tokens": 1, "head_type": head_type, **kwargs}
    model = build_vit(**cfg)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    return model.eval()


def logit_grads_wrt_prefix(model: GatedViT, x: torch.Tensor, **head_kwargs) -> torch.Tensor:
    """(C, P) norm of d logit_c / d prefix token k (summed over the batch)."""
    import dataclasses

    out = model.forward_features(x)
    prefix = out.prefix.detach().requires_grad_()
    logits = model.forward_head(dataclasses.replace(out, prefix=prefix), **head_kwargs)
    rows = []
    for c in range(logits.shape[1]):
        (g,) = torch.autograd.grad(logits[:, c].sum(), prefix, retain_graph=True)
        rows.append(g.abs().sum(dim=(0, 2)))
    return torch.stack(rows)


def test_per_class_head_logit_c_depends_only_on_class_token_c() -> None:
    model = class_token_model("per_class")
    x = torch.randn(2, 3, 16, 24)
    grads = logit_grads_wrt_prefix(model, x)  # (3 classes, 4 prefix tokens: 3 class tokens + 1 register)
    assert grads.shape == (3, 4)
    off_diagonal = ~torch.eye(3, 4, dtype=torch.bool)
    assert (grads[off_diagonal] == 0).all()
    assert (grads.diagonal() > 0).all()
    out = model.forward_features(x)
    z = out.prefix[:, :3]  # (B, T, D)
    expected = (z * model.head.weight[None]).sum(-1) + model.head.bias
    torch.testing.assert_close(model(x), expected)
    assert model.head.weight.shape == (3, 12)  # C x D weights
    assert model.forward_head(out, pre_logits=True).shape == (2, 3, 12)
    assert model.has_class_tokens


def test_flatten_head_sees_every_class_token_but_no_register() -> None:
    model = class_token_model("flatten")
    x = torch.randn(2, 3, 16, 24)
    grads = logit_grads_wrt_prefix(model, x)
    assert (grads[:, :3] > 0).all() and (grads[:, 3] == 0).all()
    assert model.head.weight.shape == (3, 3 * 12)
    out = model.forward_features(x)
    torch.testing.assert_close(model(x), model.head(out.prefix[:, :3].flatten(1)))


def test_pooled_head_reads_the_mean_of_the_class_tokens() -> None:
    torch.manual_seed(0)
    model = build_vit(**SMALL, num_cls_tokens=2).eval()
    x = torch.randn(2, 3, 16, 24)
    out = model.forward_features(x)
    pooled = out.prefix[:, :2].mean(dim=1)
    torch.testing.assert_close(model.forward_head(out, pre_logits=True), pooled)
    torch.testing.assert_close(model(x), model.head(pooled))
    assert not model.has_class_tokens  # several tokens, but no per-class head


@pytest.mark.parametrize("head_type", ["per_class", "flatten"])
def test_class_token_heads_need_one_token_per_class(head_type: str) -> None:
    with pytest.raises(ConfigError, match=f"head_type '{head_type}' needs one class token per class: "
                                          "num_cls_tokens 2 != num_classes 3"):
        ViTConfig(**SMALL, num_cls_tokens=2, head_type=head_type)
    with pytest.raises(ConfigError, match="num_cls_tokens 1 != num_classes 3"):
        ViTConfig(**SMALL, head_type=head_type)
    with pytest.raises(ConfigError,
                       match=r"head_type must be one of \['pooled', 'per_class', 'flatten'\], got 'mlp'"):
        ViTConfig(**SMALL, num_cls_tokens=3, head_type="mlp")


def test_dropping_class_tokens_zeroes_them_before_the_head() -> None:
    x = torch.randn(2, 3, 16, 24)
    drop = torch.tensor([[False, True, False], [True, False, True]])
    per_class = class_token_model("per_class")
    out = per_class.forward_features(x)
    full, dropped = per_class.forward_head(out), per_class.forward_head(out, drop_class_tokens=drop)
    torch.testing.assert_close(dropped[drop], per_class.head.bias.expand(2, 3)[drop])  # dropped logit = bias
    torch.testing.assert_close(dropped[~drop], full[~drop])  # the others do not change
    tokens = per_class.forward_head(out, pre_logits=True, drop_class_tokens=drop)
    assert (tokens[drop] == 0).all() and (tokens[~drop] != 0).any(dim=-1).all()

    flatten = class_token_model("flatten")
    out = flatten.forward_features(x)
    zeroed = out.prefix[:, :3] * (~drop)[..., None]
    expected = flatten.head(zeroed.flatten(1))
    torch.testing.assert_close(flatten.forward_head(out, drop_class_tokens=drop), expected)
    assert not torch.allclose(flatten.forward_head(out, drop_class_tokens=drop)[~drop], flatten(x)[~drop])


def test_final_norm_false_skips_the_last_layer_norm() -> None:
    without = class_token_model(final_norm=False)
    with_norm = class_token_model(final_norm=True)
    assert isinstance(without.norm, torch.nn.Identity)
    missing, unexpected = with_norm.load_state_dict(without.state_dict(), strict=False)
    assert missing == ["norm.weight", "norm.bias"] and unexpected == []
    x = torch.randn(2, 3, 16, 24)
    raw, normed = without.forward_features(x), with_norm.forward_features(x)
    torch.testing.assert_close(normed.prefix, F.layer_norm(raw.prefix, (12,), eps=1e-6))
    torch.testing.assert_close(normed.patches, F.layer_norm(raw.patches, (12,), eps=1e-6))
    assert not torch.allclose(raw.prefix, normed.prefix)


def test_class_token_attention_is_the_class_rows_without_prefix_columns() -> None:
    model = class_token_model()
    out = model.forward_features(torch.randn(2, 3, 16, 24), attention_blocks=[0, -1])
    for b in (0, 1):
        cta = out.class_token_attention(b)
        assert cta.shape == (2, 2, 3, 2, 3)  # (B, heads, T, h, w), non-square grid
        attn = out.attentions[b]  # (B, heads, 4 + 6, 4 + 6)
        for t in range(3):
            for y in range(2):
                for x in range(3):
                    torch.testing.assert_close(cta[:, :, t, y, x], attn[:, :, t, 4 + 3 * y + x])
        torch.testing.assert_close(cta[:, :, 0], out.cls_to_patch_attention(b, 0))
        assert (cta.flatten(3).sum(-1) < 1).all()  # prefix columns (class tokens, register) are dropped


def prune(model: GatedViT, block: int, heads: list[float]) -> None:
    with torch.no_grad():
        model.blocks[block].attn.gate.log_alpha.copy_(torch.tensor(heads).view(1, -1, 1, 1))


def test_pre_gate_maps_keep_pruned_heads_but_not_the_output() -> None:
    model = class_token_model()
    prune(model, 1, [1.0, -1.0])
    x = torch.randn(2, 3, 16, 24)
    gated = model.forward_features(x, attention_blocks=[1])
    raw = model.forward_features(x, attention_blocks=[1], gated_maps=False)
    assert (gated.attentions[1][:, 1] == 0).all()
    torch.testing.assert_close(raw.attentions[1][:, 1].sum(-1), torch.ones(2, 10))  # a softmax, not zero
    torch.testing.assert_close(raw.attentions[1][:, 0], gated.attentions[1][:, 0])
    torch.testing.assert_close(raw.prefix, gated.prefix)  # the forward pass is gated either way
    torch.testing.assert_close(raw.patches, gated.patches)


def test_head_output_layer_input_is_the_gated_per_head_outputs() -> None:
    model = class_token_model()
    prune(model, 0, [-1.0, 1.0])
    assert model.head_output_layer(0) is model.blocks[0].attn.proj
    assert model.head_output_layer(-1) is model.blocks[1].attn.proj
    seen = {}
    handles = [
        model.head_output_layer(b).register_forward_pre_hook(lambda m, i, b=b: seen.__setitem__(b, i[0]))
        for b in (0, 1)
    ]
    x = torch.randn(2, 3, 16, 24)
    out = model.forward_features(x, attention_blocks=[0])
    for h in handles:
        h.remove()
    assert seen[0].shape == (2, 10, 12)
    assert (seen[0][..., :6] == 0).all() and (seen[0][..., 6:] != 0).any()  # head 0 (channels 0-5) pruned
    assert (seen[1] != 0).any(dim=(0, 1)).all()
    # head 1's channels are its attention times its values (gate 1)
    blk = model.blocks[0]
    tokens = model.embed(x)
    v = blk.attn.qkv(blk.norm1(tokens)).reshape(2, 10, 3, 2, 6)[:, :, 2, 1]  # (B, N, hd) values of head 1
    torch.testing.assert_close(seen[0][..., 6:], out.attentions[0][:, 1] @ v)


def test_gradcam_layer_moves_to_the_last_block_that_kept_a_head() -> None:
    torch.manual_seed(0)
    model = build_vit(**{**SMALL, "depth": 3}).eval()
    assert model.gradcam_layer is model.blocks[2].norm1
    prune(model, 2, [-1.0, -1.0])
    assert model.gradcam_layer is model.blocks[1].norm1
    prune(model, 1, [-1.0, -1.0])
    prune(model, 2, [-1.0, 1.0])  # one head back in the last block
    assert model.gradcam_layer is model.blocks[2].norm1
    prune(model, 2, [-1.0, -1.0])
    assert model.gradcam_layer is model.blocks[0].norm1
    prune(model, 0, [-1.0, -1.0])
    assert model.gradcam_layer is model.blocks[2].norm1  # nothing kept anywhere: the last block


def test_a_fully_pruned_block_passes_no_patch_gradient_to_the_logits() -> None:
    torch.manual_seed(0)
    model = build_vit(**SMALL).eval()
    prune(model, 1, [-1.0, -1.0])
    store = {}
    handles = [model.blocks[b].norm1.register_forward_hook(lambda m, i, o, b=b: store.__setitem__(b, o))
               for b in (0, 1)]
    logits = model(torch.randn(1, 3, 16, 24))
    for h in handles:
        h.remove()
    g_last, g_first = torch.autograd.grad(logits[0, 0], [store[1], store[0]])
    assert (g_last[:, 1:] == 0).all()  # the last block's patches never reach the CLS token
    assert (g_first[:, 1:] != 0).any()  # the new Grad-CAM target still sees the patches
    assert model.gradcam_layer is model.blocks[0].norm1
