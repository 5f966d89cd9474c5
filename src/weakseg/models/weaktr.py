"""WeakTr's phase-1 classifier on the gated ViT: C class tokens, a conv CAM head and Adaptive Attention Fusion.

Zhu, Li, Fang, Liu, Xin, Liu and Wang, "WeakTr: Exploring Plain Vision Transformer for Weakly-supervised
Semantic Segmentation", IEEE TIP (arXiv 2304.01184; code hustvl/WeakTr). All facts are in ``weaktr.md``
sections 1-3. The backbone is weakseg's :class:`~weakseg.models.vit.GatedViT` with one class token per class,
no final norm and the ``"mean"`` head (logit c = the mean of class token c's channels), so every head may carry a
Hard Concrete gate as in the sparse ViT; a pruned head's attention map is zero and AAF gives it nothing.

Three predictions per image, each trained with the multi-label soft-margin loss (= mean BCE-with-logits):

1. ``y_cls``: the class-token logits (:meth:`GatedViT.forward_head`);
2. ``y_coarse``: global average of ``conv(patches)``, a 3x3 ``Conv2d(D, C)`` on the patch grid (the CAM head);
3. ``y_fine``: global average of the fine CAM (below).

**Adaptive Attention Fusion (v2).** From the L x H attention maps ``A_j`` (T x T, all tokens) and each block's
attention-branch output ``o_l = proj(A V)`` (T x D), *all detached*:

- per map j = (layer l, head h): ``F_j = o_l[:, h::H]`` (a strided channel split, as released), pooled over the
  tokens (max, the VOC recipe; or average) to ``g_j`` (D/H), then ``s_j = Linear(8 -> 1)(Linear(D/H -> D/H/8)(g_j))``
  (two linear layers, no activation between);
- SE gating over the L*H scores: ``w = sigmoid(U2 relu(U1 s))`` (``U1: LH -> LH/r``, ``U2: LH/r -> LH``, no
  bias; r = 8), with the scores ordered j = head * L + layer as released;
- ``fused = (1 / LH) sum_j w_j A_j``; class attention ``CA = fused[class tokens, patches]`` (C, h, w) and patch
  affinity ``PA = fused[patches, patches]`` (N, N), rows not renormalised.

``v1`` feeds the SE the average of each whole map instead (reduction 4): for an ungated softmax map that
average is 1/T for every map, so v1's weights hardly depend on the image. ``random`` feeds it a fixed
N(0, 1) vector drawn at construction (saved in the state dict): learned, image-independent weights.

**CAMs.** ``coarse = relu(conv(patches))`` *detached*; ``CAM_fused = CA * coarse`` (``cam_fusion="fused"``;
``"coarse"`` and ``"attention"`` use one factor); ``fine[c, p] = sum_q PA[p, q] CAM_fused[c, q]``.

**Gradient routing** (the ``detach`` placement that defines the method): the coarse CAM and every input of AAF
are detached, so ``L_fine`` trains only AAF's parameters, and ``L_cls`` and ``L_coarse`` train the backbone,
class tokens and CAM head; nothing flows from AAF into the backbone (pinned in ``tests/models/test_weaktr.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weakseg.models.vit import BackboneOutput, GatedViT, ViTConfig

#: Default SE reduction of each AAF variant (``weaktr.md`` 1.1, 2).
AAF_REDUCTION = {"v2": 8, "random": 8, "v1": 4}
#: Feature reduction of v2's per-map scorer (64 -> 8 -> 1 for DeiT-S's 64 channels per head).
FEAT_REDUCTION = 8


def per_block(attentions: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """The blocks' maps as a list of (B, H, T, T), from a stacked (B, L, H, T, T) or a sequence."""
    return list(attentions.unbind(1)) if isinstance(attentions, Tensor) else list(attentions)


