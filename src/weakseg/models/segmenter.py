"""Segmenter: a ViT encoder with a mask-transformer decoder, WeakTr's phase-2 ("online retraining") network.

Strudel, Garcia, Laptev and Schmid, "Segmenter: Transformer for Semantic Segmentation", ICCV 2021; as configured
by WeakTr (Zhu et al., IEEE TIP; ``weaktr.md`` section 4). The encoder is weakseg's
:class:`~weakseg.models.vit.GatedViT` without gates, with the final LayerNorm, its prefix tokens dropped before
decoding; its state-dict names stay timm's under ``encoder.``, so a DeiT / timm / DINO checkpoint initialises it
(:func:`weakseg.models.pretrained.load_pretrained`), and so does a weakseg classifier's backbone
(:func:`load_classifier_backbone`).

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

from weakseg.errors import ConfigError
from weakseg.models.vit import BackboneOutput, Block, GatedViT, ViTConfig, interpolate_patch_positions


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


def build_vit_encoder(in_chans: int, num_classes: int, img_size: tuple[int, int], patch_size: int, embed_dim: int,
                      depth: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, s1_chans: int = 0,
                      fusion: str = "concat") -> GatedViT:
    """The ViT encoder of every ViT-encoder segmentation network (Segmenter, :mod:`weakseg.models.seg_heads`):
    a :class:`~weakseg.models.vit.GatedViT` without gates, with the final LayerNorm and no classifier head
    (``head = Identity``), its position embeddings made for ``img_size`` rounded up to patch multiples (at least
    one patch); state-dict names are timm's, so :func:`~weakseg.models.pretrained.load_pretrained` and
    :func:`load_classifier_backbone` initialise it."""
    p = patch_size
    size = tuple(max(p, math.ceil(s / p) * p) for s in img_size)
    encoder = GatedViT(ViTConfig(img_size=size, patch_size=p, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                                 num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, s1_chans=s1_chans,
                                 fusion=fusion, num_classes=num_classes, gated=False, final_norm=True))
    encoder.head = nn.Identity()  # no classifier head: the decoder / head reads the patch tokens
    return encoder


def pad_to_patches(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) zero-padded at the bottom and right to multiples of ``patch_size`` (WeakTr's phase 2); the
    caller crops its logits back to (H, W)."""
    H, W = x.shape[-2:]
    pad_h, pad_w = (-H) % patch_size, (-W) % patch_size
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


class ViTEncoderNetwork(nn.Module):
    """Base of the segmentation networks on a ViT encoder (:func:`build_vit_encoder`): ``encoder``,
    ``patch_size``, :meth:`encoder_parameters` (their own learning rate, ``encoder_lr_scale``) and
    ``freeze_encoder``: the encoder's parameters get ``requires_grad=False`` and the encoder stays in eval mode
    when the network is put in training mode, so only the decoder / head trains (a linear probe of the encoder's
    features when the head is linear; ``ssl_vit.md`` section 5: RecvisProject's default).

    Subclasses set ``self.encoder`` with :meth:`_init_encoder` and read the patch tokens with :meth:`encode`.
    """

    encoder: GatedViT

    def _init_encoder(self, in_chans: int, num_classes: int, img_size: tuple[int, int], patch_size: int,
                      embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, s1_chans: int,
                      fusion: str, freeze_encoder: bool) -> None:
        self.encoder = build_vit_encoder(in_chans, num_classes, img_size, patch_size, embed_dim, depth, num_heads,
                                         mlp_ratio, qkv_bias, s1_chans, fusion)
        self.patch_size = patch_size
        self.freeze_encoder = bool(freeze_encoder)
        if self.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> ViTEncoderNetwork:
        """``nn.Module.train``, but a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def encode(self, x: Tensor) -> tuple[BackboneOutput, tuple[int, int]]:
        """(B, C, H, W) -> the encoder's output on the zero-padded input (:func:`pad_to_patches`; patch tokens
        (B, h*w, D), grid (h, w) = padded size / p) and that padded size (h*p, w*p)."""
        padded = pad_to_patches(x, self.patch_size)
        return self.encoder.forward_features(padded), (padded.shape[-2], padded.shape[-1])

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())


class Segmenter(ViTEncoderNetwork):
    """ViT encoder + mask transformer (module docstring).

    Args:
        in_chans, num_classes: input channels and classes.
        img_size: the tile size the position embeddings are made for (other sizes interpolate them).
        patch_size, embed_dim, depth, num_heads: the encoder (WeakTr: DeiT-S, 16 / 384 / 12 / 6).
        decoder_depth: mask-transformer blocks (WeakTr: 2).
        mlp_ratio, qkv_bias: the encoder's MLP width and qkv bias (DeiT's 4 and True).
        s1_chans, fusion: Sentinel-1 channels and their early fusion (:class:`~weakseg.models.vit.ViTConfig`;
            default one patch embedding over all channels).
        freeze_encoder: train the decoder only (:class:`ViTEncoderNetwork`).

    A weakseg classifier's backbone initialising the encoder (:func:`load_classifier_backbone`) gives its own
    ``mlp_ratio``, ``qkv_bias``, ``s1_chans`` and ``fusion``.
    """

    def __init__(self, in_chans: int, num_classes: int, img_size: tuple[int, int] = (64, 64), patch_size: int = 8,
                 embed_dim: int = 96, depth: int = 4, num_heads: int = 6, decoder_depth: int = 2,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, s1_chans: int = 0, fusion: str = "concat",
                 freeze_encoder: bool = False) -> None:
        super().__init__()
        self._init_encoder(in_chans, num_classes, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio,
                           qkv_bias, s1_chans, fusion, freeze_encoder)
        self.decoder = MaskTransformer(embed_dim, num_classes, decoder_depth, num_heads)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> logits (B, K, H, W)."""
        H, W = x.shape[-2:]
        out, padded = self.encode(x)  # zeros, as WeakTr's phase 2
        masks = self.decoder(out.patches, out.grid)  # (B, K, h, w)
        logits = F.interpolate(masks, size=padded, mode="bilinear", align_corners=False)
        return logits[..., :H, :W]


