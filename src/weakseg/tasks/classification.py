"""Multi-label classification with head pruning: stage 1 of the sparse ViT WSSS pipeline.

Hanna, Mommert and Borth, "Sparse Multimodal Vision Transformer for Weakly Supervised Semantic Segmentation",
CVPRW 2023. Loss = BCE-with-logits on the image-level multi-hot labels + lambda * L0 penalty of the head gates
(``sparse_vit.md`` 1.3). Differences from the original code, each a listed defect there: logits instead of a
sigmoid inside the model (4), log alpha without weight decay (6), the deterministic pruned fraction is logged
instead of the stochastic "sparsity rate" (7), the LR schedule is really applied (8), the true batch size is
logged (17). Our additions, off by default: the penalty normalised by the number of heads and a linear penalty
warm-up. Also ours: with ``target_pruned_fraction`` (the training default, :mod:`weakseg.pipeline.train`) the L0
term is replaced by pruning to that fraction of the heads by rank of their log alpha, after every optimiser step
(:func:`weakseg.models.hard_concrete.close_lowest_heads`), so the number pruned does not depend on the run length.

With one class token per class (``--arch class_tokens``; Hanna and Borth, "Know Your Attention Maps:
Class-specific Token Masking for Weakly Supervised Semantic Segmentation", ICCV 2025, ``token_masking.md``
sections 1-2) two terms are added:

- **Class-specific token masking**: in every training step, each absent class's token output is zeroed before
  the head with probability ``token_mask_rate`` (paper: 0.5); present classes are never masked. A vectorised
  Bernoulli draw from torch's generator (seeded by ``--seed``), not the released per-element Python loop (its
  defect 8). Validation and prediction never mask.
- **Diversity loss** (optional, ``diversity_weight``; the released code's ``--diversify``, coefficient 0.1): the
  class tokens' attention maps to the patches (mean over heads, summed over blocks, gated), L2-normalised per
  class; the loss is ``sqrt(sum((G - I)^2) + 1e-10)`` of their cosine Gram matrix ``G``, averaged over the batch.
  It pushes the C maps apart.

An architecture may add logits of its own (:meth:`weakseg.models.vit.GatedViT.auxiliary_logits`), each trained
with the same multi-label loss and weight 1: WeakTr's coarse and fine CAM logits (``--arch weaktr``; Zhu et al.,
IEEE TIP, ``weaktr.md`` 2: ``L = MLSM(y_cls) + MLSM(y_coarse) + MLSM(y_fine)``; the multi-label soft-margin loss
is the mean BCE-with-logits). Their gradient routing is the model's (:mod:`weakseg.models.weaktr`). The logged
``train_bce``/``val_loss`` and every metric are those of the head's logits, so checkpoints compare across
architectures.

ViT-PCM (``--arch pcm``; Rossetti et al., ECCV 2022, ``vit_pcm.md`` 2; :mod:`weakseg.models.pcm`): its logits are
``logit(max_p softmax_p)``, so the shared BCE-with-logits is the original's BCE on the pooled probabilities; two
terms are added, each switchable: ``pcm_l2 * ||W||^2`` of the patch classifier (0.01, in the loss as the paper,
not AdamW decay: the classifier's weights are excluded from decay) and ``pcm_et_weight * L_ET``, the
equivariant-transformation consistency of a 2x2 mosaic student against an eval-mode teacher
(:mod:`weakseg.tasks.equivariance`).

**Two-stage schedule** (any architecture; ViT-PCM's recipe, ``vit_pcm.md`` 3): ``trainable_blocks`` k keeps the
patch and position embeddings, the prefix tokens and all but the last k blocks frozen for the whole run (they are
not given to the optimiser); ``frozen_epochs`` trains only what is not the backbone (heads, BiLSTM, CAM head, AAF)
for the first epochs at ``frozen_lr``, then the last k blocks and the final norm join at ``lr``. In the frozen
epochs the backbone's learning rate is 0 (its gradients are still computed, so DDP sees every parameter used) and
its optimiser state is cleared when it joins, as a fresh optimiser would start it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MultilabelAccuracy,
    MultilabelAveragePrecision,
    MultilabelF1Score,
)

from weakseg.errors import ConfigError
from weakseg.models.architectures import architecture_of
from weakseg.models.pretrained import load_pretrained
from weakseg.models.hard_concrete import close_lowest_heads, heads_to_close, ramped_target
from weakseg.models.vit import BackboneOutput, ViTConfig
from weakseg.models.architectures import build_classifier

OptimizerName = Literal["adamw", "adam", "sgd"]


class ClassificationTask(L.LightningModule):
    """Gated ViT trained on image-level multi-label targets.

    Args:
        model: :class:`ViTConfig` fields as a dict (``gated`` is set from ``prune``).
        prune: gate every head and add the L0 penalty; False trains the plain ViT (the "w/o pruning" baseline).
        pr_rate: lambda, the L0 weight (paper: 0.2 with the summed penalty).
        l0_normalize: divide the penalty by the number of heads (ours).
        l0_warmup_steps: ramp lambda linearly from 0 over this many optimiser steps (ours; 0 = paper).
        target_pruned_fraction: None trains with the paper's ``pr_rate * L0``. A fraction in [0, 1) prunes exactly
            that fraction of the heads instead (ours; :mod:`weakseg.models.hard_concrete`): no L0 term, the gates
            learn from the task alone, and after every optimiser step the heads of lowest log alpha are closed, as
            many as the target ramped over ``target_warmup`` asks for. ``pr_rate``, ``l0_normalize`` and
            ``l0_warmup_steps`` then have no effect (:func:`weakseg.pipeline.train.validate_train_config` refuses
            them).
        target_warmup: fraction of the run's optimiser steps over which the target ramps linearly from 0.
        closed_log_alpha: log alpha a head closed by the target is lowered to (at most); -3 samples it open in
            5 % of the training steps.
        optimizer: "adamw" (betas 0.9, 0.95 as the reference), "adam" or "sgd" (momentum 0.9).
        lr, weight_decay: optimiser settings; gates, norms, biases and embeddings get no weight decay.
        gate_lr_scale: learning-rate multiplier of the gates' log alpha (ours; paper: 1). With Adam a
            parameter moves about ``lr`` per step, so in a short run log alpha barely leaves its initial value
            and "pruning" only reflects the random init; a larger rate lets the gates decide.
        lr_scheduler: cosine decay to 0 over the run with linear warm-up of ``warmup_epochs``.
        class_names: names of the labels (metrics per class carry them).
        data_config: how the data module prepared inputs (modality, normalisation, band stats), saved in the
            checkpoint so pseudomask generation reproduces the same inputs.
        pretrained: optional local timm/DeiT/DINO checkpoint to initialise the backbone from.
        token_mask_rate: probability of zeroing an absent class's token output in a training step (class-token
            models only; 0 = off).
        diversity_weight: weight of the class-map diversity loss (class-token models only; 0 = off).
        arch: architecture name (:mod:`weakseg.models.architectures`), recorded for the pseudomask methods.
        pcm_l2: weight of ViT-PCM's L2 term on the patch classifier (0.01 as the paper; 0 = off).
        pcm_et_weight: weight of ViT-PCM's equivariance loss (1 as the paper; 0 = off).
        pcm_et_crop: probability of the grid-aligned crop of the equivariance loss's second view (VOC: 0.3).
        frozen_epochs: epochs at the start in which the backbone does not learn (module docstring; 0 = none).
        trainable_blocks: the last k blocks (and the final norm) that learn; None = the whole backbone.
        frozen_lr: learning rate of the frozen epochs (None: ``lr``).
    """

    def __init__(
        self,
        model: dict[str, Any],
        prune: bool = True,
        pr_rate: float = 0.2,
        l0_normalize: bool = False,
        l0_warmup_steps: int = 0,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        gate_lr_scale: float = 1.0,
        target_pruned_fraction: float | None = None,
        target_warmup: float = 0.5,
        closed_log_alpha: float = -3.0,
        lr_scheduler: bool = True,
        warmup_epochs: float = 1.0,
        class_names: list[str] | None = None,
        data_config: dict[str, Any] | None = None,
        pretrained: str | None = None,
        token_mask_rate: float = 0.0,
        diversity_weight: float = 0.0,
        arch: str | None = None,
        pcm_l2: float = 0.01,
        pcm_et_weight: float = 1.0,
        pcm_et_crop: float = 0.3,
        frozen_epochs: int = 0,
        trainable_blocks: int | None = None,
        frozen_lr: float | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "adam", "sgd"):
            raise ConfigError(f"unknown optimizer {optimizer!r} (--optimizer); choose adamw, adam or sgd")
        model = {**model, "gated": bool(prune)}
        self.model_config = ViTConfig(**model)
        arch = arch or architecture_of(self.model_config)
        self.save_hyperparameters()
        if not 0.0 <= token_mask_rate <= 1.0:
            raise ConfigError(f"token_mask_rate must be in [0, 1], got {token_mask_rate} (--token_mask_rate)")
        if target_pruned_fraction is not None and not 0.0 <= target_pruned_fraction < 1.0:
            raise ConfigError(f"target_pruned_fraction must be in [0, 1), got {target_pruned_fraction} "
                              "(--target_pruned_fraction)")
        if (token_mask_rate > 0 or diversity_weight > 0) and not self.model_config.has_class_tokens:
            raise ConfigError(
                "--token_mask_rate and --diversity_weight need one class token per class (--arch class_tokens)"
            )
        self.model = build_classifier(self.model_config)
        if trainable_blocks is not None and not 0 <= trainable_blocks <= self.model_config.depth:
            raise ConfigError(f"trainable_blocks must be in [0, depth={self.model_config.depth}], got "
                              f"{trainable_blocks} (--trainable_blocks)")
        if frozen_epochs < 0:
            raise ConfigError(f"frozen_epochs must be at least 0, got {frozen_epochs} (--frozen_epochs)")
        for name, p in self.model.named_parameters():  # never trained: not given to the optimiser
            if self.parameter_stage(name) == "fixed":
                p.requires_grad_(False)
        self._tie_seed = int(torch.initial_seed()) % 2**62  # the --seed of the run (seed_everything), for ties
        if pretrained:
            load_pretrained(self.model, Path(pretrained))
        C = self.model_config.num_classes
        self.class_names = list(class_names) if class_names else [f"class{i}" for i in range(C)]
        if len(self.class_names) != C:
            raise ConfigError(f"{len(self.class_names)} class names for {C} classes")
        metrics = MetricCollection(
            {
                "f1": MultilabelF1Score(num_labels=C, average=None),
                "map": PresentClassAveragePrecision(num_labels=C, average=None),
                "hamming_acc": MultilabelAccuracy(num_labels=C, average="micro"),
            }
        )
        self.train_metrics = metrics.clone(prefix="train_")
        # Label counts of the training images seen (first pass over the data), for the class-frequency baseline
        # of :mod:`weakseg.pipeline.sanity`. Plain tensors, not buffers: checkpoints keep their keys.
        self._label_counts = torch.zeros(C, dtype=torch.float64)
        self._label_images = 0
        self._counted_epoch: int | None = None
        self.val_metrics = metrics.clone(prefix="val_")

    # ---- model ------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    @property
    def uses_target(self) -> bool:
        """Pruning to ``target_pruned_fraction`` rather than with the paper's ``pr_rate * L0``."""
        return bool(self.hparams.prune) and self.hparams.get("target_pruned_fraction") is not None

    def total_steps(self) -> int:
        """Optimiser steps of the whole run (Lightning's estimate from max_steps / epochs and the data)."""
        return max(1, int(self.trainer.estimated_stepping_batches))

    def current_target(self, step: int | None = None) -> float:
        """The target pruned fraction after optimiser step ``step`` (default: the steps taken so far)."""
        return ramped_target(self.global_step if step is None else step, self.total_steps(),
                             float(self.hparams.target_pruned_fraction), float(self.hparams.target_warmup))

    def pruning_settled(self) -> bool:
        """Whether the model has its final number of pruned heads: always without a target, and with one once the
        ramp has reached it. Checkpoints are chosen among settled epochs only (:func:`weakseg.pipeline.train`), so
        ``best.ckpt`` never is a model of the ramp with fewer heads pruned than asked for."""
        if not self.uses_target:
            return True
        return self.current_target() >= float(self.hparams.target_pruned_fraction)

    def apply_target(self, step: int | None = None) -> int:
        """Close the heads of lowest log alpha, as many as :meth:`current_target` asks for; returns that number.

        Ties (gates that have not moved from their common initial value) are broken by a draw seeded with the run's
        seed and the step: the same on every DDP rank, different between seeds.
        """
        step = self.global_step if step is None else step
        num = heads_to_close(self.current_target(step), sum(g.num_heads for g in self.model.gates))
        ties = torch.Generator().manual_seed(self._tie_seed + int(step))
        close_lowest_heads(self.model.gates, num, closed_log_alpha=float(self.hparams.closed_log_alpha),
                           generator=ties)
        return num

    def l0_weight(self) -> float:
        lam = float(self.hparams.pr_rate)
        warm = int(self.hparams.l0_warmup_steps)
        if warm > 0:
            lam *= min(1.0, self.global_step / warm)
        return lam

    def _step(self, batch: dict[str, Any], train: bool = False
              ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, dict[str, Tensor]]:
        """Logits, BCE, targets, (training with ``diversity_weight``) the diversity loss, and the BCE of each of
        the architecture's auxiliary logits."""
        target = batch["label"]  # (B, C)
        diversity = self.hparams.diversity_weight > 0 and train
        blocks = set(self.model.auxiliary_blocks()) | (set(range(self.model_config.depth)) if diversity else set())
        out = self.model.forward_features(batch["image"], attention_blocks=sorted(blocks),
                                          attention_outputs=bool(self.model.auxiliary_blocks()))
        drop = absent_token_mask(target, float(self.hparams.token_mask_rate)) if train else None
        logits = self.model.forward_head(out, drop_class_tokens=drop)  # (B, C)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        auxiliary = {name: F.binary_cross_entropy_with_logits(aux, target)
                     for name, aux in self.model.auxiliary_logits(out).items()}
        return logits, bce, target, class_map_diversity(out) if diversity else None, auxiliary

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits, bce, target, diversity, auxiliary = self._step(batch, train=True)
        loss = bce
        B = target.shape[0]
        for name, value in auxiliary.items():  # WeakTr: coarse and fine CAM losses, weight 1 each
            loss = loss + value
            self.log(f"train_{name}_bce", value, batch_size=B)
        if self.uses_target:  # no penalty: the heads are closed by rank after the optimiser step
            if self._trainer is not None:
                self.log("train_target_pruned", self.current_target(), batch_size=B)
        elif self.hparams.prune:
            l0 = self.model.l0_penalty(normalize=bool(self.hparams.l0_normalize))
            loss = loss + self.l0_weight() * l0
            self.log("train_l0", l0, batch_size=B)
        if diversity is not None:
            loss = loss + self.hparams.diversity_weight * diversity
            self.log("train_diversity", diversity, batch_size=B)
        for name, (weight, value) in self.pcm_terms(batch).items():  # ViT-PCM: L2 and equivariance
            loss = loss + weight * value
            self.log(f"train_{name}", value, batch_size=B)
        self.log("train_bce", bce, batch_size=B)
        self.log("train_loss", loss, prog_bar=True, batch_size=B)
        self.train_metrics.update(torch.sigmoid(logits.detach()), target.int())
        if self._counted_epoch in (None, self.current_epoch):  # one epoch of labels is the frequency
            self._counted_epoch = self.current_epoch
            self._label_counts += target.detach().sum(0).double().cpu()
            self._label_images += B
        return loss

    @property
    def is_pcm(self) -> bool:
        return self.model_config.patch_classifier is not None

    def pcm_terms(self, batch: dict[str, Any]) -> dict[str, tuple[float, Tensor]]:
        """ViT-PCM's extra training terms by name, as (weight, value): ``pcm_l2`` (the classifier's ``||W||^2``)
        and ``pcm_et`` (the equivariance loss); empty for other architectures and for terms of weight 0."""
        if not self.is_pcm:
            return {}
        terms: dict[str, tuple[float, Tensor]] = {}
        if self.hparams.pcm_l2 > 0:
            terms["pcm_l2"] = (float(self.hparams.pcm_l2), self.model.l2_penalty())
        if self.hparams.pcm_et_weight > 0:
            from weakseg.models.pcm import pcm_patch_probabilities
            from weakseg.tasks.equivariance import equivariance_loss

            model = self.model
            et = equivariance_loss(model, lambda x: pcm_patch_probabilities(model, x), batch["image"],
                                   batch["label"], self.model_config.patch_size,
                                   crop_prob=float(self.hparams.pcm_et_crop))
            terms["pcm_et"] = (float(self.hparams.pcm_et_weight), et)
        return terms

    # ---- two-stage schedule -----------------------------------------------------------------------------
    def parameter_stage(self, name: str) -> str:
        """Which stage trains parameter ``name``: ``"head"`` (from the start), ``"backbone"`` (after
        ``frozen_epochs``) or ``"fixed"`` (never: outside the last ``trainable_blocks`` blocks)."""
        backbone = name.startswith(("patch_embed", "cls_token", "reg_token", "pos_embed", "blocks.", "norm."))
        if not backbone:
            return "head"
        k = self.hparams.get("trainable_blocks")
        if k is None:
            return "backbone"
        if name.startswith("blocks."):
            return "backbone" if int(name.split(".")[1]) >= self.model_config.depth - int(k) else "fixed"
        return "backbone" if name.startswith("norm.") else "fixed"

    def frozen_steps(self) -> int:
        """Optimiser steps of the ``frozen_epochs``."""
        epochs = max(1, int(self.trainer.max_epochs or 1))
        return int(round(int(self.hparams.get("frozen_epochs") or 0) * self.total_steps() / epochs))

    def on_train_epoch_start(self) -> None:
        """When the backbone joins (the first epoch after ``frozen_epochs``): clear its optimiser state, which the
        frozen epochs' gradients filled, so it starts as a fresh optimiser would."""
        if int(self.hparams.get("frozen_epochs") or 0) and self.current_epoch == int(self.hparams.frozen_epochs):
            opt = self.optimizers(use_pl_optimizer=False)
            for name, p in self.model.named_parameters():
                if self.parameter_stage(name) == "backbone":
                    opt.state.pop(p, None)

    def train_label_frequency(self) -> Tensor | None:
        """(C,) fraction of training images (of the first epoch trained in this process) holding each class."""
        return self._label_counts / self._label_images if self._label_images else None

    def on_train_start(self) -> None:
        """With a target: open every head before the first step (target 0), whatever the init (e.g. Xavier's
        negative log alphas), so no head is pruned by its initial value; on --resume, the resumed step's count."""
        if self.uses_target:
            self.apply_target()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser's step, then (with a target) the rank pruning of the gates: once per optimiser step, also
        with gradient accumulation."""
        super().optimizer_step(*args, **kwargs)
        if self.uses_target:
            self.apply_target(self.global_step + 1)  # Lightning counts this step only after the hook returns

    def on_train_epoch_end(self) -> None:
        self._log_metrics(self.train_metrics)
        self._log_pruning()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits, bce, target, _, auxiliary = self._step(batch)
        self.log("val_loss", bce, prog_bar=True, batch_size=target.shape[0], sync_dist=True)
        for name, value in auxiliary.items():
            self.log(f"val_{name}_bce", value, batch_size=target.shape[0], sync_dist=True)
        self.val_metrics.update(torch.sigmoid(logits), target.int())

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics)

    def _log_metrics(self, metrics: MetricCollection) -> None:
        values = metrics.compute()
        prefix = metrics.prefix or ""
        per_class = values.pop(f"{prefix}f1")
        self.log(f"{prefix}macro_f1", per_class.mean(), prog_bar=prefix == "val_", sync_dist=True)
        for name, v in zip(self.class_names, per_class):
            self.log(f"{prefix}f1_{_slug(name)}", v, sync_dist=True)
        for k, v in values.items():
            self.log(k, v, sync_dist=True)
        metrics.reset()

    def _log_pruning(self) -> None:
        self.log("pruned_fraction", self.model.pruned_fraction(), prog_bar=True, sync_dist=True)
        for i, n in enumerate(self.model.pruned_heads_per_layer()):
            self.log(f"pruned_heads_layer{i}", float(n), sync_dist=True)

    # ---- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        no_decay = self.model.no_weight_decay()
        lr = self.hparams.lr
        staged = int(self.hparams.get("frozen_epochs") or 0) > 0
        grouped: dict[tuple[str, str], list[Tensor]] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            kind = "gate" if name.endswith("log_alpha") else "plain" if name in no_decay else "decay"
            stage = self.parameter_stage(name) if staged else "head"
            grouped.setdefault((stage, kind), []).append(p)
        groups, stages = [], []
        for (stage, kind), params in grouped.items():
            group: dict[str, Any] = {"params": params, "weight_decay": self.hparams.weight_decay if kind == "decay"
                                     else 0.0}  # gates never weight-decayed (defect 6 of the original)
            if kind == "gate":
                group["lr"] = lr * self.hparams.gate_lr_scale
            groups.append(group)
            stages.append(stage)
        name = self.hparams.optimizer
        if name == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
        elif name == "adam":
            opt = torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.95))
        else:
            opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
        if not self.hparams.lr_scheduler and not staged:
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, int(self.trainer.max_epochs or 1))
        warmup = min(total - 1, int(round(self.hparams.warmup_epochs * total / epochs)))
        cosine = bool(self.hparams.lr_scheduler)
        frozen = self.frozen_steps() if staged else 0
        head_scale = (self.hparams.frozen_lr or lr) / lr

        def factor(stage: str) -> Any:
            def at(step: int) -> float:
                f = warmup_cosine(step, warmup, total) if cosine else 1.0
                if step < frozen:  # the frozen epochs: the backbone waits, the heads learn at frozen_lr
                    return 0.0 if stage == "backbone" else head_scale * f
                return f
            return at

        sched = torch.optim.lr_scheduler.LambdaLR(opt, [factor(s) for s in stages])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class PresentClassAveragePrecision(MultilabelAveragePrecision):
    """Macro average precision over the classes that occur in the targets.

    torchmetrics' macro AP counts a class without positive images as AP 0, so a holdout lacking a class reported a
    lower mAP than the classes it holds earned (measured: 0.742 logged vs 0.848 over the present classes), and the
    logged mAP did not match the one :mod:`weakseg.pipeline.sanity` prints. The states are synced across devices
    before this ``compute`` runs, so the class presence is that of the whole split.
    """

    def compute(self) -> Tensor:
        per_class = super().compute()  # (C,), average=None
        target = torch.cat(self.target) if isinstance(self.target, list) else self.target  # (N, C)
        present = (target == 1).any(dim=0)  # (C,)
        return per_class[present].mean() if bool(present.any()) else per_class.new_tensor(float("nan"))


def absent_token_mask(target: Tensor, rate: float, generator: torch.Generator | None = None) -> Tensor | None:
    """Class-specific token masking (Hanna & Borth, ICCV 2025): which class tokens to zero in this step.

    Args:
        target: (B, C) multi-hot image labels.
        rate: probability of masking each absent class's token (present classes are never masked).
        generator: torch generator (default: the global one, seeded by ``--seed``).

    Returns:
        (B, C) bool, True = zero this token's output; None when ``rate`` is 0.
    """
    if rate <= 0:
        return None
    draw = torch.rand(target.shape, generator=generator, device="cpu").to(target.device)  # (B, C)
    return (target < 0.5) & (draw < rate)


def class_map_diversity(out: BackboneOutput) -> Tensor:
    """Diversity loss of the class tokens' attention maps (TokenMasking-WSSS ``--diversify``), a scalar.

    Maps: each class token's attention to the patches, mean over heads, summed over the blocks in ``out``
    (gated: a head dropped in this step contributes zero); L2-normalised per class. Loss: per image
    ``sqrt(sum((G - I)^2) + 1e-10)`` of the (C, C) cosine Gram matrix ``G``; mean over the batch.
    """
    maps = sum(out.class_token_attention(b).mean(dim=1) for b in out.attentions)  # (B, T, h, w)
    maps = F.normalize(maps.flatten(2), dim=-1)  # (B, T, h*w)
    gram = maps @ maps.transpose(1, 2)  # (B, T, T)
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return torch.sqrt(((gram - eye) ** 2).sum(dim=(1, 2)) + 1e-10).mean()


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up from 1/(warmup+1) to 1 over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def read_checkpoint(path: str | Path, flag: str = "--model_checkpoint", map_location: str = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """The dict inside a PyTorch checkpoint file, with errors that say what is wrong with the file.

    torch reports a folder as a missing file and a truncated or foreign file with pickle's words ("Memo value
    not found", "invalid load key", "failed finding central directory"), which do not tell a user that the
    file is the problem. ``flag`` names the setting that gave the path; ``mmap`` maps tensors instead of reading
    them (to look at a large checkpoint's epoch only).

    Raises:
        ConfigError: the path is a folder, does not exist, is empty, is not a complete PyTorch checkpoint or
            does not hold a dict.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.ckpt")) + sorted(path.glob("checkpoints/*.ckpt"))
        hint = f"; it holds {', '.join(str(p) for p in found[:3])}" if found else ""
        raise ConfigError(f"checkpoint {path} is a folder, not a checkpoint file ({flag}){hint}")
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist ({flag})")
    if path.stat().st_size == 0:
        raise ConfigError(f"cannot read checkpoint {path} ({flag}): the file is empty (0 bytes), not a PyTorch "
                          "checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise ConfigError(
            f"cannot read checkpoint {path} ({flag}): it is not a complete PyTorch checkpoint (a save that was "
            f"interrupted, a partial copy, or another kind of file); torch says: {e}"
        ) from e
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{path} is not a checkpoint ({flag}): it holds a {type(ckpt).__name__}, not a dict")
    return ckpt


def load_classifier(path: str | Path, map_location: str = "cpu") -> ClassificationTask:
    """Load a :class:`ClassificationTask` checkpoint, with clear errors for a missing or foreign file."""
    path = Path(path)
    ckpt = read_checkpoint(path, "--model_checkpoint", map_location)
    hp = ckpt.get("hyper_parameters")
    if not hp or "model" not in hp or "state_dict" not in ckpt:
        raise ConfigError(f"{path} is not a weakseg classifier checkpoint (no model hyper-parameters)")
    task = ClassificationTask(**{**hp, "pretrained": None})
    missing, unexpected = task.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path} does not match its own configuration: missing {missing[:5]}, unexpected {unexpected[:5]}")
    task.eval()
    return task
