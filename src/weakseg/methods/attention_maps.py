"""Per-head attention maps of a ViT's class tokens, DINO style: what ``weakseg attention`` draws.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021 (facebookresearch/dino
``visualize_attention.py``; reference ``ssl_vit.md`` section 2): the input is cropped down to a multiple of the
patch size, the patch position embeddings are interpolated to the new grid (:meth:`GatedViT.embed`), and each
head's post-softmax attention of the CLS query over the patch keys is a map; the smallest set of patches holding
60 % of a head's mass is its outline (:func:`weakseg.viz.figures.attention_mass_mask`).

The maps come from the explicit softmax path of :meth:`GatedViT.forward_features` (``attention_blocks``), gated,
so a pruned head's map is all zero; never from a hook on attention dropout, which fused attention skips.

A timm / DeiT / DINO state-dict file becomes an ungated :class:`GatedViT` with :func:`vit_from_state_dict_file`:
its shape (patch size, width, depth, MLP ratio, prefix tokens, input channels) is read from the tensors; only the
number of heads is not in the file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from weakseg.errors import ConfigError
from weakseg.models.vit import GatedViT, ViTConfig

#: Heads of the usual ViT widths that can be assumed when ``--num_heads`` is not given (ViT-S / DeiT-S / DINO).
DEFAULT_NUM_HEADS: dict[int, int] = {384: 6}
#: ImageNet normalisation of timm / DeiT / DINO models (RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def crop_to_patch_multiple(x: Tensor, patch_size: int) -> Tensor:
    """(..., H, W) -> (..., H - H % p, W - W % p), keeping the top-left corner (DINO ``visualize_attention.py``).

    Raises:
        ConfigError: if a side is smaller than one patch.
    """
    H, W = x.shape[-2:]
    if H < patch_size or W < patch_size:
        raise ConfigError(f"input {H}x{W} is smaller than one {patch_size}x{patch_size} patch")
    return x[..., : H - H % patch_size, : W - W % patch_size]


@dataclass
class TokenAttention:
    """Attention of every class token to the patches.

    Attributes:
        maps: (B, L, T, heads, h, w) for the L blocks of ``blocks`` and the T class tokens (1 for a CLS token),
            gated: pruned heads all zero.
        blocks: block indices (0-based, non-negative) of the L rows.
        kept: bool (L, heads), :meth:`GatedViT.head_mask` of those blocks.
        probs: (B, num_classes) sigmoid of the logits of the same pass.
    """

    maps: Tensor
    blocks: list[int]
    kept: Tensor
    probs: Tensor


@torch.no_grad()
def token_attention(model: GatedViT, x: Tensor, blocks: Sequence[int]) -> TokenAttention:
    """Per-head attention of each class token to the patches in ``blocks`` (negative indices allowed).

    ``x`` (B, C, H, W) is cropped down to a multiple of the patch size first (:func:`crop_to_patch_multiple`).
    """
    depth = model.cfg.depth
    for b in blocks:
        if not -depth <= b < depth:
            raise ConfigError(f"block {b} does not exist: the model has {depth} blocks (0..{depth - 1}, or -1 for "
                              "the last) (--block / --blocks)")
    rows = list(dict.fromkeys(b % depth for b in blocks))
    x = crop_to_patch_multiple(x, model.patch_size)
    model.eval()
    out = model.forward_features(x, attention_blocks=rows)
    probs = model.forward_head(out).sigmoid()
    maps = torch.stack([out.class_token_attention(b) for b in rows], dim=1)  # (B, L, heads, T, h, w)
    maps = maps.transpose(2, 3).contiguous()  # (B, L, T, heads, h, w)
    return TokenAttention(maps, rows, model.head_mask()[rows], probs)


def mass_fractions(maps: np.ndarray, mass: float = 0.6) -> np.ndarray:
    """Fraction of the patches in each map's ``mass`` set (:func:`~weakseg.viz.figures.attention_mass_mask`):
    (..., h, w) -> (...); a pruned (all-zero) head gives 0."""
    from weakseg.viz.figures import attention_mass_mask

    keep = attention_mass_mask(maps, mass)
    return keep.reshape(*keep.shape[:-2], -1).mean(axis=-1)


# ---- timm / DeiT / DINO files -------------------------------------------------------------------------------
def vit_config_from_state_dict(
    sd: dict[str, Tensor], path: Path, patch_size: int | None = None, embed_dim: int | None = None,
    depth: int | None = None, num_heads: int | None = None,
) -> tuple[ViTConfig, int]:
    """The ungated :class:`ViTConfig` of a timm-layout state dict, and its prefix-token count in ``pos_embed``.

    Read from the tensors: patch size (``patch_embed.proj.weight``), input channels, width, depth (``blocks.<i>``
    keys), MLP ratio, qkv bias, CLS and register tokens, final norm, classes (``head.weight``, 1 without a head).
    ``patch_size`` (the kernel is resized), ``depth`` (at most the file's) and ``num_heads`` may be given;
    ``embed_dim``, when given, must match the file.

    Raises:
        ConfigError: naming ``path`` and the flag, for a file that is not a ViT in timm's layout, a width that
            does not match, or a missing ``num_heads`` that cannot be assumed.
    """
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4 or "pos_embed" not in sd:
        raise ConfigError(f"{path} is not a ViT state dict in timm's layout (no patch_embed.proj.weight / pos_embed)")
    file_dim, in_chans, p_file = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    if embed_dim is not None and embed_dim != file_dim:
        raise ConfigError(f"{path} has embed_dim {file_dim}, not {embed_dim} (--embed_dim)")
    file_depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if file_depth == 0:
        raise ConfigError(f"{path} holds no transformer blocks (no blocks.<i>.* keys)")
    if depth is not None and not 1 <= depth <= file_depth:
        raise ConfigError(f"{path} has {file_depth} blocks; --depth {depth} must be in 1..{file_depth}")
    if num_heads is None:
        num_heads = DEFAULT_NUM_HEADS.get(file_dim)
        if num_heads is None:
            raise ConfigError(f"{path}: the number of attention heads is not stored in a state dict; pass "
                              f"--num_heads (embed_dim {file_dim}; e.g. 3 for DeiT-tiny 192, 12 for ViT-B 768)")
    p = patch_size or p_file
    num_cls = int(sd["cls_token"].shape[1]) if "cls_token" in sd else 0
    if num_cls == 0:
        raise ConfigError(f"{path} has no cls_token: the CLS attention maps need one")
    num_reg = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    n_pos = int(sd["pos_embed"].shape[1])
    prefix = num_cls + num_reg
    side = math.isqrt(max(n_pos - prefix, 0))
    if side * side != n_pos - prefix:  # timm's no_embed_class models: no position for the prefix tokens
        side, prefix = math.isqrt(n_pos), 0
        if side * side != n_pos:
            raise ConfigError(f"{path}: pos_embed has {n_pos} positions, not a square patch grid plus prefix tokens")
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = float(fc1.shape[0]) / file_dim if fc1 is not None else 4.0
    head = sd.get("head.weight")
    num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 1
    try:
        cfg = ViTConfig(img_size=(side * p, side * p), patch_size=p, in_chans=in_chans, embed_dim=file_dim,
                        depth=depth or file_depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                        qkv_bias="blocks.0.attn.qkv.bias" in sd, num_classes=num_classes, num_cls_tokens=num_cls,
                        num_register_tokens=num_reg, final_norm="norm.weight" in sd, gated=False)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    return cfg, prefix


def vit_from_state_dict_file(
    path: str | Path, patch_size: int | None = None, embed_dim: int | None = None, depth: int | None = None,
    num_heads: int | None = None,
) -> GatedViT:
    """An ungated :class:`GatedViT` holding the weights of a timm / DeiT / DINO state-dict file
    (:func:`vit_config_from_state_dict`, then :func:`weakseg.models.pretrained.load_pretrained`)."""
    from weakseg.models.pretrained import load_pretrained, read_state_dict

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"state-dict file {path} does not exist (--timm_checkpoint)")
    cfg, prefix = vit_config_from_state_dict(read_state_dict(path), path, patch_size, embed_dim, depth, num_heads)
    model = GatedViT(cfg)
    report = load_pretrained(model, path, num_prefix_tokens=prefix)
    missing = [k for k in report["missing"] if not k.endswith("log_alpha") and not k.startswith("head.")]
    if missing:
        raise ConfigError(f"{path} lacks {len(missing)} tensors of a ViT of its shape, e.g. {missing[:4]}")
    return model.eval()
