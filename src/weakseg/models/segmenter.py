"""Segmenter: a ViT encoder with a mask-transformer decoder, WeakTr's phase-2 ("online retraining") network.

Strudel, Garcia, Laptev and Schmid, "Segmenter: Transformer for Semantic Segmentation", ICCV 2021; as configured
by WeakTr (Zhu et al., IEEE TIP; ``weaktr.md`` section 4). The encoder is weakseg's
:class:`~weakseg.models.vit.GatedViT` without gates, with the final LayerNorm, its prefix tokens dropped before
decoding; its state-dict names stay timm's under ``encoder.``, so a DeiT / timm / DINO checkpoint initialises it
(:func:`weakseg.models.pretrained.load_pretrained`).

Decoder (per image, N patch tokens of width D, K classes):

1. ``Linear(D, D)`` on the patch tokens, concatenated with K learned class embeddings -> (N + K, D);
2. ``decoder_depth`` transformer blocks (2 in WeakTr; weakseg's blocks have no dropout), then a LayerNorm;
3. separate learned D x D projections of the patch and the class tokens, each L2-normalised;
4. masks = patches . classes^T (cosine similarities, (N, K)), a LayerNorm over the class dimension;
5. reshaped to the patch grid and upsampled bilinearly to the input.

The input is zero-padded to a multiple of the patch size and the logits cropped back; other input sizes than
``img_size`` interpolate the encoder's patch position embeddings. Sliding-window inference lives in
:func:`sliding_window_logits`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weakseg.models.vit import Block, GatedViT, ViTConfig


class MaskTransformer(nn.Module):
    """The decoder of Segmenter (module docstring); ``forward(patches, grid) -> (B, K, h, w)`` masks."""

    def __init__(self, embed_dim: int, num_classes: int, depth: int = 2, num_heads: int = 6,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        D = embed_dim
        block_cfg = ViTConfig(img_size=(8, 8), patch_size=8, in_chans=1, embed_dim=D, depth=depth,
                              num_heads=num_heads, mlp_ratio=mlp_ratio, gated=False)
        self.proj_dec = nn.Linear(D, D)
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, D) * 0.02)
        self.blocks = nn.ModuleList([Block(block_cfg) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(D)
        scale = D**-0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(D, D))
        self.proj_classes = nn.Parameter(scale * torch.randn(D, D))
        self.mask_norm = nn.LayerNorm(num_classes)
        self.num_classes = num_classes

    def forward(self, patches: Tensor, grid: tuple[int, int]) -> Tensor:
        B, N, _ = patches.shape
        x = torch.cat([self.proj_dec(patches), self.cls_emb.expand(B, -1, -1)], dim=1)  # (B, N + K, D)
        for blk in self.blocks:
            x = blk(x)[0]
        x = self.decoder_norm(x)
        p = F.normalize(x[:, :N] @ self.proj_patch, dim=-1)  # (B, N, D)
        c = F.normalize(x[:, N:] @ self.proj_classes, dim=-1)  # (B, K, D)
        masks = self.mask_norm(p @ c.transpose(1, 2))  # (B, N, K)
        return masks.transpose(1, 2).reshape(B, self.num_classes, *grid)


class Segmenter(nn.Module):
    """ViT encoder + mask transformer (module docstring).

    Args:
        in_chans, num_classes: input channels and classes.
        img_size: the tile size the position embeddings are made for (other sizes interpolate them).
        patch_size, embed_dim, depth, num_heads: the encoder (WeakTr: DeiT-S, 16 / 384 / 12 / 6).
        decoder_depth: mask-transformer blocks (WeakTr: 2).
    """

    def __init__(self, in_chans: int, num_classes: int, img_size: tuple[int, int] = (64, 64), patch_size: int = 8,
                 embed_dim: int = 96, depth: int = 4, num_heads: int = 6, decoder_depth: int = 2) -> None:
        super().__init__()
        p = patch_size
        size = tuple(max(p, math.ceil(s / p) * p) for s in img_size)
        self.encoder = GatedViT(ViTConfig(img_size=size, patch_size=p, in_chans=in_chans, embed_dim=embed_dim,
                                          depth=depth, num_heads=num_heads, mlp_ratio=4.0, num_classes=num_classes,
                                          gated=False, final_norm=True))
        self.encoder.head = nn.Identity()  # no classifier head: the decoder reads the patch tokens
        self.decoder = MaskTransformer(embed_dim, num_classes, decoder_depth, num_heads)
        self.patch_size = p

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> logits (B, K, H, W)."""
        H, W = x.shape[-2:]
        p = self.patch_size
        pad_h, pad_w = (-H) % p, (-W) % p
        padded = F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x  # zeros, as WeakTr's phase 2
        out = self.encoder.forward_features(padded)
        masks = self.decoder(out.patches, out.grid)  # (B, K, h, w)
        logits = F.interpolate(masks, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :H, :W]

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` covering ``size`` with ``stride`` (the last one flush right)."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def sliding_window_logits(model: nn.Module, x: Tensor, window: int | None, stride: int | None) -> Tensor:
    """Logits (B, K, H, W) averaged over overlapping ``window`` x ``window`` crops at ``stride`` (WeakTr: 480 /
    320); one pass when the window covers the image or ``window`` is None."""
    H, W = x.shape[-2:]
    if window is None or (H <= window and W <= window):
        return model(x)
    stride = stride or window
    total: Tensor | None = None
    count = torch.zeros(1, 1, H, W, device=x.device)
    for top in window_starts(H, window, stride):
        for left in window_starts(W, window, stride):
            crop = x[..., top:top + window, left:left + window]
            logits = model(crop)
            if total is None:
                total = torch.zeros(x.shape[0], logits.shape[1], H, W, device=x.device, dtype=logits.dtype)
            total[..., top:top + crop.shape[-2], left:left + crop.shape[-1]] += logits
            count[..., top:top + crop.shape[-2], left:left + crop.shape[-1]] += 1
    assert total is not None
    return total / count
