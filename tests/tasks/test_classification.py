"""Tests of the class-token parts of the classification task: absent-class token masking, diversity loss."""

from __future__ import annotations

import math

import pytest
import torch

from weakseg.errors import ConfigError
from weakseg.models.vit import BackboneOutput, build_vit
from weakseg.tasks.classification import ClassificationTask, absent_token_mask, class_map_diversity

# Steps called directly (outside a Trainer) make self.log warn; that is expected here.
pytestmark = pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")

C = 3
ONE_CLS = dict(img_size=(16, 16), patch_size=8, in_chans=3, embed_dim=12, depth=2, num_heads=2, num_classes=C)
CLASS_TOKENS = {**ONE_CLS, "num_cls_tokens": C, "num_register_tokens": 1, "head_type": "per_class"}


# ---- absent-class token masking ----------------------------------------------------------------------------
def test_masking_never_touches_present_classes_and_hits_absent_ones_at_the_rate() -> None:
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(4000, 6, generator=g) < 0.4).float()
    mask = absent_token_mask(target, 0.3, torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == target.shape
    assert not mask[target > 0.5].any()
    absent = target < 0.5
    assert mask[absent].float().mean().item() == pytest.approx(0.3, abs=0.015)  # ~14000 draws: 4 sigma
    per_class = mask.float().sum(0) / absent.float().sum(0)
    assert ((per_class - 0.3).abs() < 0.04).all()  # no class is favoured


def test_masking_is_reproducible_and_rate_zero_or_one_are_exact() -> None:
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0]] * 50)
    a = absent_token_mask(target, 0.5, torch.Generator().manual_seed(7))
    b = absent_token_mask(target, 0.5, torch.Generator().manual_seed(7))
    c = absent_token_mask(target, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert absent_token_mask(target, 0.0) is None
    assert torch.equal(absent_token_mask(target, 1.0), target < 0.5)


# ---- diversity loss ----------------------------------------------------------------------------------------
def attention_of(rows: dict[int, list[list[float]]]) -> torch.Tensor:
    """(1, 2 heads, N=4, N=4) attention: 2 class tokens, no register, a (1, 2) patch grid; class rows set."""
    attn = torch.zeros(1, 2, 4, 4)
    for head, values in rows.items():
        attn[0, head, :2, 2:] = torch.tensor(values)
    return attn


# block 0: class 0 -> heads [0.6, 0], [0.2, 0] (mean [0.4, 0]);
#          class 1 -> heads [0.3, 0.3], [0.1, 0.5] (mean [0.2, 0.4])
BLOCK0 = attention_of({0: [[0.6, 0.0], [0.3, 0.3]], 1: [[0.2, 0.0], [0.1, 0.5]]})
# block 1: class 0 mean [0, 0.4]; class 1 mean [0.2, 0] -> summed with block 0, both classes are [0.4, 0.4]
BLOCK1 = attention_of({0: [[0.0, 0.8], [0.4, 0.0]], 1: [[0.0, 0.0], [0.0, 0.0]]})


def backbone(attentions: dict[int, torch.Tensor]) -> BackboneOutput:
    B = next(iter(attentions.values())).shape[0]
    return BackboneOutput(torch.zeros(B, 2, 4), torch.zeros(B, 2, 4), (1, 2), attentions, 2, 2)


def test_diversity_loss_by_hand() -> None:
    # block 0 alone: unit maps [1, 0] and [1, 2]/sqrt(5); cosine 1/sqrt(5); loss sqrt(2 * 1/5)
    assert class_map_diversity(backbone({0: BLOCK0})).item() == pytest.approx(math.sqrt(0.4), rel=1e-5)
    # both blocks: the summed maps are identical, cosine 1, loss sqrt(2)
    both = backbone({0: BLOCK0, 1: BLOCK1})
    assert class_map_diversity(both).item() == pytest.approx(math.sqrt(2), rel=1e-5)
    # a batch averages its images' losses; orthogonal maps give sqrt(1e-10)
    orthogonal = attention_of({0: [[1.0, 0.0], [0.0, 1.0]], 1: [[1.0, 0.0], [0.0, 1.0]]})
    batch = backbone({0: torch.cat([BLOCK0, orthogonal])})
    assert class_map_diversity(batch).item() == pytest.approx((math.sqrt(0.4) + 1e-5) / 2, rel=1e-5)


def test_diversity_loss_has_gradients_to_the_attention_and_the_model() -> None:
    attn = BLOCK0.clone().requires_grad_()
    class_map_diversity(backbone({0: attn})).backward()
    assert attn.grad is not None and attn.grad[0, :, :2, 2:].abs().sum() > 0
    assert (attn.grad[0, :, 2:] == 0).all()  # patch-query rows are not class maps

    torch.manual_seed(0)
    model = build_vit(**CLASS_TOKENS, gate_init=1.0).train()
    out = model.forward_features(torch.randn(2, 3, 16, 16), attention_blocks=range(2))
    class_map_diversity(out).backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[1].attn.qkv.weight.grad.abs().sum() > 0


# ---- the task ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["token_mask_rate", "diversity_weight"])
def test_class_token_terms_are_refused_on_a_one_cls_model(option: str) -> None:
    with pytest.raises(ConfigError, match=r"need one class token per class \(--arch class_tokens\)"):
        ClassificationTask(model=ONE_CLS, **{option: 0.5})


def test_token_mask_rate_outside_zero_one_is_refused() -> None:
    with pytest.raises(ConfigError,
                       match=r"token_mask_rate must be in \[0, 1\], got 1.5 \(--token_mask_rate\)"):
        ClassificationTask(model=CLASS_TOKENS, token_mask_rate=1.5)


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(4, 3, 16, 16, generator=g),
            "label": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])}


def spy_on_head(task: ClassificationTask) -> list:
    """Record the ``drop_class_tokens`` argument of every head call."""
    calls: list = []
    forward_head = task.model.forward_head

    def wrapped(out, pre_logits=False, drop_class_tokens=None):
        calls.append(drop_class_tokens)
        return forward_head(out, pre_logits=pre_logits, drop_class_tokens=drop_class_tokens)

    task.model.forward_head = wrapped  # type: ignore[method-assign]
    return calls


def test_training_step_masks_absent_class_tokens_and_validation_does_not() -> None:
    torch.manual_seed(0)
    task = ClassificationTask(model=CLASS_TOKENS, token_mask_rate=1.0, diversity_weight=0.1,
                              arch="class_tokens")
    calls = spy_on_head(task)
    data = batch()
    loss = task.training_step(data, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.equal(calls[-1], data["label"] < 0.5)  # rate 1: every absent class, no present one
    loss.backward()
    assert task.model.cls_token.grad is not None and torch.isfinite(task.model.cls_token.grad).all()
    task.validation_step(data, 0)
    assert calls[-1] is None


def test_training_step_with_the_default_rate_runs() -> None:
    torch.manual_seed(0)
    task = ClassificationTask(model=CLASS_TOKENS, token_mask_rate=0.5, arch="class_tokens")
    calls = spy_on_head(task)
    data = batch()
    loss = task.training_step(data, 0)
    assert torch.isfinite(loss)
    assert not calls[-1][data["label"] > 0.5].any()
    assert task.hparams.arch == "class_tokens"
