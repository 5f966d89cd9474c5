"""Lightning task that trains the UNet on (pseudo)masks: stage 3 of the sparse ViT pipeline.

Hanna, Mommert and Borth, "Sparse Multimodal Vision Transformer for Weakly Supervised Semantic Segmentation",
CVPRW 2023, refine their attention pseudomasks by "multiple stages of supervised training of a segmentation
model, utilizing the pseudomasks generated in the previous iteration as supervision". The paper publishes no
settings; the project defaults (reference ``sparse_vit.md`` section 5) are a standard UNet
(:class:`weakseg.models.unet.UNet`), cross-entropy with ignore index 255, AdamW with lr 1e-3, and the UNet's
argmax as the next pseudomask.

Batches are dataset-sample dicts collated by the default collate function: ``image`` float (B, C, H, W),
``mask`` int64 (B, H, W) with 255 = ignore (unlabelled pixels of a pseudomask, or no-data in ground truth)
and, for prediction, ``id`` (list of B strings).

Logged values (``batch_size=`` always the true batch size, defect 17 of the original code):
``train_loss`` (per step and epoch), ``val_loss``, ``val_acc`` (pixel accuracy over non-ignored pixels) and
``val_mIoU``. Names use ``_`` rather than ``/`` so they can appear in ``ModelCheckpoint`` file-name templates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from weakseg.data.classes import IGNORE_INDEX
from weakseg.errors import ConfigError, DataError
from weakseg.models.unet import DEFAULT_WIDTHS, UNet

LRSchedule = Literal["constant", "cosine"]


def masked_cross_entropy(logits: Tensor, mask: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy over the pixels whose label is not ``ignore_index``.

    ``F.cross_entropy(..., ignore_index=...)`` with ``reduction="mean"`` divides by the number of labelled
    pixels and returns NaN (0 / 0) when a batch has none, which happens with pseudomasks that leave whole
    tiles unlabelled. Summing and dividing by ``max(count, 1)`` returns 0 instead, still attached to the
    graph, so ``backward`` gives zero gradients rather than NaN weights.

    Args:
        logits: (B, K, H, W) class scores.
        mask: (B, H, W) int64 labels in ``[0, K)`` or ``ignore_index``.
        ignore_index: label that contributes neither loss nor count.
    """
    loss_sum = F.cross_entropy(logits, mask, ignore_index=ignore_index, reduction="sum")
    labelled = (mask != ignore_index).sum().clamp_min(1)
    return loss_sum / labelled


class SegmentationTask(L.LightningModule):
    """UNet + cross-entropy (ignore 255) + AdamW, with validation pixel accuracy and mIoU.

    Args:
        in_chans: input channels of the UNet.
        num_classes: classes (8 DFC classes).
        widths: UNet stage widths, see :class:`~weakseg.models.unet.UNet`.
        lr: AdamW learning rate (project default 1e-3).
        weight_decay: AdamW weight decay, applied to convolution weights only; BatchNorm parameters and biases
            get none because decaying them only shrinks the normalisation scale, it does not regularise.
        lr_schedule: ``"constant"``, or ``"cosine"``: cosine annealing to 0 over all optimiser steps of the
            fit, stepped every batch (needs ``max_epochs`` or ``max_steps`` on the Trainer).

    Raises:
        ConfigError: on a non-positive ``lr``, a negative ``weight_decay``, ``num_classes`` outside [1, 255)
            or an unknown ``lr_schedule``.

    mIoU is torchmetrics' ``MulticlassJaccardIndex(average="macro", ignore_index=255)`` accumulated over the
    whole validation epoch: a class that neither occurs in the ground truth nor is predicted is left out of
    the mean (it does not count as 0 or 1), but a class that is predicted without occurring in the ground
    truth counts with IoU 0. This differs slightly from the final evaluation (``weakseg.evaluation.metrics``,
    mean over classes present in the ground truth) and is meant for model selection during training only.
    """

    def __init__(
        self,
        in_chans: int = 13,
        num_classes: int = 8,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        lr_schedule: LRSchedule = "constant",
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ConfigError(f"learning rate (lr) must be positive, got {lr}")
        if weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
        if not 0 < num_classes < IGNORE_INDEX:
            raise ConfigError(
                f"num_classes must be in [1, {IGNORE_INDEX}) for uint8 masks with 255 = ignore, "
                f"got {num_classes}"
            )
        if lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        widths = [int(w) for w in widths]  # a list, so the saved hparams are plain YAML
        self.save_hyperparameters()
        self.num_classes = num_classes
        # Tiles of any size: padded inside the UNet to its size divisor, logits cropped back (models/unet.py).
        self.model = UNet(in_chans=in_chans, num_classes=num_classes, widths=widths, pad_input=True)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE_INDEX),
                "mIoU": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=IGNORE_INDEX),
            }
        )
        self.val_metrics = metrics.clone(prefix="val_")

    def forward(self, image: Tensor) -> Tensor:
        """Image (B, C, H, W) -> logits (B, num_classes, H, W)."""
        return self.model(image)

    def _check_mask(self, mask: Tensor, batch: dict[str, Any]) -> None:
        """Labels outside ``[0, K)`` and not 255 would crash cross-entropy (a device assert on CUDA)."""
        bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= self.num_classes))
        if bool(bad.any()):
            values = torch.unique(mask[bad]).tolist()[:10]
            raise DataError(
                f"mask values {values} of tiles {batch.get('id', '?')} are neither a class id in "
                f"[0, {self.num_classes}) nor the ignore index {IGNORE_INDEX}; "
                f"check num_classes and the masks"
            )

    def _shared_step(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        image, mask = batch["image"], batch["mask"].long()  # (B, C, H, W), (B, H, W)
        self._check_mask(mask, batch)
        logits = self(image)  # (B, K, H, W)
        return masked_cross_entropy(logits, mask), logits, mask

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, _, mask = self._shared_step(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=mask.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, logits, mask = self._shared_step(batch)
        batch_size = mask.shape[0]
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.val_metrics.update(logits.argmax(dim=1), mask)
        self.log_dict(self.val_metrics, on_epoch=True, prog_bar=True, batch_size=batch_size)
        return loss

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Per-pixel prediction: ``pred`` uint8 (B, H, W) argmax, ``prob`` float32 (B, H, W) its probability.

        Lightning runs prediction in eval mode under ``torch.inference_mode``; ``id`` is passed through (None
        when the batch has none) so a writer can name the output files.
        """
        prob, pred = self(batch["image"]).softmax(dim=1).max(dim=1)  # (B, H, W) each
        return {"id": batch.get("id"), "pred": pred.to(torch.uint8), "prob": prob.float()}

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for param in self.model.parameters():
            (decay if param.ndim > 1 else no_decay).append(param)  # conv weights vs BN weights and biases
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
        )
        if self.hparams.lr_schedule == "constant":
            return optimizer
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps) or total_steps < 1:
            raise ConfigError(
                "lr_schedule 'cosine' needs a finite training length: set max_epochs or max_steps"
            )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
