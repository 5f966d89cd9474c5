"""WeakTr CAM pseudomasks: the fine CAMs of a WeakTr classifier, multi-scale + flip, background threshold.

Zhu et al., "WeakTr: Exploring Plain Vision Transformer for Weakly-supervised Semantic Segmentation", IEEE TIP
(``weaktr.md`` section 3). Needs a classifier trained with ``weakseg train --arch weaktr``
(:mod:`weakseg.models.weaktr`). Per view (each scale of ``--scales``, each with its horizontal flip when ``--flip
on``; WeakTr v2 on VOC: scales 1.0 and 1.2 with flips, the defaults here):

1. the forward pass with every block's attention returns the fused CAM ``CA x relu(coarse)`` and the AAF
   patch affinity PA; the map is the fused CAM (``--cam fused``, weakseg's default), ``PA . CAM_fused``
   (``--cam fine``, the released default) or the conv CAM head alone (``--cam coarse``). On the built-in data
   the released patch-attention refinement lowered the masks by 17-22 mIoU on the holdout (paired over 3 seeds,
   pruned and unpruned WeakTr classifiers; ``benchmarks/quality.py``, README "Results"): the from-scratch
   ViT's patch affinity spreads each class over the whole 8 x 8 grid, so ``--cam fine`` stays as the faithful
   mode and ``fused`` is the default (``coarse`` is 0.2-1.3 lower);
2. upsampled bilinearly to the tile, restricted to the image's labels, flipped back and summed over the views
   (:func:`weakseg.methods.base.multiscale_class_maps`);
3. per class min-max normalised (``--normalize minmax``), then the mask: with a background class (VOC) a constant
   plane of value ``--background_threshold`` t (0.43, WeakTr v2) competes with the labels' maps (``--rule auto``
   -> ``background``); land cover has no background, so each pixel takes the arg-max among the image's labels
   (``auto`` -> ``argmax``). t is chosen on a holdout with masks by ``weakseg pseudomasks --sweep_background``.

Labels are the predicted ones by default, the ground truth with ``--oracle`` (what WeakTr's reported CAM numbers
use). Confidence = the margin between the best and the second-best normalised channel (the plane included).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from weakseg.masks.rules import NORMALIZATIONS
from weakseg.methods.base import RULE_CHOICES, ClassMapMethod, ClassMapOptions, evaluation_mode, option
from weakseg.models.vit import GatedViT

CAM_CHOICES = ("fine", "fused", "coarse")


@dataclasses.dataclass
class WeakTrOptions(ClassMapOptions):
    """Settings of :class:`WeakTrCAM`: WeakTr v2's VOC inference by default (``weaktr.md`` 3)."""

    cam: str = option("fused", "weaktr: which CAM: fused (AAF class attention x the conv CAM, weakseg's default), "
                               "fine (the fused CAM refined by the patch affinity, as released) or coarse (the "
                               "conv CAM head alone)", CAM_CHOICES)
    rule: str = option("auto", "maps -> mask (module docstring of each method)", RULE_CHOICES)
    normalize: str = option("minmax", "per-class normalisation (WeakTr: min-max)", NORMALIZATIONS)
    scales: str = option("1,1.2", "multi-scale inference: comma list of input scales whose maps are summed")
    flip: str = option("on", "add each scale's horizontally flipped view", ("off", "on"))


def weaktr_cams(model: GatedViT, images: Tensor, cam: str = "fine") -> Tensor:
    """WeakTr's CAMs of one view, (B, C, h, w), non-negative; the model must be a WeakTr classifier."""
    if cam not in CAM_CHOICES:
        raise ValueError(f"cam must be one of {list(CAM_CHOICES)}, got {cam!r}")
    with evaluation_mode(model):
        out = model.forward_features(images, attention_blocks=range(model.cfg.depth), attention_outputs=True)
        maps = model.weaktr_maps(out)  # type: ignore[attr-defined]
    if cam == "coarse":
        return maps["coarse_logits"].clamp_min(0)
    return maps["fine_cam" if cam == "fine" else "fused_cam"]


class WeakTrCAM(ClassMapMethod):
    """WeakTr's fine CAMs (module docstring)."""

    name = "weaktr"
    summary = "WeakTr fine CAMs (AAF-fused class attention x conv CAM, patch-attention refined), multi-scale + " \
              "flip, background threshold (Zhu et al., IEEE TIP)"
    architectures = ("weaktr",)
    trains = "weaktr"
    Options: ClassVar[type] = WeakTrOptions
    multi_reason = "weaktr_argmax"
    empty_reason = "empty_cam"

    def attention_blocks(self, depth: int) -> list[int]:
        return list(range(depth))

    def head_weights(self, model: GatedViT, images: Tensor) -> Tensor | None:
        """AAF's weight of every head, mean over ``images`` (depth, heads)."""
        with torch.no_grad():
            out = model.eval().forward_features(images, attention_blocks=range(model.cfg.depth),
                                                attention_outputs=True)
            return model.weaktr_maps(out)["weights"].mean(dim=0)  # type: ignore[attr-defined]

    def class_maps(self, model: GatedViT, images: Tensor, label_sets: Tensor) -> Tensor:
        maps = weaktr_cams(model, images, self.options.cam)  # (B, C, h, w)
        return maps * label_sets[:, :, None, None].to(maps.dtype)  # restricted to the labels (WeakTr step 4)
