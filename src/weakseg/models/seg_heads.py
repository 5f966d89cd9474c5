"""Segmentation heads on the patch tokens of a ViT encoder: linear, SETR-naive and SETR-PUP.

Zheng et al., "Rethinking Semantic Segmentation from a Sequence-to-Sequence Perspective with Transformers"
(SETR), CVPR 2021, decode a ViT's patch tokens with simple heads; the reference ``ssl_vit.md`` section 5
lists the three here (after RecvisProject, which compares them on frozen self-supervised ViTs). The encoder
is the one Segmenter uses (:func:`weakseg.models.segmenter.build_vit_encoder`: weakseg's ungated
:class:`~weakseg.models.vit.GatedViT` with timm's names under ``encoder.``, so a timm / DeiT / DINO
checkpoint or a weakseg classifier's backbone initialises it), and each network
(:class:`~weakseg.models.segmenter.ViTEncoderNetwork`) has ``encoder_parameters()`` and ``freeze_encoder``
(encoder parameters not trained and the encoder kept in eval mode: only the head trains, RecvisProject's
default "linear probe" setting). Notation: B images, D the token width, K classes, p the patch size, (h, w)
the patch grid.

- ``vit_linear`` (:class:`LinearTokenHead`): ``Linear(D, p * p * K)`` per token, rearranged
  ``b (h w) (p1 p2 k) -> b k (h p1) (w p2)``: every token paints its own p x p block of logits (blocky).
- ``setr_naive`` (:class:`SETRNaiveHead`, SETR's "naive" decoder): tokens as (B, D, h, w) -> 1x1 conv
  D -> D -> BatchNorm -> ReLU -> 1x1 conv D -> K -> bilinear upsampling to the input.
- ``setr_pup`` (:class:`SETRPUPHead`, SETR's "progressive upsampling" decoder as published): log2(p)
  stages of 3x3 conv + BatchNorm + ReLU + x2 bilinear upsampling (width D / 4), then a 1x1 conv to K.
  RecvisProject's variant (1x1 convs without norm or activation) is a linear map followed by upsampling, a
  linear head with smoother interpolation (``ssl_vit.md`` 5); the non-linear original is the one worth
  comparing.

Every network maps (B, C, H, W) images of any size to (B, K, H, W) logits: the input is zero-padded at the
bottom and right to a multiple of p (as Segmenter, :func:`~weakseg.models.segmenter.pad_to_patches`), the
logits are computed for the padded size and cropped back.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from weakseg.errors import ConfigError
from weakseg.models.segmenter import ViTEncoderNetwork


class _TokenHeadNetwork(ViTEncoderNetwork):
    """Encoder + a head on its patch tokens (module docstring); subclasses implement :meth:`decode`.

    Args:
        in_chans, num_classes: input channels and classes K.
        img_size: the tile size the position embeddings are made for (other sizes interpolate them).
        patch_size, embed_dim, depth, num_heads: the encoder (p, D, blocks, heads).
        mlp_ratio, qkv_bias, s1_chans, fusion: the encoder's other settings (as
            :class:`~weakseg.models.segmenter.Segmenter`; a classifier backbone gives its own).
        freeze_encoder: train the head only (:class:`~weakseg.models.segmenter.ViTEncoderNetwork`).
    """

    def __init__(self, in_chans: int, num_classes: int, img_size: tuple[int, int] = (64, 64),
                 patch_size: int = 8, embed_dim: int = 96, depth: int = 4, num_heads: int = 6,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, s1_chans: int = 0, fusion: str = "concat",
                 freeze_encoder: bool = False) -> None:
        super().__init__()
        self._check(patch_size)
        self._init_encoder(in_chans, num_classes, img_size, patch_size, embed_dim, depth, num_heads,
                           mlp_ratio, qkv_bias, s1_chans, fusion, freeze_encoder)
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self._build_head()

    def _check(self, patch_size: int) -> None:
        """Refuse a patch size the head cannot decode (before anything is built)."""
        if patch_size < 1:
            raise ConfigError(f"patch size must be at least 1, got {patch_size} (--patch_size)")

    def _build_head(self) -> None:
        """Create the head's modules (``embed_dim``, ``num_classes`` and ``patch_size`` are set)."""
        raise NotImplementedError

    def decode(self, grid: Tensor, size: tuple[int, int]) -> Tensor:
        """Patch tokens as a map (B, D, h, w) -> logits (B, K, *size), ``size`` = (h p, w p)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> logits (B, K, H, W)."""
        H, W = x.shape[-2:]
        out, padded = self.encode(x)  # patches (B, h*w, D), padded = (h p, w p)
        logits = self.decode(out.patch_grid(), padded)  # (B, K, h p, w p)
        return logits[..., :H, :W]