class AdaptiveAttentionFusion(nn.Module):
    """Per-image weights for all L x H attention maps and their weighted mean (module docstring).

    Args:
        depth, num_heads, embed_dim: the backbone's size (L, H, D).
        variant: ``"v2"``, ``"v1"`` or ``"random"``.
        reduction: SE reduction r (default by variant).
        pool: token pooling of v2's features, ``"max"`` or ``"avg"``.
    """

    def __init__(self, depth: int, num_heads: int, embed_dim: int, variant: str = "v2",
                 reduction: int | None = None, pool: str = "max") -> None:
        super().__init__()
        self.depth, self.num_heads, self.variant, self.pool = depth, num_heads, variant, pool
        n = depth * num_heads
        r = reduction or AAF_REDUCTION[variant]
        if variant == "v2":
            f = embed_dim // num_heads
            hidden = max(1, f // FEAT_REDUCTION)
            self.feature_score = nn.Sequential(nn.Linear(f, hidden), nn.Linear(hidden, 1))
        if variant == "random":
            self.register_buffer("query", torch.randn(n))  # drawn from the seeded global generator, saved
        self.se = nn.Sequential(nn.Linear(n, max(1, n // r), bias=False), nn.ReLU(),
                                nn.Linear(max(1, n // r), n, bias=False), nn.Sigmoid())

    def scores(self, attentions: Tensor | Sequence[Tensor], outputs: Tensor) -> Tensor:
        """SE input s, (B, L, H), from the maps (B, L, H, T, T) or L maps (B, H, T, T), and branch outputs
        (B, L, T, D)."""
        maps = per_block(attentions)
        B, H = maps[0].shape[:2]
        L = len(maps)
        if self.variant == "v1":
            return torch.stack([a.mean(dim=(-2, -1)) for a in maps], dim=1)  # (B, L, H)
        if self.variant == "random":
            return self.query.view(1, H, L).transpose(1, 2).expand(B, L, H)  # j = head * L + layer
        T, D = outputs.shape[-2:]
        feats = outputs.reshape(B, L, T, D // H, H).permute(0, 1, 4, 2, 3)  # (B, L, H, T, D/H): channel d*H + h
        pooled = feats.amax(dim=3) if self.pool == "max" else feats.mean(dim=3)  # (B, L, H, D/H)
        return self.feature_score(pooled).squeeze(-1)  # (B, L, H)

    def forward(self, attentions: Tensor | Sequence[Tensor], outputs: Tensor) -> tuple[Tensor, Tensor]:
        """Fused attention (B, T, T) and the weights (B, L, H); inputs are detached here.

        ``attentions`` is (B, L, H, T, T) or the L blocks' maps (B, H, T, T). The weighted sum runs block by
        block as one (1 x H) @ (H x T*T) product per image on each map as it is, so the L maps are never
        stacked into one (B, L, H, T, T) copy (at ViT-S/16 size that copy and its einsum permutation cost a
        quarter of a training step on CPU; ``benchmarks/train_step.py``).
        """
        maps = [a.detach() for a in per_block(attentions)]  # L x (B, H, T, T)
        outputs = outputs.detach()
        B, H, T = maps[0].shape[:3]
        L = len(maps)
        s = self.scores(maps, outputs)  # (B, L, H)
        w = self.se(s.transpose(1, 2).reshape(B, H * L))  # (B, H*L), index head * L + layer
        w = w.view(B, H, L).transpose(1, 2)  # (B, L, H)
        fused = sum(torch.bmm(w[:, b].unsqueeze(1), a.reshape(B, H, T * T))  # (B, 1, T*T) per block
                    for b, a in enumerate(maps))
        return fused.view(B, T, T) / (L * H), w  # type: ignore[union-attr]


class WeakTrViT(GatedViT):
    """:class:`GatedViT` plus WeakTr's CAM head and AAF (module docstring); ``cfg.aaf`` names the AAF variant."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__(cfg)
        assert cfg.aaf is not None  # build_classifier picks this class only then
        D, C = cfg.embed_dim, cfg.num_classes
        self.cam_head = nn.Conv2d(D, C, kernel_size=3, padding=1)
        self.aaf = AdaptiveAttentionFusion(cfg.depth, cfg.num_heads, D, cfg.aaf, cfg.aaf_reduction, cfg.aaf_pool)
        nn.init.trunc_normal_(self.cam_head.weight, std=0.02)
        nn.init.zeros_(self.cam_head.bias)

    def auxiliary_blocks(self) -> list[int]:
        return list(range(self.cfg.depth))

    def weaktr_maps(self, out: BackboneOutput) -> dict[str, Tensor]:
        """WeakTr's maps of a forward pass that holds every block's attention and branch output.

        Returns:
            ``coarse_logits`` (B, C, h, w) the CAM head's output (its mean is ``y_coarse``); ``fused_cam``
            (B, C, h, w) = CA x detached ReLU(coarse) (by ``cam_fusion``); ``fine_cam`` (B, C, h, w) = PA applied
            to ``fused_cam``; ``patch_affinity`` (B, N, N); ``weights`` (B, L, H) AAF's head weights.
        """
        L = self.cfg.depth
        missing = [b for b in range(L) if b not in out.attentions or b not in out.attention_outputs]
        if missing:
            raise ValueError(f"WeakTr needs the attention and branch output of every block; missing {missing}")
        C, P = self.cfg.num_classes, self.num_prefix_tokens
        h, w = out.grid
        B = out.patches.shape[0]
        coarse_logits = self.cam_head(out.patch_grid())  # (B, C, h, w)
        coarse = F.relu(coarse_logits).detach()
        attn = [out.attentions[b] for b in range(L)]  # L x (B, H, T, T)
        outputs = torch.stack([out.attention_outputs[b] for b in range(L)], dim=1)  # (B, L, T, D)
        fused, weights = self.aaf(attn, outputs)  # (B, T, T), (B, L, H)
        class_attn = fused[:, :C, P:].reshape(B, C, h, w)  # (B, C, h, w)
        affinity = fused[:, P:, P:]  # (B, N, N)
        fusion = self.cfg.cam_fusion
        fused_cam = class_attn * coarse if fusion == "fused" else coarse if fusion == "coarse" else class_attn
        fine = torch.einsum("bpq,bcq->bcp", affinity, fused_cam.flatten(2)).reshape(B, C, h, w)
        return {"coarse_logits": coarse_logits, "fused_cam": fused_cam, "fine_cam": fine,
                "patch_affinity": affinity, "weights": weights}

    def auxiliary_logits(self, out: BackboneOutput) -> dict[str, Tensor]:
        """``coarse`` and ``fine``: the global averages of the CAM head's output and of the fine CAM, (B, C)."""
        maps = self.weaktr_maps(out)
        return {"coarse": maps["coarse_logits"].mean(dim=(2, 3)), "fine": maps["fine_cam"].mean(dim=(2, 3))}

