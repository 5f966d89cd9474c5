"""Heads on ViT tokens (vit_linear, setr_naive, setr_pup): shapes, gradients, frozen encoder, layout, PUP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weakseg.errors import ConfigError
from weakseg.models.pretrained import load_pretrained
from weakseg.models.seg_heads import HEADS, LinearTokenHead, SETRPUPHead, pup_stages
from weakseg.models.segmenter import Segmenter
from weakseg.models.vit import build_vit
from weakseg.tasks.segmentation import SEGMENTATION_MODELS, VIT_ENCODER_MODELS, SegmentationTask

ENCODER = {"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 4}


def tiny(name: str, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    return HEADS[name](3, 4, img_size=(32, 32), **{**ENCODER, **kw})


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("size", [(30, 34), (32, 32), (8, 8), (5, 13)])
def test_logits_have_the_input_size_also_for_non_patch_multiples(name: str, size: tuple[int, int]) -> None:
    model = tiny(name).eval()
    assert model(torch.randn(2, 3, *size)).shape == (2, 4, *size)


@pytest.mark.parametrize("name", list(HEADS))
def test_registered_as_vit_encoder_models_with_the_encoder_settings(name: str) -> None:
    assert name in SEGMENTATION_MODELS and name in VIT_ENCODER_MODELS
    settings = {**ENCODER, "decoder_depth": 2, "freeze_encoder": True}  # decoder_depth is Segmenter's alone
    model = SEGMENTATION_MODELS[name](3, 4, [16], (30, 34), settings)
    assert isinstance(model, HEADS[name]) and model.freeze_encoder
    assert model.encoder.cfg.img_size == (32, 40)  # the tile rounded up to patch multiples
    assert model(torch.randn(1, 3, 30, 34)).shape == (1, 4, 30, 34)


@pytest.mark.parametrize("name", list(HEADS))
def test_gradients_reach_the_head_and_the_unfrozen_encoder(name: str) -> None:
    model = tiny(name).train()
    model(torch.randn(2, 3, 30, 34)).logsumexp(dim=1).mean().backward()
    encoder = {id(p) for p in model.encoder_parameters()}
    assert encoder == {id(p) for p in model.encoder.parameters()}
    head = [(n, p) for n, p in model.named_parameters() if id(p) not in encoder]
    assert head
    for param_name, param in head:
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name
    for param_name in ("encoder.patch_embed.proj.weight", "encoder.blocks.0.attn.qkv.weight",
                       "encoder.norm.weight"):
        param = dict(model.named_parameters())[param_name]
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", list(HEADS))
def test_a_frozen_encoder_gets_no_gradient_and_stays_in_eval_mode(name: str) -> None:
    model = tiny(name, freeze_encoder=True)
    model.train()
    assert model.training and not model.encoder.training
    assert not any(m.training for m in model.encoder.modules())
    head = [m for n, m in model.named_modules() if n and not n.startswith("encoder")]
    assert head and all(m.training for m in head)  # BatchNorm of the head trains
    model(torch.randn(2, 3, 30, 34)).logsumexp(dim=1).mean().backward()
    assert all(not p.requires_grad and p.grad is None for p in model.encoder.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    model.eval()
    model.train(True)  # a second switch keeps it frozen too
    assert not model.encoder.training


def test_the_task_leaves_a_frozen_encoder_out_of_the_optimiser_and_it_does_not_change() -> None:
    torch.manual_seed(0)
    task = SegmentationTask(in_chans=3, num_classes=4, model="setr_naive", tile_size=(16, 16),
                            segmenter={**ENCODER, "freeze_encoder": True})
    optimizer = task.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised and not optimised & {id(p) for p in task.model.encoder_parameters()}
    before = {k: v.clone() for k, v in task.model.encoder.state_dict().items()}
    task.train()
    task(torch.randn(2, 3, 16, 16)).logsumexp(dim=1).mean().backward()
    optimizer.step()
    for key, value in task.model.encoder.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_segmenter_can_freeze_its_encoder_too() -> None:
    model = Segmenter(3, 4, img_size=(16, 16), freeze_encoder=True, **ENCODER).train()
    assert not model.encoder.training and not any(p.requires_grad for p in model.encoder_parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())


def test_vit_linear_paints_each_tokens_pixel_block_in_the_documented_order() -> None:
    p, K, h, w = 2, 3, 2, 3  # a non-square grid and p1 != p2 distinguish every axis
    model = LinearTokenHead(1, K, img_size=(h * p, w * p), patch_size=p, embed_dim=4, depth=1, num_heads=1)
    with torch.no_grad():
        # Output o = (p1 * p + p2) * K + k of token (i, j) = value of the token's feature 0 + 1000 * o.
        model.head.weight.zero_()
        model.head.weight[:, 0] = 1.0
        model.head.bias.copy_(1000.0 * torch.arange(p * p * K))
    grid = torch.zeros(1, 4, h, w)  # (B, D, h, w)
    for i in range(h):
        for j in range(w):
            grid[0, 0, i, j] = 10 * i + j
    logits = model.decode(grid, (h * p, w * p))  # (1, K, h p, w p)
    expected = torch.zeros(1, K, h * p, w * p)
    for i in range(h):
        for j in range(w):
            for p1 in range(p):
                for p2 in range(p):
                    for k in range(K):
                        expected[0, k, i * p + p1, j * p + p2] = 10 * i + j + 1000 * ((p1 * p + p2) * K + k)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-3)


def test_vit_linear_logits_of_a_block_depend_only_on_its_own_token() -> None:
    model = tiny("vit_linear").eval()
    grid = torch.randn(1, 24, 2, 3)
    base = model.decode(grid, (16, 24))
    changed = grid.clone()
    changed[0, :, 1, 2] += 1.0  # token (1, 2) paints rows 8..15, columns 16..23
    diff = (model.decode(changed, (16, 24)) - base).abs().sum(dim=1)[0]  # (16, 24)
    assert diff[8:, 16:].min() > 0
    diff[8:, 16:] = 0
    assert diff.max() == 0


def test_setr_pup_needs_a_power_of_two_patch_size() -> None:
    with pytest.raises(ConfigError, match="--patch_size") as info:
        SETRPUPHead(3, 4, img_size=(24, 24), patch_size=6, embed_dim=24, depth=1, num_heads=4)
    assert "power of two" in str(info.value) and "6" in str(info.value)
    with pytest.raises(ConfigError, match="--patch_size"):
        SEGMENTATION_MODELS["setr_pup"](3, 4, [16], (24, 24), {**ENCODER, "patch_size": 12})


@pytest.mark.parametrize(("patch_size", "stages"), [(8, 3), (16, 4), (4, 2), (1, 0)])
def test_setr_pup_has_log2_patch_size_conv_norm_relu_stages(patch_size: int, stages: int) -> None:
    assert pup_stages(patch_size) == stages
    model = SETRPUPHead(3, 4, img_size=(32, 32), patch_size=patch_size, embed_dim=24, depth=1, num_heads=4)
    assert len(model.stages) == stages
    for i, stage in enumerate(model.stages):  # the original SETR-PUP: non-linear stages of width D / 4
        conv, norm, relu, up = stage
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.out_channels == 6
        assert conv.in_channels == (24 if i == 0 else 6)
        assert isinstance(norm, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
        assert isinstance(up, nn.Upsample) and up.scale_factor == 2
    assert model.classifier.kernel_size == (1, 1) and model.classifier.out_channels == 4
    assert model.eval()(torch.randn(1, 3, 30, 34)).shape == (1, 4, 30, 34)


def test_setr_pup_width_is_at_least_one() -> None:
    model = SETRPUPHead(3, 4, img_size=(8, 8), patch_size=2, embed_dim=2, depth=1, num_heads=1)
    assert model.stages[0][0].out_channels == 1


@pytest.mark.parametrize("name", list(HEADS))
def test_encoder_names_are_timm_names_and_a_checkpoint_loads(name: str, tmp_path) -> None:
    model = tiny(name)
    names = set(model.state_dict())
    assert {"encoder.blocks.0.attn.qkv.weight", "encoder.pos_embed", "encoder.cls_token"} <= names
    assert not any(k.startswith("encoder.head.") for k in names)
    source = build_vit(img_size=(16, 16), patch_size=8, in_chans=3, embed_dim=24, depth=1, num_heads=4,
                       gated=False, mlp_ratio=4.0)  # the encoder's MLP width: every tensor loads
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    load_pretrained(model.encoder, tmp_path / "vit.pth")
    torch.testing.assert_close(model.encoder.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(model.encoder.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)
