"""Barlow Twins pretraining of the ViT backbone on unlabelled tiles (Zbontar et al., ICML 2021; the study of
self-supervised ViTs by Apavou & Zucker, RecvisProject; ``ssl_vit.md`` sections 1 and 4).

Two views of each tile (:mod:`weakseg.data.ssl_views`) pass through the same backbone and projector; the loss
makes the batch cross-correlation C of the two embeddings the identity: invariance on the diagonal, redundancy
reduction off it. The backbone is a plain (ungated) :class:`~weakseg.models.vit.GatedViT` whose pooled CLS
feature feeds the projector; its state dict keeps timm's names, so ``weakseg train --pretrained`` loads it into
every classifier architecture (their gates, class tokens and heads keep their own initialisation).

The loss batch is the per-device batch: C and the standardisation come from it alone. Gradient accumulation
makes the optimiser step see more tiles but not C (RecvisProject's 6 x 8 was a Barlow Twins batch of 6), and
under DDP every device computes C on its own batch; the start-up line says so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from weakseg.models.barlow_twins import Projector
from weakseg.models.vit import GatedViT, ViTConfig

#: BatchNorm1d's epsilon: the reference standardises with BatchNorm1d(affine=False).
STANDARDIZE_EPS = 1e-5


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float) -> tuple[Tensor, Tensor]:
    """Barlow Twins loss of two (B, P) embeddings of the same B tiles, and their cross-correlation C.

    Each dimension is standardised over the batch (biased variance, as ``BatchNorm1d(affine=False)`` in
    training), ``C = z1^T z2 / B`` (P x P), and ``L = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2``.
    Every term is a sum over the batch, so the loss does not depend on the order of the tiles. C is returned
    (the logging reads it), never kept on an object.

    Raises:
        ValueError: shapes differ, or a batch of fewer than 2 tiles (no batch statistics).
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"two (B, P) embeddings of the same shape are needed, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    B = z1.shape[0]
    if B < 2:
        raise ValueError(f"Barlow Twins needs a batch of at least 2 tiles, got {B}")
    n1 = (z1 - z1.mean(dim=0)) / torch.sqrt(z1.var(dim=0, unbiased=False) + STANDARDIZE_EPS)  # (B, P)
    n2 = (z2 - z2.mean(dim=0)) / torch.sqrt(z2.var(dim=0, unbiased=False) + STANDARDIZE_EPS)
    c = n1.T @ n2 / B  # (P, P)
    diag = torch.diagonal(c)
    on = (1 - diag).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return on + lambd * off, c


def correlation_stats(c: Tensor) -> dict[str, Tensor]:
    """Mean of diag(C) (target 1) and root mean square of its off-diagonal entries (target 0)."""
    P = c.shape[0]
    diag = torch.diagonal(c)
    off_sq = (c.pow(2).sum() - diag.pow(2).sum()) / max(P * (P - 1), 1)
    return {"diag_mean": diag.mean(), "offdiag_rms": off_sq.sqrt()}


