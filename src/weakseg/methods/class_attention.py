"""Class-attention pseudomasks: class token c's attention to the patches is the map of class c.

Hanna and Borth, "Know Your Attention Maps: Class-specific Token Masking for Weakly Supervised Semantic
Segmentation", ICCV 2025 (``token_masking.md`` section 4): a ViT with one class token per class, trained with
class-specific token masking (``weakseg train --arch class_tokens``), needs no head clustering and no
re-labelling: the row of class token c in the attention maps already says where class c is.

Per image and class c (B, C, h, w), from the attention of every requested block (``--blocks``, default all):

1. the attention ``A[c, p]`` of class token c to every patch p (columns of class tokens and registers dropped),
   per head of the block; a pruned head's row is zero (eval gates);
2. ``--combine gradient`` (weakseg's default): each entry is weighted by the gradient of class c's logit with
   respect to it and only the positive part is kept, ``max(0, A[c, p] * d logit_c / d A[c, p])``. Since head
   h's output for class token c is ``sum_p A[c, p] v_p``, this is ``A[c, p] <g_c, v_p>``: patch p's first-order
   contribution to class c's logit through that head -- attention x value x class gradient. The rule of Chefer,
   Gur and Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
   Transformers", ICCV 2021, applied to class token c's row. ``--combine mean`` uses the attention alone,
   the released rule;
3. the mean over the block's **kept** heads, then over the blocks that kept a head (the released code sums the
   blocks: the same map up to a factor). The released code averaged the pre-gate maps of every head, pruned ones
   included (its defect 2); ``--heads all --combine mean`` reproduces that.

Masks follow the shared rules (:mod:`weakseg.masks.rules`): ``--rule argmax`` (weakseg's default) takes, per pixel,
the label whose min-max normalised map is highest; ``--rule threshold`` is the released rule (each label's map
above its own mean, painted in ascending probability, holes filled). The gradient maps have a floor of 0 and are
divided by their maximum (the default); attention alone (``--combine mean``) has a floor above 0, for which
``--normalize minmax`` suits the argmax. The released "fused" maps (attention times an untrained conv head, its defect
1) are not offered.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from weakseg.errors import ConfigError
from weakseg.masks.rules import NORMALIZATIONS
from weakseg.methods.base import RULE_CHOICES, ClassMapMethod, ClassMapOptions, option, parse_blocks
from weakseg.models.vit import GatedViT

HEAD_CHOICES = ("kept", "all")
COMBINE_CHOICES = ("gradient", "mean")


@dataclasses.dataclass
class ClassAttentionOptions(ClassMapOptions):
    """Settings of :class:`ClassAttention` (``rule`` and ``normalize`` redefined with their class-attention help;
    ``scales`` and ``flip`` shared with every class-map method)."""

    blocks: str = option("all", "blocks whose attention is used: all, last, or a comma list such as 0,-1")
    heads: str = option("kept", "heads averaged per block: kept (open gates), or all as released (pre-gate maps, "
                                "pruned heads included)", HEAD_CHOICES)
    combine: str = option("gradient", "gradient: each attention entry weighted by the class logit's gradient "
                                      "(attention x value x gradient), or mean: attention alone (as released)",
                          COMBINE_CHOICES)
    rule: str = option("argmax", "maps -> mask: argmax among the image's labels, or each label's map above its "
                                 "own mean painted in ascending probability (TokenMasking-WSSS), or background / "
                                 "auto (datasets with a background class)", RULE_CHOICES)
    normalize: str = option("max", "per-class normalisation before the argmax: max (for the gradient maps, whose "
                                   "floor is 0), or minmax (for attention alone, whose floor is above 0)",
                            NORMALIZATIONS)


def class_attention_maps(
    model: GatedViT,
    images: Tensor,
    blocks: list[int],
    heads: str = "kept",
    combine: str = "gradient",
    class_sets: Tensor | None = None,
) -> Tensor:
    """Class token -> patch attention per class, combined over heads and blocks (module docstring), (B, T, h, w).

    Args:
        model: a classifier with class tokens; run in eval mode (restored afterwards).
        images: (B, C_in, H, W) model inputs.
        blocks: block indices (0-based).
        heads: ``"kept"`` (gated maps, open heads only) or ``"all"`` (pre-gate maps of every head; only with
            ``combine="mean"``).
        combine: ``"gradient"`` or ``"mean"``.
        class_sets: (B, C) bool, the classes whose maps are needed (``"gradient"`` differentiates only these, one
            backward pass per class over the batch; the other maps are 0). Default: all.

    Returns:
        (B, T, h, w) non-negative maps; all zero where no requested block has a head to use.
    """
    if heads not in HEAD_CHOICES or combine not in COMBINE_CHOICES:
        raise ConfigError(f"heads must be one of {list(HEAD_CHOICES)} and combine one of {list(COMBINE_CHOICES)}, "
                          f"got heads={heads!r}, combine={combine!r}")
    if heads == "all" and combine != "mean":
        raise ConfigError("--heads all (pre-gate maps, as released) only goes with --combine mean")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.set_grad_enabled(combine == "gradient"):
            x = images.clone() if images.is_inference() else images
            out = model.forward_features(x, attention_blocks=blocks, gated_maps=heads == "kept")
            if combine == "gradient":
                logits = model.forward_head(out)  # (B, C)
                attn = [out.attentions[b] for b in blocks]  # each (B, heads, N, N), in the graph
                T, P = model.num_class_tokens, model.num_prefix_tokens
                class_sets = torch.ones_like(logits, dtype=torch.bool) if class_sets is None else class_sets
                class_sets = class_sets.to(logits.device)
                rows = torch.zeros(len(blocks), x.shape[0], attn[0].shape[1], T, attn[0].shape[-1] - P,
                                   device=logits.device)  # (L, B, heads, T, h*w)
                wanted = class_sets.any(dim=0).nonzero().flatten().tolist()
                for i, c in enumerate(wanted):
                    grads = torch.autograd.grad(logits[:, c].sum(), attn, retain_graph=i < len(wanted) - 1)
                    for j, (a, g) in enumerate(zip(attn, grads, strict=True)):
                        contribution = (a[:, :, c, P:] * g[:, :, c, P:]).clamp_min(0)  # (B, heads, h*w)
                        rows[j, :, :, c] = contribution.detach() * class_sets[:, c, None, None]
                per_block = rows.reshape(*rows.shape[:4], *out.grid).transpose(0, 1)  # (B, L, heads, T, h, w)
            else:
                per_block = torch.stack([out.class_token_attention(b) for b in blocks], dim=1)  # same shape
        usable = model.head_mask()[blocks].to(images.device)  # (L, heads)
        if heads == "all":
            usable = torch.ones_like(usable)
        weight = usable / usable.sum(dim=1, keepdim=True).clamp_min(1)  # (L, heads): mean over a block's heads
        weight = weight / max(1, int(usable.any(dim=1).sum()))  # then over the blocks that kept a head
        maps = torch.einsum("blhtyx,lh->btyx", per_block.detach().float(), weight.float())  # (B, T, h, w)
    finally:
        model.train(was_training)
    return maps


class ClassAttention(ClassMapMethod):
    """Class token c's attention is the map of class c (Hanna & Borth, ICCV 2025)."""

    name = "class_attention"
    summary = "class token -> patch attention of the kept heads, all blocks (Hanna & Borth, ICCV 2025)"
    architectures = ("class_tokens", "weaktr")
    trains = "class_tokens"
    needs_grad = True
    Options: ClassVar[type] = ClassAttentionOptions
    multi_reason = "class_attention_argmax"
    empty_reason = "empty_attention"

    def attention_blocks(self, depth: int) -> list[int]:
        # With --heads all the pre-gate maps of pruned heads are read too: closed blocks still give maps.
        return parse_blocks(self.options.blocks, depth) if self.options.heads == "kept" else []

    def class_maps(self, model: GatedViT, images: Tensor, label_sets: Tensor) -> Tensor:
        blocks = parse_blocks(self.options.blocks, model.cfg.depth)
        return class_attention_maps(model, images, blocks, self.options.heads, self.options.combine, label_sets)
