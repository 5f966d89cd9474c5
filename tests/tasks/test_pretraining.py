"""Barlow Twins (ssl_vit.md 1 and 4): the loss against a hand-computed case and the reference's BatchNorm form,
batch-order invariance, C returned, the projector's structure, lambda's scaling, cross-modal gradient routing."""

from __future__ import annotations

import pytest
import torch

from weakseg.models.barlow_twins import Projector, default_lambda
from weakseg.tasks.pretraining import BarlowTwinsTask, barlow_twins_loss, correlation_stats


def test_loss_by_hand_on_two_tiles() -> None:
    # B = 2: every standardised column is (-1, 1) or (1, -1) (biased std, eps 1e-5 of BatchNorm1d).
    z1 = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)  # columns -> (-1, 1), (1, -1)
    z2 = torch.tensor([[0.0, 1.0], [2.0, 5.0]], dtype=torch.float64)  # columns -> (-1, 1), (-1, 1)
    loss, c = barlow_twins_loss(z1, z2, lambd=0.1)
    # C = n1^T n2 / 2 = [[1, 1], [-1, -1]]; L = (1 - 1)^2 + (1 + 1)^2 + 0.1 * (1 + 1) = 4.2
    torch.testing.assert_close(c, torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64), rtol=1e-4,
                               atol=1e-4)
    assert float(loss) == pytest.approx(4.2, rel=1e-4)


def test_loss_equals_the_reference_batchnorm_form_and_ignores_batch_order() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    loss, c = barlow_twins_loss(z1, z2, lambd=5e-3)
    bn = torch.nn.BatchNorm1d(8, affine=False).double().train()
    c_ref = bn(z1).T @ bn(z2) / 16  # facebookresearch/barlowtwins main.py
    on = (torch.diagonal(c_ref) - 1).pow(2).sum()
    off = (c_ref - torch.diag(torch.diagonal(c_ref))).pow(2).sum()
    torch.testing.assert_close(c, c_ref)
    torch.testing.assert_close(loss, on + 5e-3 * off)
    perm = torch.randperm(16)
    loss_p, c_p = barlow_twins_loss(z1[perm], z2[perm], lambd=5e-3)
    torch.testing.assert_close(c_p, c)
    torch.testing.assert_close(loss_p, loss)
    mismatched, _ = barlow_twins_loss(z1[perm], z2, lambd=5e-3)  # pairs broken: another loss
    assert float(mismatched) != pytest.approx(float(loss))


def test_loss_refuses_a_batch_of_one_and_stats_of_the_identity() -> None:
    with pytest.raises(ValueError, match="at least 2 tiles"):
        barlow_twins_loss(torch.randn(1, 4), torch.randn(1, 4), 5e-3)
    stats = correlation_stats(torch.eye(5))
    assert float(stats["diag_mean"]) == 1.0 and float(stats["offdiag_rms"]) == 0.0
    stats = correlation_stats(torch.tensor([[0.5, 0.2], [-0.2, 0.5]]))
    assert float(stats["diag_mean"]) == pytest.approx(0.5) and float(stats["offdiag_rms"]) == pytest.approx(0.2)


def test_projector_structure_and_lambda_scaling() -> None:
    proj = Projector(24, 32, layers=3)
    kinds = [type(m).__name__ for m in proj.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]  # no final BN
    assert all(m.bias is None for m in proj.net if isinstance(m, torch.nn.Linear))
    assert proj(torch.randn(4, 24)).shape == (4, 32)
    assert default_lambda(512) == pytest.approx(5e-3) and default_lambda(1024) == pytest.approx(2.5e-3)


def _task(views: str, **model: object) -> BarlowTwinsTask:
    cfg = dict(img_size=(16, 16), patch_size=8, in_chans=15, embed_dim=16, depth=2, num_heads=4, num_classes=1,
               gated=False, **model)
    return BarlowTwinsTask(model=cfg, views=views, projector_dim=8, lambd=0.01)


def test_training_step_returns_loss_and_c_and_cross_modal_views_use_their_own_patch_embedding() -> None:
    torch.manual_seed(0)
    task = _task("cross_modal", s1_chans=2, fusion="sum")
    batch = {"view1": torch.randn(4, 13, 16, 16), "view2": torch.randn(4, 2, 16, 16)}
    task.log = lambda *a, **k: None  # no trainer attached
    out = task.training_step(batch, 0)
    assert set(out) == {"loss", "C"} and out["C"].shape == (8, 8) and not out["C"].requires_grad
    z1, z2 = task.embeddings(batch)
    torch.testing.assert_close(out["C"], barlow_twins_loss(z1, z2, 0.01)[1])
    assert not any(isinstance(v, torch.Tensor) and v.shape == (8, 8) for v in vars(task).values())  # C not kept
    # view 1 reaches only the S2 embedding, view 2 only the S1 one
    task.zero_grad()
    task.features(batch["view1"], "s2").sum().backward()
    assert task.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert task.backbone.patch_embed_s1.proj.weight.grad is None
    task.zero_grad()
    task.features(batch["view2"], "s1").sum().backward()
    assert task.backbone.patch_embed_s1.proj.weight.grad.abs().sum() > 0
    assert task.backbone.patch_embed.proj.weight.grad is None or task.backbone.patch_embed.proj.weight.grad.abs(
    ).sum() == 0


def test_backbone_state_dict_has_timm_names_and_no_head() -> None:
    sd = _task("augment").backbone_state_dict()
    assert "blocks.0.attn.qkv.weight" in sd and "patch_embed.proj.weight" in sd and "pos_embed" in sd
    assert not any(k.startswith("head") for k in sd) and not any("log_alpha" in k for k in sd)
