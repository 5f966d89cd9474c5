"""ViT-PCM baseline pseudomasks (BPM): the per-patch class probabilities of a patch-class-mapping classifier.

Rossetti et al., "Max Pooling with Vision Transformers Reconciles Class and Shape in Weakly Supervised Semantic
Segmentation", ECCV 2022 (``vit_pcm.md`` section 4). Needs a classifier trained with ``weakseg train --arch pcm``
(:mod:`weakseg.models.pcm`). Per image:

1. the classifier's softmax over the classes of every patch, (C, h, w), in eval mode. ``--scales`` runs it on a
   resized input with interpolated patch position embeddings: the original infers at 960 x 960 after training at
   384 (``--scales 2.5``, a single scale, no flip: weakseg's default too);
2. with ``--masking labels``, the **label masking** of the original: absent classes zeroed (the image's labels: predicted by default, the
   ground truth with ``--oracle``, the original's setting on train/val), each present class divided by its spatial
   maximum (``--normalize max``), and per pixel the arg-max among them (the original's per-patch renormalisation
   does not change the arg-max). The maps are upsampled bilinearly to the tile first (the original upsamples with
   ``align_corners=True``; weakseg's shared rule uses half-pixel centres, as every other method);
3. with a background class (VOC) background is softmax channel 0 and competes like any label when it is in the
   image's label set; there is **no threshold**. Land cover has no background: every pixel takes one of the
   image's land-cover labels.

``--masking none`` (weakseg's default) skips step 2: every pixel takes the arg-max of the softmax over all
classes, with no image labels at all (the patch-class mapping read as a segmentation); confidence is then the
margin between the two most probable classes, and ``--oracle`` changes nothing.

**Defaults, measured** (``benchmarks/pcm_inference.py`` on the 6 ViT-PCM checkpoints of the quality benchmark,
3 seeds, pruned and unpruned): on the holdout, masking none at scale 2.5 scores 51.8 and 52.7 mIoU against 48.5
and 47.5 for the original's label masking at the training size (with *predicted* labels; with ground-truth labels
the label masking reaches 81-82, so its loss is the label prediction's). Scale 2.5 adds 2-3 points in every
setting; scale 2 is within 0.6 of it.

Confidence = the margin between the best and the second-best normalised label (:mod:`weakseg.masks.rules`),
which refinement can use to ignore uncertain pixels; ``--crf`` applies the shared dense CRF.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from weakseg.masks.result import STATUS_OK, PseudomaskResult
from weakseg.masks.rules import NORMALIZATIONS, upsample_maps
from weakseg.methods.base import (
    RULE_CHOICES,
    ClassMapMethod,
    ClassMapOptions,
    evaluation_mode,
    option,
    parse_scales,
)
from weakseg.models.pcm import pcm_patch_probabilities
from weakseg.models.vit import GatedViT

MASKING_CHOICES = ("labels", "none")


@dataclasses.dataclass
class PCMOptions(ClassMapOptions):
    """Settings of :class:`PatchClassMapping` (module docstring)."""

    rule: str = option("argmax", "maps -> mask: argmax among the image's labels (ViT-PCM; background is a "
                                 "label where the data has one)", RULE_CHOICES)
    normalize: str = option("max", "per-class normalisation before the argmax (ViT-PCM: divide by the max)",
                            NORMALIZATIONS)
    scales: str = option("2.5", "input scales whose patch probabilities are summed; ViT-PCM infers at 2.5 x its "
                                "training size with interpolated position embeddings (the default)")
    masking: str = option("none", "none (default): the arg-max over all classes of the softmax, no image labels; "
                                  "labels: restrict each pixel to the image's labels, each max-normalised (ViT-PCM "
                                  "with labels; --oracle gives the ground-truth ones)", MASKING_CHOICES)


def pcm_class_maps(model: GatedViT, images: Tensor) -> Tensor:
    """Per-patch softmax probabilities of a ViT-PCM classifier, (B, C, h, w), in eval mode without gradient."""
    with evaluation_mode(model):
        return pcm_patch_probabilities(model, images)


class PatchClassMapping(ClassMapMethod):
    """ViT-PCM's baseline pseudomasks (module docstring)."""

    name = "pcm"
    summary = "ViT-PCM: per-patch softmax of a patch-class-mapping classifier, masked to the image's labels " \
              "(Rossetti et al., ECCV 2022)"
    architectures = ("pcm",)
    trains = "pcm"
    Options: ClassVar[type] = PCMOptions
    multi_reason = "pcm_argmax"
    empty_reason = "empty_patch_map"

    def class_maps(self, model: GatedViT, images: Tensor, label_sets: Tensor) -> Tensor:
        maps = pcm_class_maps(model, images)  # (B, C, h, w)
        return maps * label_sets[:, :, None, None].to(maps.dtype)  # absent classes zeroed (ViT-PCM step 2)

    def pseudomasks(
        self, model: GatedViT, images: Tensor, probs: Tensor, label_sets: Tensor, out_size: tuple[int, int]
    ) -> PseudomaskResult:
        if self.options.masking == "labels":
            return super().pseudomasks(model, images, probs, label_sets, out_size)
        everything = torch.ones_like(label_sets, dtype=torch.bool)
        maps = upsample_maps(self.merged_maps(model, images, everything, out_size).float(), out_size)  # (B, C, H, W)
        views = len(parse_scales(self.options.scales)) * (2 if self.options.flip == "on" else 1)
        top = (maps / views).topk(min(2, maps.shape[1]), dim=1)  # probabilities averaged over the views
        best = top.indices[:, 0]  # (B, H, W)
        margin = top.values[:, 0] - (top.values[:, 1] if maps.shape[1] > 1 else 0.0)
        masks = best.to("cpu", torch.uint8).numpy()
        C = maps.shape[1]
        used = torch.nn.functional.one_hot(best.flatten(1), C).amax(dim=1).bool().cpu().numpy()  # (B, C)
        B = masks.shape[0]
        return PseudomaskResult(masks=masks, status=[STATUS_OK] * B, reason=["pcm_all_classes"] * B,
                                used_labels=used, confidence=margin.clamp(0, 1).to("cpu", torch.float32).numpy())