class BarlowTwinsTask(L.LightningModule):
    """Backbone + projector trained with :func:`barlow_twins_loss`.

    Args:
        model: the backbone's :class:`ViTConfig` as a dict (``gated=False``; the head is dropped).
        views: ``"augment"`` or ``"cross_modal"`` (view 1 through the S2 patch embedding, view 2 through S1's).
        projector_dim, projector_layers, lambd: the projector and the off-diagonal weight.
        lr, weight_decay, warmup_epochs: AdamW with linear warm-up then cosine decay to 0, per step
            (RecvisProject's AdamW; no decay on norms, biases, position and class embeddings).
        data_config: normalisation and band statistics of the tiles, saved with the checkpoint.

    Batches: ``{"view1": (B, C1, H, W), "view2": (B, C2, H, W)}``. ``training_step`` returns the loss and C.
    Logged: ``train_loss``, ``train_diag_mean``, ``train_offdiag_rms``.
    """

    def __init__(self, model: dict[str, Any], views: str = "augment", projector_dim: int = 512,
                 projector_layers: int = 3, lambd: float = 5e-3, lr: float = 1e-3, weight_decay: float = 1e-5,
                 warmup_epochs: float = 10.0, data_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_config = ViTConfig(**model)
        self.backbone = GatedViT(self.model_config)
        self.backbone.head = nn.Identity()  # the projector reads the pooled feature; no classes here
        self.projector = Projector(self.model_config.embed_dim, projector_dim, projector_layers)

    def features(self, x: Tensor, modality: str | None = None) -> Tensor:
        """(B, C, H, W) -> (B, D): the pooled CLS feature after the final norm."""
        return self.backbone.forward_head(self.backbone.forward_features(x, modality=modality), pre_logits=True)

    def embeddings(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        cross = self.hparams.views == "cross_modal"
        z1 = self.projector(self.features(batch["view1"], "s2" if cross else None))  # (B, P)
        z2 = self.projector(self.features(batch["view2"], "s1" if cross else None))  # (B, P)
        return z1, z2

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        z1, z2 = self.embeddings(batch)
        loss, c = barlow_twins_loss(z1.float(), z2.float(), float(self.hparams.lambd))
        B = z1.shape[0]
        stats = correlation_stats(c.detach())
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=B)
        self.log("train_diag_mean", stats["diag_mean"], on_step=False, on_epoch=True, batch_size=B)
        self.log("train_offdiag_rms", stats["offdiag_rms"], on_step=False, on_epoch=True, batch_size=B)
        return {"loss": loss, "C": c.detach()}

    def configure_optimizers(self) -> Any:
        no_decay = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        decay, plain = [], []
        for name, p in self.named_parameters():
            (plain if name in no_decay or p.ndim <= 1 else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(self.hparams.weight_decay)},
                                 {"params": plain, "weight_decay": 0.0}], lr=float(self.hparams.lr))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, int(self.trainer.max_epochs or 1))
        warmup = min(total - 1, int(round(total * float(self.hparams.warmup_epochs) / epochs)))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """The backbone's tensors in timm's layout (what ``--pretrained`` reads)."""
        return {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()}


class CrossCorrelationLog(Callback):
    """Running mean of C over the training batches; every ``every_n_epochs`` (and at the last epoch) a heatmap
    ``figures/cross_correlation_epochNNN.png`` with a fixed colour range [-1, 1], then a reset (``ssl_vit.md`` 4).

    It reads C from ``training_step``'s return value, so nothing is stashed on the loss or the module.
    """

    def __init__(self, out_dir: str | Path, every_n_epochs: int = 10, enabled: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.every = max(1, int(every_n_epochs))
        self.enabled = enabled
        self._sum: Tensor | None = None
        self._count = 0
        self._since = 1  # first epoch of the running mean
        self.written: list[Path] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.enabled or not isinstance(outputs, dict) or "C" not in outputs:
            return
        c = outputs["C"].float().cpu()
        self._sum = c if self._sum is None else self._sum + c
        self._count += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = epoch >= (trainer.max_epochs or epoch)
        if self._sum is None or not (epoch % self.every == 0 or last):
            return
        mean = self._sum / self._count
        since, self._since = self._since, epoch + 1
        self._sum, self._count = None, 0
        if not trainer.is_global_zero:
            return
        from weakseg.viz.figures import plot_cross_correlation

        stats = correlation_stats(mean)
        path = self.out_dir / "figures" / f"cross_correlation_epoch{epoch:03d}.png"
        epochs = f"epoch {epoch}" if since == epoch else f"epochs {since}-{epoch}"
        self.written.append(plot_cross_correlation(
            mean.numpy(), path, title=f"Barlow Twins C, mean over the batches of {epochs}: mean diag "
                                      f"{float(stats['diag_mean']):.3f}, off-diagonal RMS "
                                      f"{float(stats['offdiag_rms']):.3f}"))
