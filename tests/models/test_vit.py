import math

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
    with pytest.raises(ConfigError, match="model input 18x16 is not a multiple of the patch size 4"):
        model(torch.randn(1, 13, 18, 16))


def test_other_input_sizes_interpolate_the_patch_positions_only():
    from weakseg.models.vit import interpolate_patch_positions

    torch.manual_seed(0)
    model = GatedViT(ViTConfig(**TINY, img_size=(16, 16), in_chans=3)).eval()
    P = model.num_prefix_tokens
    x = torch.randn(2, 3, 32, 24)  # patch 4: grid 8 x 6 instead of 4 x 4
    tokens = model.embed(x)
    patch_pos = model.pos_embed[:, P:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)  # (1, D, 4, 4)
    by_hand = torch.nn.functional.interpolate(patch_pos, size=(8, 6), mode="bicubic", align_corners=False)
    expected = model.patch_embed(x) + by_hand.permute(0, 2, 3, 1).reshape(1, 48, -1)
    torch.testing.assert_close(tokens[:, P:], expected)
    torch.testing.assert_close(tokens[:, :P], model.cls_token.expand(2, -1, -1) + model.pos_embed[:, :P])
    out = model.forward_features(x, attention_blocks=[-1])
    assert out.grid == (8, 6) and out.patch_grid().shape[-2:] == (8, 6)
    assert out.cls_to_patch_attention(1).shape[-2:] == (8, 6)
    # the model's own size is untouched
    same = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(model.embed(same), torch.cat([model.cls_token, model.patch_embed(same)], 1)
                               + model.pos_embed)
    pos = torch.randn(1, 4, 5)
    assert interpolate_patch_positions(pos, (2, 2), (2, 2)) is pos


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
                       match=r"head_type must be one of \['pooled', 'per_class', 'flatten', 'mean'\], got 'mlp'"):
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


# ---- numeric checks against hand computations (issue 7: tests that catch real bugs) -----------------------
def hand_patch_tokens(x: torch.Tensor, proj: torch.nn.Conv2d, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, D): the strided convolution written out, patches row-major."""
    return F.conv2d(x, proj.weight, proj.bias, stride=patch).flatten(2).transpose(1, 2)


def hand_embed(model: GatedViT, patch_tokens: torch.Tensor) -> torch.Tensor:
    B = patch_tokens.shape[0]
    return torch.cat([model.cls_token.expand(B, -1, -1), patch_tokens], dim=1) + model.pos_embed


def multimodal_model(fusion: str) -> GatedViT:
    torch.manual_seed(0)
    model = build_vit(**TINY, img_size=(16, 16), in_chans=15, s1_chans=2, fusion=fusion, gate_init=1.0)
    with torch.no_grad():  # larger embeddings, so that a change of a few bands clearly moves the logits
        model.patch_embed.proj.weight.normal_(0, 0.3)
        if model.patch_embed_s1 is not None:
            model.patch_embed_s1.proj.weight.normal_(0, 0.3)
            model.patch_embed_s1.proj.bias.normal_(0, 0.3)
    return model.eval()


def test_sum_fusion_is_s2_embedding_of_the_first_bands_plus_s1_embedding_of_the_last_bands() -> None:
    """Swapping which channels feed the S2 and the S1 embedding passed every shape test; not this one."""
    model = multimodal_model("sum")
    assert model.patch_embed.proj.in_channels == 13 and model.patch_embed_s1.proj.in_channels == 2
    x = torch.randn(2, 15, 16, 16)
    s2, s1 = x[:, :13], x[:, 13:]  # the convention: S2 (13 bands) then S1 (VV, VH)
    tokens = (hand_patch_tokens(s2, model.patch_embed.proj, 4)
              + hand_patch_tokens(s1, model.patch_embed_s1.proj, 4))
    torch.testing.assert_close(model.embed(x), hand_embed(model, tokens))


@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_zeroing_one_modality_embedding_makes_the_output_blind_to_exactly_those_bands(fusion: str) -> None:
    x = torch.randn(2, 15, 16, 16)
    other_s1, other_s2 = x.clone(), x.clone()
    other_s1[:, 13:] = torch.randn(2, 2, 16, 16) * 3
    other_s2[:, :13] = torch.randn(2, 13, 16, 16) * 3
    model = multimodal_model(fusion)
    for name, blind, sees in (("s1", other_s1, other_s2), ("s2", other_s2, other_s1)):
        zeroed = multimodal_model(fusion)
        with torch.no_grad():
            if fusion == "sum":
                conv = zeroed.patch_embed_s1.proj if name == "s1" else zeroed.patch_embed.proj
                conv.weight.zero_()
            else:  # one convolution over all 15 channels: zero the kernel columns of the modality's bands
                bands = slice(13, 15) if name == "s1" else slice(0, 13)
                zeroed.patch_embed.proj.weight[:, bands] = 0.0
        base = zeroed(x)
        torch.testing.assert_close(zeroed(blind), base, rtol=0, atol=1e-6)  # the zeroed bands do not matter
        assert (zeroed(sees) - base).abs().max() > 1e-3  # the other modality's bands still do
        assert (model(blind) - model(x)).abs().max() > 1e-3  # and with both embeddings every band matters


def test_concat_fusion_is_one_embedding_over_all_fifteen_channels() -> None:
    model = multimodal_model("concat")
    assert model.patch_embed_s1 is None and model.patch_embed.proj.in_channels == 15
    x = torch.randn(2, 15, 16, 16)
    expected = hand_embed(model, hand_patch_tokens(x, model.patch_embed.proj, 4))
    torch.testing.assert_close(model.embed(x), expected)


def hand_attention(attn, x: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention head by head: softmax(q k^T / sqrt(d)) v, times the head's gate, projected.

    Returns the output (B, N, D) and the gated maps (B, heads, N, N).
    """
    D = x.shape[-1]
    H = attn.num_heads
    hd = D // H
    W, b = attn.qkv.weight, attn.qkv.bias
    heads, maps = [], []
    for h in range(H):
        rows = slice(h * hd, (h + 1) * hd)
        q = x @ W[rows].T + b[rows]
        k = x @ W[D:][rows].T + b[D:][rows]
        v = x @ W[2 * D :][rows].T + b[2 * D :][rows]
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1) * gate[h]
        maps.append(a)
        heads.append(a @ v)
    return torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias, torch.stack(maps, dim=1)


