"""Tests of head relevance (gradient x head output): the first-order effect of switching a head off."""

from __future__ import annotations

import pytest
import torch

from weakseg.methods.relevance import head_relevance
from weakseg.models.vit import GatedViT, build_vit

C = 3
CLASS_SETS = torch.tensor([[True, False, True], [False, True, True]])


def tiny(**kwargs) -> GatedViT:
    torch.manual_seed(0)
    model = build_vit(img_size=(16, 16), patch_size=8, in_chans=3, embed_dim=12, depth=2, num_heads=2,
                      num_classes=C, gate_init=1.0, **kwargs)
    with torch.no_grad():  # larger weights: logits clearly depend on every head
        for name, p in model.named_parameters():
            if p.ndim > 1 and not name.endswith("log_alpha"):
                p.normal_(0, 0.5)
        # head 1 of block 0 pruned
        model.blocks[0].attn.gate.log_alpha.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
    return model.double().eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def scaled_logits(model: GatedViT, images: torch.Tensor, block: int, head: int, factor: float,
                  position: int | None = None) -> torch.Tensor:
    """Logits with head ``head`` of ``block``'s output scaled by ``factor`` (at one token, or all)."""
    hd = model.embed_dim // model.cfg.num_heads

    def scale(_m, inputs):
        x = inputs[0].clone()
        rows = slice(None) if position is None else slice(position, position + 1)
        x[:, rows, head * hd : (head + 1) * hd] *= factor
        return (x,)

    handle = model.head_output_layer(block).register_forward_pre_hook(scale)
    try:
        with torch.no_grad():
            return model(images)
    finally:
        handle.remove()


def finite_difference(model, images, position_of_class=None, eps: float = 1e-7) -> torch.Tensor:
    """(B, L=2, heads=2, C): (logit - logit with the head scaled by 1 - eps) / eps."""
    with torch.no_grad():
        base = model(images)
    out = torch.zeros(images.shape[0], 2, 2, C, dtype=torch.float64)
    for block in range(2):
        for head in range(2):
            for c in range(C):
                pos = None if position_of_class is None else position_of_class(c)
                scaled = scaled_logits(model, images, block, head, 1 - eps, pos)
                out[:, block, head, c] = (base[:, c] - scaled[:, c]) / eps
    return out


def test_relevance_of_all_positions_is_the_first_order_effect_of_scaling_the_head(images) -> None:
    model = tiny()
    relevance = head_relevance(model, images, [0, 1], CLASS_SETS)
    assert relevance.shape == (2, 2, 2, C)
    expected = finite_difference(model, images) * CLASS_SETS[:, None, None, :]
    torch.testing.assert_close(relevance.double(), expected, rtol=1e-4, atol=1e-6)
    assert (relevance[:, 0, 1] == 0).all()  # a pruned head's output is zero: no relevance
    assert relevance[:, 1].abs().sum() > 0 and relevance[:, 0, 0].abs().sum() > 0
    assert (relevance[~CLASS_SETS[:, None, None, :].expand_as(relevance)] == 0).all()


def test_class_token_positions_only_count_class_token_c(images) -> None:
    model = tiny(num_cls_tokens=C, num_register_tokens=1, head_type="per_class")
    relevance = head_relevance(model, images, [0, 1], CLASS_SETS, positions="class_token")
    expected = finite_difference(model, images, position_of_class=lambda c: c) * CLASS_SETS[:, None, None, :]
    torch.testing.assert_close(relevance.double(), expected, rtol=1e-4, atol=1e-6)
    everywhere = head_relevance(model, images, [0, 1], CLASS_SETS, positions="all")
    assert not torch.allclose(relevance[:, 0], everywhere[:, 0])  # the restriction matters in block 0
    assert (relevance[:, 0, 0] != 0).any() and (relevance[:, 1] != 0).any()


def test_blocks_come_in_the_requested_order_and_the_model_is_left_alone(images) -> None:
    model = tiny().train()
    both = head_relevance(model, images, [0, 1], CLASS_SETS)
    with torch.inference_mode():
        reversed_ = head_relevance(model, images.clone(), [1, 0], CLASS_SETS)
    torch.testing.assert_close(reversed_, both.flip(1))
    torch.testing.assert_close(head_relevance(model, images, [1], CLASS_SETS)[:, 0], both[:, 1])
    assert model.training
    assert all(not blk.attn.proj._forward_pre_hooks for blk in model.blocks)
    assert all(p.grad is None for p in model.parameters())


def test_class_token_positions_need_class_tokens(images) -> None:
    with pytest.raises(ValueError, match="positions='class_token' needs one class token per class"):
        head_relevance(tiny(), images, [0], CLASS_SETS, positions="class_token")