#: Settings of a classifier backbone that must equal the encoder's (refine flag in brackets where there is one).
_BACKBONE_SHAPE = (("patch_size", "--patch_size"), ("embed_dim", "--embed_dim"), ("depth", "--depth"),
                   ("num_heads", "--num_heads"), ("in_chans", "the input channels"), ("mlp_ratio", "mlp_ratio"),
                   ("qkv_bias", "qkv_bias"), ("s1_chans", "the Sentinel-1 channels"), ("fusion", "fusion"))


@torch.no_grad()
def load_classifier_backbone(encoder: GatedViT, backbone: GatedViT) -> dict[str, list[str]]:
    """Initialise Segmenter's ``encoder`` from a weakseg classifier's ``backbone`` (``weakseg refine
    --encoder_checkpoint``): at the start the encoder computes the classifier's patch features, exactly for a
    one-CLS ViT without registers (with class tokens or registers the prefix tokens differ, see below).

    Same-named tensors of the same shape are copied (patch embedding, blocks, final norm); the classifier's head,
    gates, WeakTr heads and register tokens have no place in the encoder and are left out. Adapted:

    - prefix: the encoder has one CLS token; it starts as the mean of the classifier's class tokens (the CLS token
      itself for a one-CLS ViT), and its position as the mean of theirs;
    - ``pos_embed``'s patch part is interpolated to the encoder's grid (bicubic, as at other input sizes);
    - pruning: a head the classifier's gates close (its evaluation state) is switched off in the ungated encoder
      by zeroing its columns of the block's output projection (what the gate's 0 does); training may then
      reopen the head. Register tokens are dropped.

    Raises:
        ConfigError: a backbone of another patch size, width, depth, heads, channels or MLP ratio.

    Returns:
        ``{"copied": [...], "skipped": [...]}`` tensor names.
    """
    src_cfg, dst_cfg = backbone.cfg, encoder.cfg
    for name, flag in _BACKBONE_SHAPE:
        if getattr(src_cfg, name) != getattr(dst_cfg, name):
            raise ConfigError(f"the classifier backbone (--encoder_checkpoint) has {name} {getattr(src_cfg, name)} "
                              f"but the encoder has {getattr(dst_cfg, name)} ({flag}); an encoder initialised from "
                              "a classifier takes its shape")
    src = backbone.state_dict()
    own = encoder.state_dict()
    T = src_cfg.num_cls_tokens
    patches = interpolate_patch_positions(src["pos_embed"][:, src_cfg.num_prefix_tokens:], src_cfg.grid_size,
                                          dst_cfg.grid_size)
    src["pos_embed"] = torch.cat([src["pos_embed"][:, :T].mean(dim=1, keepdim=True), patches], dim=1)
    src["cls_token"] = src["cls_token"].mean(dim=1, keepdim=True)
    head_dim = dst_cfg.embed_dim // dst_cfg.num_heads
    for block, kept in enumerate(backbone.head_mask()):
        key = f"blocks.{block}.attn.proj.weight"
        weight = src[key].clone()
        for head in (~kept).nonzero().flatten().tolist():
            weight[:, head * head_dim:(head + 1) * head_dim] = 0
        src[key] = weight
    copied = [k for k in own if k in src and src[k].shape == own[k].shape]
    encoder.load_state_dict({**own, **{k: src[k] for k in copied}})
    skipped = sorted(k for k in src if k not in copied)
    return {"copied": copied, "skipped": skipped}


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
