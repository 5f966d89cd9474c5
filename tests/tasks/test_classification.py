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


# ---- training options the demo relies on ---------------------------------------------------------------------
def _param_groups(task: ClassificationTask) -> dict[str, dict]:
    """Parameter name -> its optimizer param group (each parameter must be in exactly one)."""
    opt = task.configure_optimizers()
    group_of = {}
    for group in opt.param_groups:
        for p in group["params"]:
            assert id(p) not in group_of, "a parameter is in two groups"
            group_of[id(p)] = group
    names = dict(task.model.named_parameters())
    assert set(group_of) == {id(p) for p in names.values()}, "a parameter is in no group"
    return {name: group_of[id(p)] for name, p in names.items()}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_gate_learning_rate_is_scaled_and_other_parameters_keep_the_base_rate(optimizer: str) -> None:
    task = ClassificationTask(model=ONE_CLS, prune=True, lr=2e-3, gate_lr_scale=5.0, optimizer=optimizer,
                              lr_scheduler=False)
    groups = _param_groups(task)
    gates = [name for name in groups if name.endswith("log_alpha")]
    assert len(gates) == ONE_CLS["depth"]
    for name, group in groups.items():
        assert group["lr"] == pytest.approx(1e-2 if name in gates else 2e-3), name


def test_weight_decay_skips_gates_norms_biases_and_embeddings() -> None:
    task = ClassificationTask(model=CLASS_TOKENS, prune=True, weight_decay=0.07, lr_scheduler=False,
                              arch="class_tokens")
    groups = _param_groups(task)
    decayed = {name for name, group in groups.items() if group["weight_decay"] > 0}
    assert all(groups[name]["weight_decay"] == pytest.approx(0.07) for name in decayed)
    plain = set(groups) - decayed
    assert {"pos_embed", "cls_token", "reg_token"} <= plain
    assert {name for name in groups if name.endswith("log_alpha")} <= plain
    assert all(name in plain for name in groups if name.endswith(".bias") or ".norm" in name or "norm" in name)
    # the matrices are decayed: attention, MLP, patch embedding and head weights
    assert "blocks.0.attn.qkv.weight" in decayed and "blocks.1.mlp.fc1.weight" in decayed
    assert "patch_embed.proj.weight" in decayed and "head.weight" in decayed
    assert decayed == {name for name, p in task.model.named_parameters()
                       if p.ndim >= 2 and not name.endswith("log_alpha")
                       and name not in ("pos_embed", "cls_token", "reg_token")}


def test_gate_init_sets_every_initial_log_alpha() -> None:
    torch.manual_seed(0)
    task = ClassificationTask(model={**ONE_CLS, "gate_init": 1.5}, prune=True)
    alphas = torch.cat([g.log_alpha.detach().flatten() for g in task.model.gates])
    assert alphas.numel() == 4 and torch.equal(alphas, torch.full((4,), 1.5))
    default = ClassificationTask(model=ONE_CLS, prune=True)  # Xavier-uniform: spread, not constant
    assert torch.cat([g.log_alpha.detach().flatten() for g in default.model.gates]).unique().numel() == 4


def _at_step(task: ClassificationTask, step: int):
    from unittest.mock import PropertyMock, patch

    return patch.object(type(task), "global_step", new_callable=PropertyMock, return_value=step)


def test_l0_warmup_ramps_lambda_linearly_from_zero() -> None:
    task = ClassificationTask(model=ONE_CLS, prune=True, pr_rate=0.4, l0_warmup_steps=100)
    weights = []
    for step in (0, 25, 50, 100, 300):
        with _at_step(task, step):
            weights.append(task.l0_weight())
    assert weights == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.4])
    no_warmup = ClassificationTask(model=ONE_CLS, prune=True, pr_rate=0.4)
    with _at_step(no_warmup, 0):
        assert no_warmup.l0_weight() == pytest.approx(0.4)


def _penalty_in_loss(task: ClassificationTask, step: int) -> float:
    """The training loss minus its BCE (same random gate draws), at optimiser step ``step``."""
    data = batch()
    with _at_step(task, step):
        torch.manual_seed(1)
        loss = task.training_step(data, 0)
    torch.manual_seed(1)
    _, bce, _, _, _ = task._step(data, train=True)
    return float((loss - bce).detach())


def _open_probability_sum(task: ClassificationTask) -> float:
    with torch.no_grad():
        return float(sum(g.open_probability().sum() for g in task.model.gates))


