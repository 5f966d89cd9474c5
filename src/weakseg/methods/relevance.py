"""Head relevance: how much each attention head raises each class's logit, from one backward pass per class.

For head h of block l and class c, with ``o`` the gated head outputs entering the block's output projection
(:meth:`weakseg.models.vit.GatedViT.head_output_layer`, channels of head h) and ``g = d logit_c / d o``::

    r[l, h, c] = sum over positions p and the head's channels of g[p] * o[p]

the first-order change of ``logit_c`` if the head were switched off: the head importance of Michel, Levy and
Neubig, "Are Sixteen Heads Really Better than One?", NeurIPS 2019, per image and class; the same
gradient-times-attention idea weights heads in Chefer, Gur and Wolf, "Generic Attention-model Explainability for
Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV 2021. ``positions="all"`` sums over every token;
``positions="class_token"`` keeps only the position of class token c (one class token per class), i.e. how much
the head's output *for class token c* -- the output its attention row c produced -- raises class c.

One backward pass per class over the whole batch: eval-mode images are independent (LayerNorm is per token,
gates are deterministic), so the gradient of the summed logits is each image's own gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from weakseg.models.vit import GatedViT

Positions = Literal["all", "class_token"]


def head_relevance(
    model: GatedViT, images: Tensor, blocks: list[int], class_sets: Tensor, positions: Positions = "all"
) -> Tensor:
    """Relevance of every head of ``blocks`` to every class in ``class_sets``, (B, L, heads, C).

    Args:
        model: the classifier (run in eval mode, restored afterwards); for ``positions="class_token"`` it must have
            one class token per class.
        images: (B, C_in, H, W) model inputs.
        blocks: the L blocks whose heads are scored, in the order of the result.
        class_sets: (B, C) bool, the classes to score per image; the other entries are 0.
        positions: ``"all"`` tokens or only ``"class_token"`` c (module docstring).
    """
    if positions == "class_token" and not model.has_class_tokens:
        raise ValueError("positions='class_token' needs one class token per class")
    captured: dict[int, Tensor] = {}
    hooks = []
    for b in blocks:
        def capture(_module: nn.Module, inputs: tuple[Tensor, ...], b: int = b) -> None:
            captured[b] = inputs[0]
        hooks.append(model.head_output_layer(b).register_forward_pre_hook(capture))
    was_training = model.training
    model.eval()
    heads = model.cfg.num_heads
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = images.clone() if images.is_inference() else images
            logits = model(x)  # (B, C)
            B, C = logits.shape
            acts = [captured[b] for b in blocks]  # each (B, N, heads * hd)
            relevance = torch.zeros(B, len(blocks), heads, C, device=logits.device)
            class_sets = class_sets.to(logits.device)
            wanted = class_sets.any(dim=0).nonzero().flatten().tolist()
            for i, c in enumerate(wanted):
                grads = torch.autograd.grad(logits[:, c].sum(), acts, retain_graph=i < len(wanted) - 1)
                for j, (g, a) in enumerate(zip(grads, acts, strict=True)):
                    if positions == "class_token":
                        g, a = g[:, c : c + 1], a[:, c : c + 1]  # (B, 1, heads * hd)
                    per_head = (g * a).reshape(B, a.shape[1], heads, -1).sum(dim=(1, 3))  # (B, heads)
                    relevance[:, j, :, c] = per_head.detach() * class_sets[:, c, None]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return relevance