def hand_forward_features(model: GatedViT, x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The pre-norm ViT by hand: tokens + Attn(LN1(tokens)), then + MLP(LN2(tokens)); final LayerNorm."""
    t = hand_embed(model, hand_patch_tokens(x, model.patch_embed.proj, model.patch_size))
    maps = {}
    for i, blk in enumerate(model.blocks):
        gate = (blk.attn.gate.log_alpha.flatten() > 0).to(x.dtype)  # the eval gate: 1[log_alpha > 0]
        normed = F.layer_norm(t, (t.shape[-1],), blk.norm1.weight, blk.norm1.bias, eps=1e-6)
        y, maps[i] = hand_attention(blk.attn, normed, gate)
        t = t + y
        h = F.layer_norm(t, (t.shape[-1],), blk.norm2.weight, blk.norm2.bias, eps=1e-6)
        hidden = F.gelu(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
        t = t + (hidden @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias)
    return F.layer_norm(t, (t.shape[-1],), model.norm.weight, model.norm.bias, eps=1e-6), maps


def numeric_model(**kwargs) -> GatedViT:
    torch.manual_seed(0)
    model = build_vit(**{**TINY, "img_size": (8, 12), "in_chans": 3, **kwargs}).double()
    with torch.no_grad():  # sharp, non-uniform attention and a visible residual branch
        for name, p in model.named_parameters():
            if p.ndim > 1 and not name.endswith("log_alpha"):
                p.normal_(0, 0.4)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
        if model.cfg.gated:
            model.blocks[0].attn.gate.log_alpha.copy_(torch.tensor([1.0, -0.5, 0.3, -2.0]).view(1, 4, 1, 1))
            model.blocks[1].attn.gate.log_alpha.copy_(torch.tensor([-1.0, 2.0, 0.5, 1.5]).view(1, 4, 1, 1))
    return model.eval()


@pytest.mark.parametrize("impl", ["fused", "explicit"])
def test_both_attention_paths_equal_the_hand_computed_gated_vit(impl: str) -> None:
    model = numeric_model()
    model.set_attention_impl(impl)
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    tokens, maps = hand_forward_features(model, x)
    plain = model.forward_features(x)  # no maps asked: the fused path unless forced explicit
    with_maps = model.forward_features(x, attention_blocks=[0, 1])  # the explicit softmax path
    for out in (plain, with_maps):
        torch.testing.assert_close(out.prefix, tokens[:, :1], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(out.patches, tokens[:, 1:], rtol=1e-9, atol=1e-10)
    for b in (0, 1):
        torch.testing.assert_close(with_maps.attentions[b], maps[b], rtol=1e-9, atol=1e-12)
    # the hand maps really are gated softmaxes: kept rows sum to 1, pruned heads are 0
    kept = model.head_mask()
    for b in (0, 1):
        sums = maps[b].sum(-1)  # (B, heads, N)
        torch.testing.assert_close(sums[:, kept[b]], torch.ones_like(sums[:, kept[b]]))
        assert (maps[b][:, ~kept[b]] == 0).all()


def test_eval_gate_passes_a_kept_head_unchanged_and_zeroes_a_pruned_one_exactly() -> None:
    gated = numeric_model()
    ungated = numeric_model(gated=False)
    ungated.load_state_dict({k: v for k, v in gated.state_dict().items() if "log_alpha" not in k})
    seen: dict[str, torch.Tensor] = {}
    for name, m in (("gated", gated), ("ungated", ungated)):
        m.head_output_layer(0).register_forward_pre_hook(
            lambda _m, i, name=name: seen.__setitem__(name, i[0]))
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    gated(x), ungated(x)
    hd = 6
    for h, kept in enumerate([True, False, True, False]):  # block 0's log alpha: 1.0, -0.5, 0.3, -2.0
        channels = slice(h * hd, (h + 1) * hd)
        if kept:  # times exactly 1: bit-identical to the ungated model
            assert torch.equal(seen["gated"][..., channels], seen["ungated"][..., channels])
        else:
            assert (seen["gated"][..., channels] == 0).all() and (seen["ungated"][..., channels] != 0).all()


def test_head_mask_is_log_alpha_above_zero_per_block_and_head() -> None:
    model = numeric_model(depth=3)
    values = torch.tensor([[0.7, -0.01, -1e-4, 3.0], [-4.0, 0.02, -0.3, 1e-3], [-1e-6, -1e-3, 2.0, -2.0]])
    with torch.no_grad():
        for blk, row in zip(model.blocks, values, strict=True):
            blk.attn.gate.log_alpha.copy_(row.view(1, 4, 1, 1))
    expected = values > 0
    assert torch.equal(model.head_mask(), expected)
    assert model.pruned_heads_per_layer() == (~expected).sum(1).tolist() == [2, 2, 3]
    assert model.pruned_fraction() == pytest.approx(7 / 12)
    # and it is the state the forward pass uses: pruned heads' maps are zero, kept ones are softmax rows
    out = model.forward_features(torch.randn(1, 3, 8, 12, dtype=torch.float64), attention_blocks=[0, 1, 2])
    for b in range(3):
        rows = out.attentions[b].sum(-1)[0, :, 0]  # (heads,) sum of the CLS row
        torch.testing.assert_close(rows, expected[b].double())


def test_model_l0_penalty_is_the_sum_of_hand_computed_open_probabilities() -> None:
    model = numeric_model()
    log_alpha = torch.cat([blk.attn.gate.log_alpha.detach().flatten() for blk in model.blocks]).double()
    shift = -0.33 * math.log(0.1 / 1.1)  # -beta log(-l / r) = +0.7913
    per_head = 1 / (1 + torch.exp(-(log_alpha + shift)))
    torch.testing.assert_close(model.l0_penalty().double(), per_head.sum())
    torch.testing.assert_close(model.l0_penalty(normalize=True).double(), per_head.mean())


@pytest.mark.parametrize("dtype,log_alpha", [(torch.float32, 1e-9), (torch.float64, 0.0)])
def test_eval_gate_and_head_mask_agree_at_the_boundary(dtype: torch.dtype, log_alpha: float) -> None:
    model = numeric_model().to(dtype)
    with torch.no_grad():
        model.blocks[0].attn.gate.log_alpha.fill_(log_alpha)
    out = model.forward_features(torch.randn(1, 3, 8, 12, dtype=dtype), attention_blocks=[0])
    used = out.attentions[0].sum(-1)[0, :, 0] > 0.5  # (heads,) the forward pass's own gate
    assert used.tolist() == model.head_mask()[0].tolist()