def test_l0_penalty_in_the_loss_follows_warmup_and_normalisation() -> None:
    torch.manual_seed(0)
    summed = ClassificationTask(model=ONE_CLS, prune=True, pr_rate=0.4, l0_warmup_steps=10)
    total = _open_probability_sum(summed)  # the L0 penalty: expected number of open gates
    assert _penalty_in_loss(summed, 0) == pytest.approx(0.0, abs=1e-6)  # warm-up starts at lambda 0
    assert _penalty_in_loss(summed, 5) == pytest.approx(0.2 * total, rel=1e-4)
    assert _penalty_in_loss(summed, 10) == pytest.approx(0.4 * total, rel=1e-4)
    torch.manual_seed(0)
    mean = ClassificationTask(model=ONE_CLS, prune=True, pr_rate=0.4, l0_normalize=True)
    heads = ONE_CLS["depth"] * ONE_CLS["num_heads"]
    assert _open_probability_sum(mean) == pytest.approx(total)  # same seed, same gates
    assert _penalty_in_loss(mean, 0) == pytest.approx(0.4 * total / heads, rel=1e-4)  # the mean, not the sum


# ---- checkpoint files that are not checkpoints ----------------------------------------------------------------
@pytest.fixture()
def saved_checkpoint(tmp_path):
    task = ClassificationTask(model=ONE_CLS, prune=True)
    path = tmp_path / "good.ckpt"
    torch.save({"hyper_parameters": dict(task.hparams), "state_dict": task.state_dict(), "epoch": 0}, path)
    return path


def test_a_complete_checkpoint_loads(saved_checkpoint) -> None:
    from weakseg.tasks.classification import load_classifier

    assert load_classifier(saved_checkpoint).model_config.gated


