"""ViT-PCM's training terms in the classification task, and the two-stage schedule (any architecture)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from weakseg.errors import ConfigError
from weakseg.models.architectures import get_architecture
from weakseg.tasks.classification import ClassificationTask

C = 3


def model_fields(**kw: object) -> dict:
    return {"img_size": [16, 16], "patch_size": 4, "in_chans": 3, "embed_dim": 16, "depth": 2, "num_heads": 4,
            "num_classes": C, **get_architecture("pcm").model_fields(C), "patch_classifier": "bilstm", **kw}


def batch(n: int = 4) -> dict:
    torch.manual_seed(1)
    return {"image": torch.randn(n, 3, 16, 16), "label": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0],
                                                                        [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]])[:n]}


def test_loss_is_bce_on_pooled_probabilities_plus_l2(monkeypatch: pytest.MonkeyPatch) -> None:
    task = ClassificationTask(model=model_fields(pcm_dropout=0.0), prune=False, pcm_et_weight=0.0, pcm_l2=0.01)
    task.log = lambda *a, **k: None  # type: ignore[method-assign]
    b = batch()
    loss = task.training_step(b, 0)
    task.model.eval()
    pooled = task.model.forward_head(task.model.forward_features(b["image"]), pre_logits=True)
    y = b["label"]
    bce = -(y * pooled.clamp(1e-7).log() + (1 - y) * (1 - pooled).clamp(1e-7).log()).mean()
    l2 = 0.01 * task.model.pcm_head.weight.pow(2).sum()
    torch.testing.assert_close(loss, bce + l2, atol=1e-5, rtol=1e-5)
    no_l2 = ClassificationTask(model=model_fields(pcm_dropout=0.0), prune=False, pcm_et_weight=0.0, pcm_l2=0.0)
    assert no_l2.pcm_terms(b) == {}


def test_equivariance_term_is_added_with_its_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    import weakseg.tasks.equivariance as equivariance

    calls = []

    def fake(model, patch_probs, images, labels, patch_size, crop_prob=0.3, **kw):
        calls.append((tuple(images.shape), patch_size, crop_prob, tuple(patch_probs(images).shape)))
        return torch.tensor(2.0)

    monkeypatch.setattr(equivariance, "equivariance_loss", fake)
    task = ClassificationTask(model=model_fields(), prune=False, pcm_et_weight=0.5, pcm_l2=0.0, pcm_et_crop=0.2)
    terms = task.pcm_terms(batch())
    assert set(terms) == {"pcm_et"} and terms["pcm_et"][0] == 0.5
    assert calls == [((4, 3, 16, 16), 4, 0.2, (4, C, 4, 4))]


def test_other_architectures_have_no_pcm_terms() -> None:
    fields = {**model_fields(), "patch_classifier": None}
    task = ClassificationTask(model=fields, prune=False)
    assert task.pcm_terms(batch()) == {}


def test_trainable_blocks_fixes_the_rest_of_the_backbone() -> None:
    task = ClassificationTask(model=model_fields(), prune=True, trainable_blocks=1)
    stage = {n: task.parameter_stage(n) for n, _ in task.model.named_parameters()}
    assert stage["blocks.0.attn.qkv.weight"] == "fixed" and stage["patch_embed.proj.weight"] == "fixed"
    assert stage["pos_embed"] == "fixed" and stage["cls_token"] == "fixed"
    assert stage["blocks.1.attn.qkv.weight"] == "backbone" and stage["blocks.1.attn.gate.log_alpha"] == "backbone"
    assert stage["norm.weight"] == "backbone"
    assert stage["pcm_head.weight"] == "head" and stage["bilstm.horizontal.weight_ih_l0"] == "head"
    grads = {n: p.requires_grad for n, p in task.model.named_parameters()}
    assert not grads["blocks.0.mlp.fc1.weight"] and grads["blocks.1.mlp.fc1.weight"] and grads["pcm_head.weight"]
    with pytest.raises(ConfigError, match="trainable_blocks"):
        ClassificationTask(model=model_fields(), prune=False, trainable_blocks=3)


class _Tiles(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.items = [batch(4)] * 2

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        b = self.items[0]
        return {"image": b["image"][i % 4], "label": b["label"][i % 4]}


class _Snapshots(L.Callback):
    def __init__(self) -> None:
        self.epochs: list[dict[str, torch.Tensor]] = []
        self.lrs: list[list[float]] = []

    def on_train_epoch_end(self, trainer, module) -> None:
        self.epochs.append({n: p.detach().clone() for n, p in module.model.named_parameters()})

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_two_stage_schedule_freezes_then_trains_the_last_blocks() -> None:
    torch.manual_seed(0)
    task = ClassificationTask(model=model_fields(), prune=False, pcm_et_weight=0.0, optimizer="adam", lr=1e-3,
                              lr_scheduler=False, frozen_epochs=1, trainable_blocks=1, frozen_lr=1e-2)
    start = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    snaps = _Snapshots()
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[snaps], limit_val_batches=0)
    trainer.fit(task, torch.utils.data.DataLoader(_Tiles(), batch_size=4))
    first, second = snaps.epochs

    def moved(a: dict, b: dict, name: str) -> bool:
        return not torch.equal(a[name], b[name])

    assert moved(start, first, "pcm_head.weight") and moved(start, first, "bilstm.vertical.weight_ih_l0")
    assert not moved(start, first, "blocks.1.attn.qkv.weight") and not moved(start, first, "norm.weight")
    assert moved(first, second, "blocks.1.attn.qkv.weight") and moved(first, second, "norm.weight")
    assert not moved(start, second, "blocks.0.attn.qkv.weight") and not moved(start, second, "patch_embed.proj.weight")
    # learning rates per group: heads at frozen_lr then lr; the backbone at 0 then lr (2 steps per epoch)
    head_lrs = {round(lr, 6) for step in snaps.lrs[:2] for lr in step}
    assert head_lrs == {0.0, 0.01}
    assert {round(lr, 6) for lr in snaps.lrs[-1]} == {0.001}
