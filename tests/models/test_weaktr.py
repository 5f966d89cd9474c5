"""WeakTr's phase-1 model: AAF numerics against a hand-written loop, the CAMs, and the gradient routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weakseg.errors import ConfigError
from weakseg.models.architectures import architecture_of, build_classifier, get_architecture
from weakseg.models.vit import ViTConfig
from weakseg.models.weaktr import AdaptiveAttentionFusion, WeakTrViT

C, D, L, H = 3, 16, 2, 4


def tiny_weaktr(aaf: str = "v2", gated: bool = False, **kw: object) -> WeakTrViT:
    torch.manual_seed(0)
    arch = get_architecture("weaktr")
    fields = {**arch.model_fields(C), "aaf": aaf}
    cfg = ViTConfig(img_size=(16, 16), patch_size=4, in_chans=3, embed_dim=D, depth=L, num_heads=H,
                    num_classes=C, final_norm=False, gated=gated, **{**fields, **kw})
    model = build_classifier(cfg)
    assert isinstance(model, WeakTrViT)
    return model


def forward_all(model: WeakTrViT, x: torch.Tensor):
    return model.forward_features(x, attention_blocks=model.auxiliary_blocks(), attention_outputs=True)


def test_architecture_defaults_and_names() -> None:
    model = tiny_weaktr()
    assert architecture_of(model.cfg) == "weaktr"
    assert model.cfg.head_type == "mean" and model.cfg.num_cls_tokens == C and not model.cfg.final_norm
    assert model.has_class_tokens
    names = set(model.state_dict())
    assert {"cam_head.weight", "cam_head.bias", "aaf.feature_score.0.weight", "aaf.se.0.weight",
            "aaf.se.2.weight", "blocks.0.attn.qkv.weight", "cls_token", "pos_embed"} <= names
    assert not any(k.startswith("head.") for k in names)  # the mean head has no weights
    # Shapes: 72 -> 9 -> 72 for DeiT-S is L*H -> L*H/8 -> L*H here (8 maps -> 1 -> 8).
    assert model.aaf.se[0].weight.shape == (L * H // 8, L * H) and model.aaf.se[2].weight.shape == (L * H, 1)
    assert model.aaf.feature_score[0].weight.shape == (max(1, (D // H) // 8), D // H)


def test_mean_head_is_channel_mean_of_class_tokens() -> None:
    model = tiny_weaktr().eval()
    x = torch.randn(2, 3, 16, 16)
    out = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(out), out.prefix[:, :C].mean(dim=-1))


def test_aaf_v2_matches_a_hand_written_loop() -> None:
    torch.manual_seed(1)
    aaf = AdaptiveAttentionFusion(L, H, D, "v2", reduction=2, pool="max")
    B, T = 2, 5
    attn = torch.rand(B, L, H, T, T).softmax(-1)
    outputs = torch.randn(B, L, T, D)
    fused, w = aaf(attn, outputs)
    lin1, lin2 = aaf.feature_score
    for b in range(B):
        s = torch.zeros(H * L)
        for layer in range(L):
            for head in range(H):
                feats = outputs[b, layer][:, head::H]  # (T, D/H): the strided channels d*H + head
                g = feats.max(dim=0).values
                s[head * L + layer] = lin2(lin1(g)).squeeze()  # j = head * L + layer
        u1, u2 = aaf.se[0].weight, aaf.se[2].weight
        weights = torch.sigmoid(u2 @ torch.relu(u1 @ s))  # (H*L,)
        expected = sum(weights[h * L + layer] * attn[b, layer, h] for layer in range(L) for h in range(H)) / (L * H)
        torch.testing.assert_close(fused[b], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w[b], weights.view(H, L).T, rtol=1e-5, atol=1e-6)


def test_aaf_v1_and_random_inputs() -> None:
    B, T = 2, 5
    attn = torch.rand(B, L, H, T, T)
    outputs = torch.randn(B, L, T, D)
    v1 = AdaptiveAttentionFusion(L, H, D, "v1")
    torch.testing.assert_close(v1.scores(attn, outputs), attn.mean(dim=(-2, -1)))
    rnd = AdaptiveAttentionFusion(L, H, D, "random")
    s = rnd.scores(attn, outputs)
    assert torch.equal(s[0], s[1])  # image-independent
    assert torch.equal(s[0].T.reshape(-1), rnd.query)  # ordered head * L + layer
    assert "query" in rnd.state_dict()  # saved, so a loaded checkpoint keeps its draw


def test_cams_are_hand_computed_from_the_fused_attention() -> None:
    model = tiny_weaktr().eval()
    x = torch.randn(2, 3, 16, 16)
    out = forward_all(model, x)
    maps = model.weaktr_maps(out)
    attn = torch.stack([out.attentions[b] for b in range(L)], 1)
    outputs = torch.stack([out.attention_outputs[b] for b in range(L)], 1)
    fused, _ = model.aaf(attn, outputs)
    P = model.num_prefix_tokens
    coarse = F.relu(model.cam_head(out.patch_grid()))
    ca = fused[:, :C, P:].reshape(2, C, 4, 4)
    torch.testing.assert_close(maps["fused_cam"], ca * coarse)
    pa = fused[:, P:, P:]
    fine = torch.stack([torch.stack([pa[b] @ (ca[b, c] * coarse[b, c]).flatten() for c in range(C)])
                        for b in range(2)]).reshape(2, C, 4, 4)
    torch.testing.assert_close(maps["fine_cam"], fine, rtol=1e-5, atol=1e-7)
    aux = model.auxiliary_logits(out)
    torch.testing.assert_close(aux["fine"], fine.mean(dim=(2, 3)), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(aux["coarse"], model.cam_head(out.patch_grid()).mean(dim=(2, 3)))


@pytest.mark.parametrize("fusion", ["coarse", "attention"])
def test_cam_fusion_variants(fusion: str) -> None:
    model = tiny_weaktr(cam_fusion=fusion).eval()
    out = forward_all(model, torch.randn(1, 3, 16, 16))
    maps = model.weaktr_maps(out)
    if fusion == "coarse":
        torch.testing.assert_close(maps["fused_cam"], F.relu(model.cam_head(out.patch_grid())))
    else:
        assert maps["fused_cam"].shape == (1, C, 4, 4) and bool((maps["fused_cam"] >= 0).all())


def _grads(model: WeakTrViT, loss: torch.Tensor) -> dict[str, bool]:
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return {n: g is not None and bool(g.abs().sum() > 0) for n, g in zip(params, grads, strict=True)}


def test_gradient_routing_of_the_three_losses() -> None:
    """L_fine trains AAF only; L_cls and L_coarse never reach AAF (weaktr.md 1.1, the detach placement)."""
    model = tiny_weaktr(gated=True, aaf_reduction=2).train()  # 8 maps -> 4 hidden units: none dead at init
    x = torch.randn(4, 3, 16, 16)
    target = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    out = forward_all(model, x)
    aux = model.auxiliary_logits(out)
    losses = {"cls": F.binary_cross_entropy_with_logits(model.forward_head(out), target),
              "coarse": F.binary_cross_entropy_with_logits(aux["coarse"], target),
              "fine": F.binary_cross_entropy_with_logits(aux["fine"], target)}
    fine = _grads(model, losses["fine"])
    assert {n for n, g in fine.items() if g} == {n for n in fine if n.startswith("aaf.")}
    cls = _grads(model, losses["cls"])
    assert not any(g for n, g in cls.items() if n.startswith(("aaf.", "cam_head.")))
    assert cls["blocks.0.attn.qkv.weight"] and cls["cls_token"]
    coarse = _grads(model, losses["coarse"])
    assert not any(g for n, g in coarse.items() if n.startswith("aaf."))
    assert coarse["cam_head.weight"] and coarse["blocks.0.attn.qkv.weight"] and coarse["patch_embed.proj.weight"]


def test_pruned_heads_give_aaf_zero_maps() -> None:
    model = tiny_weaktr(gated=True).eval()
    with torch.no_grad():
        model.blocks[1].attn.gate.log_alpha[:] = -10.0  # close every head of block 1
    out = forward_all(model, torch.randn(1, 3, 16, 16))
    assert float(out.attentions[1].detach().abs().sum()) == 0.0
    assert torch.isfinite(model.weaktr_maps(out)["fine_cam"]).all()


def test_weaktr_needs_every_block_and_one_token_per_class() -> None:
    model = tiny_weaktr().eval()
    with pytest.raises(ValueError, match="every block"):
        model.weaktr_maps(model.forward_features(torch.randn(1, 3, 16, 16), attention_blocks=[0]))
    with pytest.raises(ConfigError, match="aaf"):
        ViTConfig(num_classes=3, num_cls_tokens=3, head_type="mean", aaf="v3")
    with pytest.raises(ConfigError, match="one class token per class"):
        ViTConfig(num_classes=3, num_cls_tokens=1, head_type="pooled", aaf="v2")


def test_task_trains_with_the_three_losses() -> None:
    from weakseg.tasks.classification import ClassificationTask

    arch = get_architecture("weaktr")
    model_cfg = ViTConfig(img_size=(16, 16), patch_size=4, in_chans=3, embed_dim=D, depth=L, num_heads=H,
                          num_classes=C, final_norm=False, gated=False, **arch.model_fields(C))
    task = ClassificationTask(model=model_cfg.to_dict(), prune=False, arch="weaktr")
    batch = {"image": torch.randn(4, 3, 16, 16), "label": torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])}
    logits, bce, _, _, aux = task._step(batch, train=True)
    assert set(aux) == {"coarse", "fine"}
    out = forward_all(task.model, batch["image"])
    expected = task.model.auxiliary_logits(out)
    torch.testing.assert_close(aux["fine"], F.binary_cross_entropy_with_logits(expected["fine"], batch["label"]))
    torch.testing.assert_close(bce, F.multilabel_soft_margin_loss(logits, batch["label"]))  # MLSM == mean BCE


def test_training_loss_is_the_sum_of_the_three_losses() -> None:
    from weakseg.tasks.classification import ClassificationTask

    arch = get_architecture("weaktr")
    model_cfg = ViTConfig(img_size=(16, 16), patch_size=4, in_chans=3, embed_dim=D, depth=L, num_heads=H,
                          num_classes=C, final_norm=False, gated=False, **arch.model_fields(C))
    task = ClassificationTask(model=model_cfg.to_dict(), prune=False, arch="weaktr")
    task.log = lambda *a, **k: None  # no trainer here
    batch = {"image": torch.randn(4, 3, 16, 16), "label": torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])}
    torch.manual_seed(3)
    loss = task.training_step(batch, 0)
    _, bce, _, _, aux = task._step(batch, train=True)
    torch.testing.assert_close(loss, bce + aux["coarse"] + aux["fine"])
