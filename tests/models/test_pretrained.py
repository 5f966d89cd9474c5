"""Loading a timm-layout ViT checkpoint from a local file (no download): the test writes one itself."""

import pytest
import torch

from weakseg.errors import ConfigError
from weakseg.models.pretrained import adapt_patch_kernel, load_pretrained, resize_pos_embed
from weakseg.models.vit import build_vit

D = 24


def timm_style_checkpoint(path, wrapper="model", prefix="module.", img=32, patch=8, in_chans=3, depth=2):
    """A DeiT-like RGB checkpoint in timm's key layout, built from our (ungated) ViT: its names are timm's."""
    src = build_vit(img_size=(img, img), patch_size=patch, in_chans=in_chans, embed_dim=D, depth=depth,
                    num_heads=4, num_classes=1000, gated=False)
    sd = {prefix + k: v.clone() for k, v in src.state_dict().items()}
    torch.save({wrapper: sd, "epoch": 300} if wrapper else sd, path)
    return src.state_dict()


def test_timm_key_names():
    model = build_vit(embed_dim=D, depth=1, num_heads=4, gated=False)
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
                "blocks.0.attn.proj.weight", "blocks.0.norm2.weight", "blocks.0.mlp.fc1.weight",
                "blocks.0.mlp.fc2.weight", "norm.weight", "head.weight", "head.bias"}
    assert expected <= set(model.state_dict())


@pytest.mark.parametrize("wrapper,prefix", [("model", "module."), ("teacher", "backbone."), (None, "")])
def test_load_adapts_channels_patch_and_grid(tmp_path, wrapper, prefix):
    path = tmp_path / "deit.pth"
    src = timm_style_checkpoint(path, wrapper, prefix)
    # 13 S2 bands, patch 4 on a 16x24 input: grid 4x6 instead of 4x4, 13 channels instead of 3.
    model = build_vit(img_size=(16, 24), patch_size=4, in_chans=13, embed_dim=D, depth=2, num_heads=4)
    report = load_pretrained(model, path)
    sd = model.state_dict()
    assert torch.equal(sd["blocks.1.attn.qkv.weight"], src["blocks.1.attn.qkv.weight"])
    assert torch.equal(sd["cls_token"], src["cls_token"])
    assert sd["pos_embed"].shape == (1, 1 + 24, D)
    assert torch.equal(sd["pos_embed"][:, 0], src["pos_embed"][:, 0])
    assert sd["patch_embed.proj.weight"].shape == (D, 13, 4, 4)
    assert any(k.startswith("head.weight") for k in report["skipped"])  # 1000 classes -> 8: dropped
    assert all(k.endswith("log_alpha") for k in report["missing"] if "head" not in k)


def test_adapted_kernel_keeps_response_to_a_constant_image():
    torch.manual_seed(0)
    w = torch.randn(5, 3, 8, 8)
    new = adapt_patch_kernel(w, 13, 4)
    # A constant image of value 1 gives sum(w) per output channel; the adapted kernel must give the same.
    assert torch.allclose(new.sum(dim=(1, 2, 3)), w.sum(dim=(1, 2, 3)), rtol=1e-4, atol=1e-4)


def test_resize_pos_embed_identity_for_same_grid():
    pos = torch.randn(1, 1 + 16, D)
    assert torch.allclose(resize_pos_embed(pos, 1, 1, (4, 4)), pos)
    assert resize_pos_embed(pos, 1, 3, (2, 8)).shape == (1, 3 + 16, D)


def test_multimodal_sum_fusion_gets_an_s1_embedding(tmp_path):
    path = tmp_path / "deit.pth"
    timm_style_checkpoint(path)
    model = build_vit(img_size=(16, 16), patch_size=4, in_chans=15, s1_chans=2, fusion="sum", embed_dim=D,
                      depth=2, num_heads=4)
    load_pretrained(model, path)
    assert model.patch_embed_s1.proj.weight.shape == (D, 2, 4, 4)
    assert torch.isfinite(model(torch.randn(1, 15, 16, 16))).all()