@pytest.mark.parametrize("kind, message", [
    ("folder", "is a folder, not a checkpoint file (--model_checkpoint); it holds"),
    ("missing", "does not exist (--model_checkpoint)"),
    ("empty", "the file is empty (0 bytes), not a PyTorch checkpoint"),
    ("truncated", "(--model_checkpoint): it is not a complete PyTorch checkpoint"),
    ("text", "(--model_checkpoint): it is not a complete PyTorch checkpoint"),
    ("legacy_truncated", "(--model_checkpoint): it is not a complete PyTorch checkpoint"),
    ("not_a_dict", "is not a checkpoint (--model_checkpoint): it holds a list"),
])
def test_unreadable_checkpoints_say_what_is_wrong_with_the_file(saved_checkpoint, tmp_path, kind, message) -> None:
    from weakseg.tasks.classification import load_classifier

    path = tmp_path / f"{kind}.ckpt"
    if kind == "folder":
        path = tmp_path / "run"
        (path / "checkpoints").mkdir(parents=True)
        (path / "checkpoints" / "best.ckpt").write_bytes(saved_checkpoint.read_bytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = saved_checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("epoch: 3\nthis is a YAML file, not a checkpoint\n")
    elif kind == "legacy_truncated":  # the pre-zip format: pickle's own "Memo value not found" / EOF errors
        torch.save({"a": torch.zeros(100)}, path, _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes()[:60])
    elif kind == "not_a_dict":
        torch.save([1, 2], path)
    with pytest.raises(ConfigError) as e:
        load_classifier(path)
    assert message in str(e.value) and str(path) in str(e.value)
    if kind == "folder":
        assert str(path / "checkpoints" / "best.ckpt") in str(e.value)


# ---- pruning to a target (issue 8) -----------------------------------------------------------------------------
TARGET_VIT = {**ONE_CLS, "depth": 3, "num_heads": 4}  # 12 heads


def _closed_heads(task: ClassificationTask) -> int:
    return int((~task.model.head_mask()).sum())


def _fit(task: ClassificationTask, steps: int, accumulate: int = 1, callbacks: tuple = ()) -> None:
    """A real Lightning run on random tensors (96 images of 16 x 16, batches of 4)."""
    import lightning as L
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    images = torch.randn(96, 3, 16, 16, generator=g)
    labels = (torch.rand(96, C, generator=g) < 0.4).float()
    loader = DataLoader([{"image": images[i], "label": labels[i]} for i in range(96)], batch_size=4, shuffle=True)
    trainer = L.Trainer(max_steps=steps, max_epochs=10_000, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=list(callbacks))
    trainer.fit(task, loader)


def _count_after_each_batch():
    """A Lightning callback recording the closed heads before the first batch (``first``) and (optimiser steps
    taken, closed heads) after every training batch (``rows``)."""
    import lightning as L

    class Recorder(L.Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[int, int]] = []
            self.first: int | None = None

        def on_train_batch_start(self, trainer, task, batch, batch_idx) -> None:
            if self.first is None:
                self.first = _closed_heads(task)

        def on_train_batch_end(self, trainer, task, outputs, batch, batch_idx) -> None:
            self.rows.append((trainer.global_step, _closed_heads(task)))

    return Recorder()


@pytest.mark.parametrize("steps, accumulate", [(12, 1), (120, 1), (16, 2)])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_target_is_followed_after_every_optimiser_step_in_short_and_long_runs(steps, accumulate) -> None:
    """Closed heads after optimiser step s = round(12 * 0.5 * min(1, s / (0.5 * steps))): the ramp, then exactly 6,
    the same in a 12-step and a 120-step run, and once per optimiser step with gradient accumulation."""
    torch.manual_seed(0)
    task = ClassificationTask(model={**TARGET_VIT, "gate_init": 3.0}, prune=True, target_pruned_fraction=0.5,
                              target_warmup=0.5, lr_scheduler=False)
    recorder = _count_after_each_batch()
    _fit(task, steps, accumulate, (recorder,))
    assert recorder.rows[-1] == (steps, 6)
    for step, closed in recorder.rows:
        expected = math.floor(12 * 0.5 * min(1.0, step / (0.5 * steps)) + 0.5)
        assert closed == expected, (step, closed, expected)
    assert len(recorder.rows) == steps * accumulate


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_with_a_target_no_head_starts_pruned_by_its_initial_log_alpha() -> None:
    """Xavier-uniform init (about half the log alphas <= 0) with a target: every head is open before step 1."""
    torch.manual_seed(0)
    task = ClassificationTask(model=TARGET_VIT, prune=True, target_pruned_fraction=0.5, lr_scheduler=False)
    assert _closed_heads(task) > 0  # the paper's init would prune these at once
    recorder = _count_after_each_batch()
    _fit(task, 2, callbacks=(recorder,))
    assert recorder.first == 0


def test_training_defaults_start_every_gate_open_and_prune_to_half() -> None:
    from weakseg.pipeline.train import TrainConfig

    cfg = TrainConfig(prune=True)
    assert (cfg.target_pruned_fraction, cfg.target_warmup, cfg.gate_init, cfg.pr_rate) == (0.5, 0.5, 3.0, None)
    task = ClassificationTask(model={**TARGET_VIT, "gate_init": cfg.gate_init}, prune=True,
                              target_pruned_fraction=cfg.target_pruned_fraction)
    alphas = torch.cat([g.log_alpha.detach().flatten() for g in task.model.gates])
    assert torch.equal(alphas, torch.full((12,), 3.0)) and _closed_heads(task) == 0


def test_a_target_replaces_the_l0_penalty() -> None:
    torch.manual_seed(0)
    task = ClassificationTask(model=TARGET_VIT, prune=True, target_pruned_fraction=0.5, pr_rate=0.4)
    assert _penalty_in_loss(task, 5) == 0.0  # the loss is the BCE alone
    with pytest.raises(ConfigError, match="--target_pruned_fraction"):
        ClassificationTask(model=TARGET_VIT, prune=True, target_pruned_fraction=1.0)


def test_logged_map_averages_the_classes_present_only():
    from weakseg.pipeline.sanity import average_precision
    from weakseg.tasks.classification import PresentClassAveragePrecision

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(20, 3, generator=g)
    target = (torch.rand(20, 3, generator=g) < 0.5).int()
    target[:, 2] = 0  # class 2 absent from the split: torchmetrics' macro AP counts it as 0
    metric = PresentClassAveragePrecision(num_labels=3, average=None)
    metric.update(probs[:8], target[:8])
    metric.update(probs[8:], target[8:])
    expected = sum(average_precision(probs[:, k].double(), target[:, k].double()) for k in (0, 1)) / 2
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-6)


def test_pruning_settles_when_the_ramp_reaches_the_target():
    from types import SimpleNamespace

    from weakseg.tasks.classification import ClassificationTask

    def task(target, step, total=100):
        return SimpleNamespace(uses_target=target is not None, hparams=SimpleNamespace(target_pruned_fraction=target),
                               current_target=lambda: 0.0 if target is None else target * min(1, step / (0.5 * total)))

    assert ClassificationTask.pruning_settled(task(None, 0))  # the paper's L0: nothing to wait for
    assert not ClassificationTask.pruning_settled(task(0.5, 49))
    assert ClassificationTask.pruning_settled(task(0.5, 50))
