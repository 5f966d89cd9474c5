"""Lightning task that trains the UNet on (pseudo)masks: stage 3 of the sparse ViT pipeline.

Hanna, Mommert and Borth, "Sparse Multimodal Vision Transformer for Weakly Supervised Semantic Segmentation",
CVPRW 2023, refine their attention pseudomasks by "multiple stages of supervised training of a segmentation
model, utilizing the pseudomasks generated in the previous iteration as supervision". The paper publishes no
settings; the project defaults (reference ``sparse_vit.md`` section 5) are a standard UNet
(:class:`weakseg.models.unet.UNet`), cross-entropy with ignore index 255, AdamW with lr 1e-3, and the UNet's
argmax as the next pseudomask. WeakTr's phase 2 (Zhu et al., IEEE TIP; ``weaktr.md`` 4) is the other network and
loss of the same task: Segmenter (``model="segmenter"``, :mod:`weakseg.models.segmenter`) and the
gradient-clipping loss (``loss="clip"``, :mod:`weakseg.tasks.losses`), with SGD and the poly schedule; the
networks are a registry (:data:`SEGMENTATION_MODELS`), so training and prediction never name one.

Batches are dataset-sample dicts collated by the default collate function: ``image`` float (B, C, H, W),
``mask`` int64 (B, H, W) with 255 = ignore (unlabelled pixels of a pseudomask, or no-data in ground truth)
and, for prediction, ``id`` (list of B strings).

Logged values (``batch_size=`` always the true batch size, defect 17 of the original code):
``train_loss`` (per step and epoch), ``val_loss``, ``val_acc`` (pixel accuracy over non-ignored pixels) and
``val_mIoU``; with the clipping loss also ``train_clip_mu`` (the detached batch-mean loss mu) and
``train_clipped_fraction`` (labelled pixels whose loss was clipped), per step and epoch. Names use ``_`` rather than ``/`` so they can appear in ``ModelCheckpoint`` file-name templates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from weakseg.data.classes import IGNORE_INDEX
from weakseg.errors import ConfigError, DataError
from weakseg.models.segmenter import Segmenter, sliding_window_logits
from weakseg.models.unet import DEFAULT_WIDTHS, UNet
from weakseg.tasks.losses import DEFAULT_CLIP_START, gradient_clipping_loss, masked_cross_entropy

LRSchedule = Literal["constant", "cosine", "poly"]
#: ``--loss``: cross-entropy ignoring 255, or WeakTr's gradient-clipping loss (:mod:`weakseg.tasks.losses`).
SEGMENTATION_LOSSES: tuple[str, ...] = ("ce", "clip")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
#: WeakTr's poly schedule floor (``weaktr.md`` 4.2).
POLY_MIN_LR = 1e-5


def _build_unet(in_chans: int, num_classes: int, widths: Sequence[int], tile_size: Sequence[int],
                settings: dict[str, Any]) -> torch.nn.Module:
    """A UNet of ``widths`` that pads tiles to its size divisor (by reflection) and crops the logits back."""
    return UNet(in_chans=in_chans, num_classes=num_classes, widths=widths, pad_input=True, **settings)


def _build_segmenter(in_chans: int, num_classes: int, widths: Sequence[int], tile_size: Sequence[int],
                     settings: dict[str, Any]) -> torch.nn.Module:
    """Segmenter (ViT encoder + mask transformer) for tiles of ``tile_size``; ``settings`` its encoder and decoder
    sizes (:class:`~weakseg.models.segmenter.Segmenter`)."""
    return Segmenter(in_chans, num_classes, img_size=tuple(tile_size), **settings)


def _head_builder(name: str) -> Callable[..., torch.nn.Module]:
    def build(in_chans: int, num_classes: int, widths: Sequence[int], tile_size: Sequence[int],
              settings: dict[str, Any]) -> torch.nn.Module:
        from weakseg.models.seg_heads import HEADS

        kept = {key: value for key, value in settings.items() if key != "decoder_depth"}  # Segmenter's alone
        return HEADS[name](in_chans, num_classes, img_size=tuple(tile_size), **kept)

    build.__doc__ = (f"``{name}`` (:mod:`weakseg.models.seg_heads`) on the ViT encoder for tiles of ``tile_size``; "
                     "``settings`` the encoder's sizes and ``freeze_encoder``")
    return build


#: The segmentation networks of ``weakseg refine --model``, by name: ``build(in_chans, num_classes, widths,
#: tile_size, settings) -> nn.Module`` mapping (B, C, H, W) images of any size to (B, K, H, W) logits. A network
#: with an ``encoder_parameters()`` method gets ``encoder_lr_scale`` on those parameters. Adding a network here is
#: all the task and the refine pipeline need (training, prediction, resume and scoring do not name the network);
#: one on the ViT encoder also goes into :data:`VIT_ENCODER_MODELS`.
SEGMENTATION_MODELS: dict[str, Callable[..., torch.nn.Module]] = {
    "unet": _build_unet,
    "segmenter": _build_segmenter,
    "vit_linear": _head_builder("vit_linear"),
    "setr_naive": _head_builder("setr_naive"),
    "setr_pup": _head_builder("setr_pup"),
}
#: The networks on weakseg's ViT encoder (:func:`weakseg.models.segmenter.build_vit_encoder`): they take the
#: encoder settings (patch size, width, depth, heads, ``freeze_encoder``; ``settings`` of the builder), can start
#: from a timm file or a classifier's backbone, and have ``encoder_parameters()``. Segmenter with its mask
#: transformer, and the heads on the patch tokens of :mod:`weakseg.models.seg_heads` (Zheng et al., SETR).
VIT_ENCODER_MODELS: tuple[str, ...] = ("segmenter", "vit_linear", "setr_naive", "setr_pup")


def build_segmentation_model(name: str, in_chans: int, num_classes: int, widths: Sequence[int],
                             tile_size: Sequence[int], segmenter: dict[str, Any] | None) -> torch.nn.Module:
    """The network ``name`` of :data:`SEGMENTATION_MODELS`; ``segmenter`` holds the settings of a ViT-encoder
    network (:data:`VIT_ENCODER_MODELS`; ignored by the UNet, whose only setting is ``widths``)."""
    if name not in SEGMENTATION_MODELS:
        raise ConfigError(f"unknown segmentation model {name!r} (--model); choose from {list(SEGMENTATION_MODELS)}")
    settings = dict(segmenter or {}) if name in VIT_ENCODER_MODELS else {}
    return SEGMENTATION_MODELS[name](in_chans, num_classes, widths, tile_size, settings)


class SegmentationTask(L.LightningModule):
    """UNet (or Segmenter) + cross-entropy (ignore 255, or WeakTr's clipping loss) + AdamW (or SGD), with
    validation pixel accuracy and mIoU.

    Args:
        in_chans: input channels of the UNet.
        num_classes: classes (8 DFC classes).
        widths: UNet stage widths, see :class:`~weakseg.models.unet.UNet`.
        lr: AdamW learning rate (project default 1e-3).
        weight_decay: AdamW weight decay, applied to convolution weights only; BatchNorm parameters and biases
            get none because decaying them only shrinks the normalisation scale, it does not regularise.
        lr_schedule: ``"constant"``, or ``"cosine"``: cosine annealing to 0 over all optimiser steps of the
            fit, stepped every batch (needs ``max_epochs`` or ``max_steps`` on the Trainer), or ``"poly"``:
            WeakTr's ``(lr - 1e-5) (1 - step / steps) ** 0.9 + 1e-5``.
        model: a :data:`SEGMENTATION_MODELS` name, ``"unet"``, ``"segmenter"`` or a head on the ViT tokens
            (``"vit_linear"``, ``"setr_naive"``, ``"setr_pup"``; :func:`build_segmentation_model`); ``segmenter``
            the settings of a ViT-encoder network (:class:`weakseg.models.segmenter.Segmenter`,
            :mod:`weakseg.models.seg_heads`; ``freeze_encoder`` trains the decoder / head only) and
            ``tile_size`` the tiles' (H, W).
        loss: ``"ce"`` or ``"clip"`` (:func:`weakseg.tasks.losses.gradient_clipping_loss` with ``clip_start`` and
            ``clip_window``).
        optimizer: ``"adamw"`` or ``"sgd"`` (Nesterov, momentum 0.9, WeakTr's phase 2).
        encoder_lr_scale: learning-rate multiplier of a ViT encoder (WeakTr: 0.1); a frozen encoder's parameters
            are not in the optimiser.
        window, stride: sliding-window prediction (:func:`weakseg.models.segmenter.sliding_window_logits`).
        scales, flip: prediction views whose softmax is averaged (each scale resized back to the tile).

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
        model: str = "unet",
        segmenter: dict[str, Any] | None = None,
        tile_size: Sequence[int] = (64, 64),
        loss: str = "ce",
        clip_start: float = DEFAULT_CLIP_START,
        clip_window: int | None = None,
        optimizer: str = "adamw",
        encoder_lr_scale: float = 1.0,
        window: int | None = None,
        stride: int | None = None,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
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
        if lr_schedule not in ("constant", "cosine", "poly"):
            raise ConfigError(f"lr_schedule must be 'constant', 'cosine' or 'poly', got {lr_schedule!r}")
        if loss not in SEGMENTATION_LOSSES:
            raise ConfigError(f"unknown loss {loss!r} (--loss); choose from {list(SEGMENTATION_LOSSES)}")
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {optimizer!r}; choose from {list(OPTIMIZERS)}")
        if window is not None and window < 1 or stride is not None and stride < 1:
            raise ConfigError(f"sliding window {window} and stride {stride} must be at least 1 (--window, --stride)")
        if window is not None and stride is not None and stride > window:
            raise ConfigError(f"sliding-window stride {stride} is larger than the window {window}: pixels between "
                              "windows would get no prediction (--stride <= --window)")
        if not scales or any(not v > 0 for v in scales):
            raise ConfigError(f"prediction scales must be positive, got {list(scales)} (--predict_scales)")
        widths = [int(w) for w in widths]  # a list, so the saved hparams are plain YAML
        tile_size = [int(v) for v in tile_size]
        scales = [float(v) for v in scales]
        self.save_hyperparameters()
        self.num_classes = num_classes
        # Tiles of any size: padded inside the network to its size divisor, logits cropped back.
        self.model = build_segmentation_model(model, in_chans, num_classes, widths, tile_size, segmenter)
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
        if self.hparams.loss == "clip":
            image, mask = batch["image"], batch["mask"].long()
            self._check_mask(mask, batch)
            loss, stats = gradient_clipping_loss(self(image), mask, float(self.hparams.clip_start),
                                                 self.hparams.clip_window)
            # Every step's mu and clipped share (``*_step`` columns of metrics.csv) and their epoch means.
            self.log("train_clip_mu", stats["mu"], on_step=True, on_epoch=True, batch_size=mask.shape[0])
            self.log("train_clipped_fraction", stats["clipped"], on_step=True, on_epoch=True,
                     batch_size=mask.shape[0])
        else:
            loss, _, mask = self._shared_step(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=mask.shape[0])
        return loss

    def predict_probabilities(self, image: Tensor) -> Tensor:
        """Softmax (B, K, H, W) averaged over the prediction views: each of ``scales`` (resized back to the
        tile) with its horizontal flip when ``flip``, each view by sliding windows (``window``, ``stride``)."""
        H, W = image.shape[-2:]
        total: Tensor | None = None
        views = 0
        for scale in self.hparams.scales:
            size = (max(1, round(H * scale)), max(1, round(W * scale)))
            x = image if size == (H, W) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
            for flipped in ((False, True) if self.hparams.flip else (False,)):
                logits = sliding_window_logits(self, x.flip(-1) if flipped else x, self.hparams.window,
                                               self.hparams.stride)
                logits = logits.flip(-1) if flipped else logits
                if logits.shape[-2:] != (H, W):
                    logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
                prob = logits.softmax(dim=1)
                total = prob if total is None else total + prob
                views += 1
        assert total is not None
        return total / views

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
        prob, pred = self.predict_probabilities(batch["image"]).max(dim=1)  # (B, H, W) each
        return {"id": batch.get("id"), "pred": pred.to(torch.uint8), "prob": prob.float()}

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        encoder = {id(p) for p in getattr(self.model, "encoder_parameters", list)()}
        groups = []
        for in_encoder in (False, True):
            decay, no_decay = [], []
            for param in self.model.parameters():
                if param.requires_grad and (id(param) in encoder) == in_encoder:  # not a frozen encoder
                    (decay if param.ndim > 1 else no_decay).append(param)  # weights vs norms and biases
            scale = float(hp.encoder_lr_scale) if in_encoder else 1.0
            wd = hp.weight_decay if hp.optimizer == "adamw" else 0.0  # WeakTr's SGD: no weight decay
            groups += [g for g in ({"params": decay, "weight_decay": wd, "lr": hp.lr * scale},
                                   {"params": no_decay, "weight_decay": 0.0, "lr": hp.lr * scale}) if g["params"]]
        if hp.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9, nesterov=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        if hp.lr_schedule == "constant":
            return optimizer
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps) or total_steps < 1:
            raise ConfigError(
                f"lr_schedule {hp.lr_schedule!r} needs a finite training length: set max_epochs or max_steps"
            )
        if hp.lr_schedule == "cosine":
            scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(total_steps))
        else:  # poly, as WeakTr's phase 2: (lr - 1e-5) (1 - t / T) ** 0.9 + 1e-5, per group
            bases = [g["lr"] for g in groups]
            floor = min(POLY_MIN_LR, min(bases))

            def poly(step: int, base: float) -> float:
                return ((base - floor) * (1 - min(step, total_steps) / total_steps) ** 0.9 + floor) / base

            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, [lambda step, b=b: poly(step, b) for b in bases])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