def test_mismatched_or_broken_checkpoints_raise_clear_errors(tmp_path):
    path = tmp_path / "deit.pth"
    timm_style_checkpoint(path)
    wide = build_vit(embed_dim=48, depth=2, num_heads=4)
    with pytest.raises(ConfigError, match="embed_dim 24 but the model has 48"):
        load_pretrained(wide, path)
    deep = build_vit(embed_dim=D, depth=4, num_heads=4)
    with pytest.raises(ConfigError, match="2 blocks but the model has depth 4"):
        load_pretrained(deep, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_pretrained(deep, tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read pretrained checkpoint"):
        load_pretrained(deep, bad)
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, bad)
    with pytest.raises(ConfigError, match="not a ViT checkpoint"):
        load_pretrained(deep, bad)


def test_class_token_model_repeats_the_cls_token_per_class_and_keeps_the_register_position(tmp_path):
    """--arch class_tokens --pretrained: every class token and the register start as the checkpoint's CLS."""
    path = tmp_path / "deit.pth"
    src = timm_style_checkpoint(path, None, "")
    model = build_vit(img_size=(16, 16), patch_size=4, in_chans=3, embed_dim=D, depth=2, num_heads=4,
                      num_classes=5, num_cls_tokens=5, num_register_tokens=1, head_type="per_class")
    load_pretrained(model, path)
    sd = model.state_dict()
    assert sd["cls_token"].shape == (1, 5, D)
    for c in range(5):
        assert torch.equal(sd["cls_token"][0, c], src["cls_token"][0, 0])
    assert sd["pos_embed"].shape == (1, 6 + 16, D)
    for p in range(6):  # 5 class tokens + 1 register take the CLS position
        assert torch.equal(sd["pos_embed"][0, p], src["pos_embed"][0, 0])
    assert torch.equal(sd["pos_embed"][0, 6:], src["pos_embed"][0, 1:])  # same 4x4 grid: patches unchanged


def test_multimodal_embeddings_are_the_adapted_rgb_kernel_for_their_own_bands(tmp_path):
    """Sum fusion: S2 kernel adapted to 13 bands, S1 kernel to 2 (bias 0); concat: one kernel over 15."""
    path = tmp_path / "deit.pth"
    src = timm_style_checkpoint(path)
    rgb = src["patch_embed.proj.weight"]  # (D, 3, 8, 8)
    summed = build_vit(img_size=(16, 16), patch_size=4, in_chans=15, s1_chans=2, fusion="sum", embed_dim=D,
                       depth=2, num_heads=4)
    load_pretrained(summed, path)
    torch.testing.assert_close(summed.patch_embed.proj.weight, adapt_patch_kernel(rgb, 13, 4))
    torch.testing.assert_close(summed.patch_embed.proj.bias, src["patch_embed.proj.bias"])
    torch.testing.assert_close(summed.patch_embed_s1.proj.weight, adapt_patch_kernel(rgb, 2, 4))
    assert (summed.patch_embed_s1.proj.bias == 0).all()
    concat = build_vit(img_size=(16, 16), patch_size=4, in_chans=15, s1_chans=2, fusion="concat", embed_dim=D,
                       depth=2, num_heads=4)
    load_pretrained(concat, path)
    torch.testing.assert_close(concat.patch_embed.proj.weight, adapt_patch_kernel(rgb, 15, 4))
    # the S2 and the concat embedding answer a constant image like the RGB model's patch embedding
    rgb_bias = src["patch_embed.proj.bias"]
    rgb_response = torch.nn.functional.conv2d(torch.ones(1, 3, 8, 8), rgb, rgb_bias)[0, :, 0, 0]
    for embed, bands in ((summed.patch_embed, 13), (concat.patch_embed, 15)):
        response = embed(torch.ones(1, bands, 16, 16))[0, 0]  # first patch token
        torch.testing.assert_close(response, rgb_response, rtol=1e-4, atol=1e-4)


def test_adapted_kernel_keeps_the_constant_response_with_fewer_channels_than_the_checkpoint():
    torch.manual_seed(0)
    w = torch.randn(5, 3, 8, 8)
    for chans in (2, 1):
        new = adapt_patch_kernel(w, chans, 8)
        assert new.shape == (5, chans, 8, 8)
        torch.testing.assert_close(new.sum(dim=(1, 2, 3)), w.sum(dim=(1, 2, 3)), rtol=1e-4, atol=1e-4)


def test_a_checkpoint_with_another_mlp_width_is_refused_naming_the_flag(tmp_path) -> None:
    import pytest
    import torch

    from weakseg.errors import ConfigError
    from weakseg.models.pretrained import load_pretrained
    from weakseg.models.vit import build_vit

    deit_like = build_vit(img_size=(32, 32), patch_size=8, in_chans=3, embed_dim=24, depth=2, num_heads=4,
                          mlp_ratio=4.0, num_classes=10, gated=False)
    torch.save(deit_like.state_dict(), tmp_path / "deit.pth")
    model = build_vit(img_size=(32, 32), patch_size=8, in_chans=13, embed_dim=24, depth=2, num_heads=4,
                      mlp_ratio=2.0, num_classes=5)
    with pytest.raises(ConfigError, match=r"MLP ratio 4 .* \(--mlp_ratio 4\)"):
        load_pretrained(model, tmp_path / "deit.pth")
    same = build_vit(img_size=(32, 32), patch_size=8, in_chans=13, embed_dim=24, depth=2, num_heads=4,
                     mlp_ratio=4.0, num_classes=5)
    assert load_pretrained(same, tmp_path / "deit.pth")["skipped"] == ["head.weight (10, 24) -> (5, 24)",
                                                                       "head.bias (10,) -> (5,)"]