class LinearTokenHead(_TokenHeadNetwork):
    """``vit_linear``: each patch token's p x p block of logits is a linear function of that token alone.

    ``Linear(D, p * p * K)`` on each token; its output index is ``(p1 * p + p2) * K + k`` for the pixel
    (p1, p2) of the token's block and class k, i.e. ``b (h w) (p1 p2 k) -> b k (h p1) (w p2)``
    (``ssl_vit.md`` 5; the linear baseline of Zheng et al., CVPR 2021).
    """

    def _build_head(self) -> None:
        p = self.patch_size
        self.head = nn.Linear(self.embed_dim, p * p * self.num_classes)  # D -> p*p*K

    def decode(self, grid: Tensor, size: tuple[int, int]) -> Tensor:
        B, D, h, w = grid.shape
        p, K = self.patch_size, self.num_classes
        tokens = grid.flatten(2).transpose(1, 2)  # (B, h*w, D), row-major over the grid
        x = self.head(tokens)  # (B, h*w, p*p*K)
        x = x.reshape(B, h, w, p, p, K)  # b h w p1 p2 k
        x = x.permute(0, 5, 1, 3, 2, 4)  # b k h p1 w p2
        return x.reshape(B, K, h * p, w * p)  # b k (h p1) (w p2)


class SETRNaiveHead(_TokenHeadNetwork):
    """``setr_naive``: SETR's naive decoder (Zheng et al., CVPR 2021; ``ssl_vit.md`` 5).

    (B, D, h, w) -> 1x1 conv D -> D -> BatchNorm -> ReLU -> 1x1 conv D -> K -> bilinear upsampling x p.
    """

    def _build_head(self) -> None:
        D = self.embed_dim
        self.head = nn.Sequential(nn.Conv2d(D, D, 1), nn.BatchNorm2d(D), nn.ReLU(inplace=True),
                                  nn.Conv2d(D, self.num_classes, 1))

    def decode(self, grid: Tensor, size: tuple[int, int]) -> Tensor:
        masks = self.head(grid)  # (B, K, h, w)
        return F.interpolate(masks, size=size, mode="bilinear", align_corners=False)  # (B, K, h p, w p)


class SETRPUPHead(_TokenHeadNetwork):
    """``setr_pup``: SETR's progressive-upsampling decoder as published (Zheng et al., CVPR 2021), non-linear.

    log2(p) stages, each 3x3 conv -> BatchNorm -> ReLU -> x2 bilinear upsampling (the first D -> D/4, the
    others D/4 -> D/4; width at least 1), so the grid reaches the input resolution (h p, w p); then a 1x1 conv
    to K. p = 16 has 4 stages as in SETR, p = 8 has 3. Not RecvisProject's 1x1-conv variant without norm and
    activation, which is linear up to the interpolation (``ssl_vit.md`` 5).

    Raises:
        ConfigError: a patch size that is not a power of two (x2 stages cannot reach it).
    """

    def _build_head(self) -> None:
        D = self.embed_dim
        width = max(1, D // 4)
        stages: list[nn.Module] = []
        channels = D
        for _ in range(pup_stages(self.patch_size)):
            stages.append(nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Conv2d(channels, self.num_classes, 1)

    def _check(self, patch_size: int) -> None:
        pup_stages(patch_size)

    def decode(self, grid: Tensor, size: tuple[int, int]) -> Tensor:
        x = self.stages(grid)  # (B, D, h, w) -> (B, D/4, 2h, 2w) -> ... -> (B, D/4, h p, w p)
        return self.classifier(x)  # (B, K, h p, w p)


def pup_stages(patch_size: int) -> int:
    """x2 upsampling stages of SETR-PUP for patch size p: log2(p).

    Raises:
        ConfigError: p is not a power of two.
    """
    if patch_size < 1 or patch_size & (patch_size - 1):
        raise ConfigError(f"setr_pup upsamples by 2 per stage, so its patch size must be a power of two "
                          f"(2, 4, 8, 16, ...); got {patch_size} (--patch_size)")
    return int(math.log2(patch_size))


#: ``weakseg refine --model`` name -> head network class.
HEADS: dict[str, type[_TokenHeadNetwork]] = {
    "vit_linear": LinearTokenHead,
    "setr_naive": SETRNaiveHead,
    "setr_pup": SETRPUPHead,
}
