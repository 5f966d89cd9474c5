"""Tests of weakseg.tasks.segmentation: loss with ignore 255, overfitting, prediction, a Trainer smoke run."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from weakseg.errors import ConfigError, DataError
from weakseg.tasks.losses import masked_cross_entropy
from weakseg.tasks.segmentation import SegmentationTask

# Steps called directly (outside a Trainer) make self.log warn; that is expected here.
pytestmark = pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")

WIDTHS = (4, 8)  # one pooling: sizes must be even
NUM_CLASSES = 3


def tiny_batch(seed: int = 0, batch: int = 2, size: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 4, size, size, generator=g)
    mask = torch.randint(0, NUM_CLASSES, (batch, size, size), generator=g)
    mask[:, 0, :] = 255  # one ignored row per tile
    return {"image": image, "mask": mask, "id": [f"tile{i}" for i in range(batch)]}


def make_task(**kwargs: object) -> SegmentationTask:
    torch.manual_seed(0)
    return SegmentationTask(in_chans=4, num_classes=NUM_CLASSES, widths=WIDTHS, **kwargs)


def test_masked_cross_entropy_matches_hand_computed_value() -> None:
    logits = torch.zeros(1, 2, 1, 3)
    logits[0, 0, 0, 0] = math.log(3.0)  # pixel 0: p(class 0) = 3/4
    mask = torch.tensor([[[0, 1, 255]]])  # pixel 1: p(class 1) = 1/2; pixel 2 ignored
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert masked_cross_entropy(logits, mask).item() == pytest.approx(expected, rel=1e-6)
    assert masked_cross_entropy(logits, mask).item() == pytest.approx(
        F.cross_entropy(logits, mask, ignore_index=255).item(), rel=1e-6
    )


def test_training_step_returns_finite_loss() -> None:
    task = make_task()
    loss = task.training_step(tiny_batch(), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert loss.item() > 0


def test_all_ignored_batch_gives_zero_loss_and_no_nan() -> None:
    task = make_task()
    batch = tiny_batch()
    batch["mask"].fill_(255)
    loss = task.training_step(batch, 0)
    assert loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in task.parameters() if p.grad is not None]
    assert grads, "the zero loss must stay attached to the graph"
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads)


def test_invalid_mask_value_raises_data_error() -> None:
    task = make_task()
    batch = tiny_batch()
    batch["mask"][0, 3, 3] = 7
    with pytest.raises(DataError, match=r"mask values \[7\] of tiles \['tile0', 'tile1'\]"):
        task.training_step(batch, 0)


def test_few_steps_overfit_one_batch() -> None:
    task = make_task(lr=1e-2, weight_decay=0.0)
    batch = tiny_batch(batch=2, size=8)
    batch["mask"] = torch.where(batch["mask"] == 255, 255, batch["image"][:, :NUM_CLASSES].argmax(dim=1))
    optimizer = task.configure_optimizers()
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = task.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_weight_decay_skips_batchnorm_and_biases() -> None:
    task = make_task(weight_decay=0.05)
    optimizer = task.configure_optimizers()
    decay_group, no_decay_group = optimizer.param_groups
    assert decay_group["weight_decay"] == 0.05 and no_decay_group["weight_decay"] == 0.0
    assert all(p.ndim == 4 for p in decay_group["params"])
    assert all(p.ndim == 1 for p in no_decay_group["params"])
    assert len(decay_group["params"]) + len(no_decay_group["params"]) == len(list(task.parameters()))


def test_predict_step_shapes_and_dtypes() -> None:
    task = make_task().eval()
    batch = tiny_batch(batch=3, size=6)
    with torch.inference_mode():
        out = task.predict_step(batch, 0)
        logits = task(batch["image"])
    assert out["id"] == ["tile0", "tile1", "tile2"]
    assert out["pred"].shape == (3, 6, 6) and out["pred"].dtype == torch.uint8
    assert out["prob"].shape == (3, 6, 6) and out["prob"].dtype == torch.float32
    assert torch.equal(out["pred"].long(), logits.argmax(dim=1))
    assert torch.allclose(out["prob"], logits.softmax(dim=1).amax(dim=1))
    assert (out["prob"] >= 1.0 / NUM_CLASSES - 1e-6).all() and (out["prob"] <= 1.0).all()


def test_hyperparameters_are_saved() -> None:
    task = make_task(lr=3e-4, lr_schedule="cosine")
    assert task.hparams.lr == 3e-4
    assert task.hparams.widths == list(WIDTHS)
    assert task.hparams.lr_schedule == "cosine"
    assert task.hparams.num_classes == NUM_CLASSES


def test_val_miou_skips_absent_classes_but_counts_false_positives() -> None:
    """The documented torchmetrics behaviour: absent and unpredicted classes are left out of the mean."""
    task = make_task()
    miou = task.val_metrics["mIoU"]
    target = torch.tensor([[[0, 0, 1, 255]]])
    miou.update(torch.tensor([[[0, 0, 1, 2]]]), target)  # class 2 absent, predicted only on an ignored pixel
    assert miou.compute().item() == pytest.approx(1.0)  # mean over classes 0 and 1
    miou.reset()
    miou.update(torch.tensor([[[0, 2, 1, 1]]]), target)  # class 2 predicted on a labelled pixel: IoU 0 counts
    assert miou.compute().item() == pytest.approx((0.5 + 1.0 + 0.0) / 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr": 0.0}, "lr"), ({"weight_decay": -1.0}, "weight_decay"), ({"lr_schedule": "step"}, "lr_schedule")],
)
def test_bad_settings_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_task(**kwargs)
    with pytest.raises(ConfigError, match="num_classes"):
        SegmentationTask(in_chans=4, num_classes=255, widths=WIDTHS)


class TinySegmentationDataset(Dataset):
    """Four 8x8 tiles, one of them entirely unlabelled."""

    def __init__(self) -> None:
        batch = tiny_batch(seed=1, batch=4)
        batch["mask"][3] = 255
        self.samples = [{k: v[i] for k, v in batch.items()} for i in range(4)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def test_trainer_fast_dev_run_fit_validate_predict() -> None:
    task = make_task(lr_schedule="cosine")
    loader = DataLoader(TinySegmentationDataset(), batch_size=2)
    trainer = L.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, train_dataloaders=loader, val_dataloaders=loader)
    metrics = trainer.callback_metrics
    for name in ("train_loss", "val_loss", "val_acc", "val_mIoU"):
        assert name in metrics and torch.isfinite(metrics[name]), name
    assert 0.0 <= metrics["val_mIoU"].item() <= 1.0
    predictions = trainer.predict(task, dataloaders=loader)
    assert predictions[0]["pred"].shape == (2, 8, 8)
    assert predictions[0]["id"] == ["tile0", "tile1"]
