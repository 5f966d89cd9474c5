"""Initialise a :class:`~weakseg.models.vit.GatedViT` from a local timm / DeiT / DINO checkpoint.

Nothing is downloaded: the user passes a file. Our parameter names are timm's, so most tensors load as they
are; three are adapted:

- ``patch_embed.proj.weight`` for another number of input channels (RGB -> 13 S2 or 15 S2+S1 bands): the RGB
  kernels are repeated cyclically over the new channels, each divided by how often it is repeated, so the
  response to a constant image is unchanged (timm's ``adapt_input_conv`` scales by 3 / C instead, which is
  exact only when C is a multiple of 3). For the summed multimodal fusion the S1 embedding is adapted the
  same way. Another patch size resizes the kernel (see :func:`adapt_patch_kernel`).
- ``pos_embed`` for another patch grid: the patch part is interpolated bicubically on its 2-D grid; prefix
  positions are kept (repeated when the model has more prefix tokens than the checkpoint).
- ``head`` is dropped when the number of classes differs (the classifier is trained from scratch, as the
  reference's ``--pretrained`` does).

Gate parameters (``log_alpha``) are not in such checkpoints and keep their initialisation.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from weakseg.errors import ConfigError
from weakseg.models.vit import GatedViT, interpolate_patch_positions

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "teacher", "student", "module")
_PREFIXES = ("module.", "backbone.", "model.", "encoder.")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a state dict from a .pth/.pt/.bin/.ckpt file, unwrapping common containers and key prefixes."""
    if not path.is_file():
        raise ConfigError(f"pretrained checkpoint {path} does not exist (--pretrained)")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - report any unreadable file as a user error
        raise ConfigError(f"cannot read pretrained checkpoint {path}: {e}") from e
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
            key = next((k for k in _WRAPPER_KEYS if k in obj), None)
            if key is None:
                break
            obj = obj[key]
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(f"{path} holds no state dict of tensors")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, Tensor):
            continue
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def adapt_patch_kernel(weight: Tensor, in_chans: int, patch_size: int) -> Tensor:
    """(D, C0, p0, p0) kernel -> (D, in_chans, patch_size, patch_size), keeping the response to a constant image.

    Channels: with more channels than the source, source channel j % C0 feeds new channel j, divided by how often
    it is used; with fewer (an RGB kernel for the 2 S1 bands), new channel j is the sum of the source channels
    i with i % in_chans == j. Either way the sum over input channels, hence the response to a constant image, is
    unchanged. Size: area averaging when shrinking (exact for integer ratios), bilinear when
    growing, times p0^2 / p^2.
    """
    D, C0, p0, _ = weight.shape
    weight = weight.float()
    if p0 != patch_size:
        mode = "area" if patch_size < p0 else "bilinear"
        kwargs = {} if mode == "area" else {"align_corners": False}
        weight = F.interpolate(weight, size=(patch_size, patch_size), mode=mode, **kwargs)
        weight = weight * (p0 * p0) / (patch_size * patch_size)
    if in_chans > C0:  # repeat the source channels cyclically, each divided by how often it is used
        src = torch.arange(in_chans) % C0
        uses = torch.bincount(src, minlength=C0).float()
        weight = weight[:, src] / uses[src].view(1, -1, 1, 1)
    elif in_chans < C0:  # fold: new channel j sums the source channels i with i % in_chans == j (none dropped)
        folded = torch.zeros(D, in_chans, *weight.shape[2:], dtype=weight.dtype)
        weight = folded.index_add_(1, torch.arange(C0) % in_chans, weight)
    return weight


def resize_pos_embed(pos: Tensor, num_prefix_src: int, num_prefix_dst: int, grid_dst: tuple[int, int]) -> Tensor:
    """(1, P0 + h0*w0, D) -> (1, P + h*w, D); the source grid is assumed square (timm checkpoints are)."""
    prefix, patches = pos[:, :num_prefix_src], pos[:, num_prefix_src:]
    n0 = patches.shape[1]
    g0 = int(round(math.sqrt(n0)))
    if g0 * g0 != n0:
        raise ConfigError(f"checkpoint position embedding has {n0} patch positions, not a square grid")
    D = pos.shape[-1]
    patches = interpolate_patch_positions(patches.float(), (g0, g0), tuple(grid_dst))
    if num_prefix_dst != num_prefix_src:
        idx = torch.arange(num_prefix_dst).clamp_max(max(num_prefix_src - 1, 0))
        prefix = prefix[:, idx] if num_prefix_src else torch.zeros(1, num_prefix_dst, D)
    return torch.cat([prefix, patches], dim=1)


def load_pretrained(model: GatedViT, path: Path, num_prefix_tokens: int | None = None) -> dict[str, list[str]]:
    """Load a timm-layout checkpoint into ``model``, adapting shapes; returns missing/skipped key lists.

    Args:
        num_prefix_tokens: prefix tokens in the checkpoint's ``pos_embed`` (default: 1 class token plus its
            ``reg_token`` count when present).
    """
    sd = read_state_dict(Path(path))
    cfg = model.cfg
    own = model.state_dict()
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise ConfigError(f"{path} is not a ViT checkpoint in timm's layout (no patch_embed.proj.weight / pos_embed)")
    kernel = sd["patch_embed.proj.weight"]
    if kernel.ndim != 4 or kernel.shape[-1] != kernel.shape[-2] or kernel.shape[-1] < 1:
        raise ConfigError(f"{path}: its patch embedding patch_embed.proj.weight has shape {tuple(kernel.shape)}, "
                          "not a square (D, C, p, p) convolution kernel: its patch size cannot be adapted to the "
                          f"model's {cfg.patch_size} (--patch_size)")
    src_dim = sd["patch_embed.proj.weight"].shape[0]
    if src_dim != cfg.embed_dim:
        raise ConfigError(f"{path} has embed_dim {src_dim} but the model has {cfg.embed_dim} (--embed_dim)")
    n_src_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if n_src_blocks < cfg.depth:
        raise ConfigError(f"{path} has {n_src_blocks} blocks but the model has depth {cfg.depth} (--depth)")
    s2_chans = cfg.in_chans - cfg.s1_chans if model.patch_embed_s1 is not None else cfg.in_chans
    w = sd["patch_embed.proj.weight"]
    sd["patch_embed.proj.weight"] = adapt_patch_kernel(w, s2_chans, cfg.patch_size)
    if model.patch_embed_s1 is not None and "patch_embed_s1.proj.weight" not in sd:
        sd["patch_embed_s1.proj.weight"] = adapt_patch_kernel(w, cfg.s1_chans, cfg.patch_size)
        sd["patch_embed_s1.proj.bias"] = torch.zeros(cfg.embed_dim)
    if num_prefix_tokens is None:
        num_prefix_tokens = (1 if "cls_token" in sd else 0) + (sd["reg_token"].shape[1] if "reg_token" in sd else 0)
    sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], num_prefix_tokens, cfg.num_prefix_tokens, cfg.grid_size)
    if "cls_token" in sd and sd["cls_token"].shape[1] != cfg.num_cls_tokens:
        sd["cls_token"] = sd["cls_token"][:, :1].repeat(1, cfg.num_cls_tokens, 1)
    skipped = []
    for k in list(sd):
        if k not in own:
            skipped.append(k)
            del sd[k]
        elif sd[k].shape != own[k].shape:
            skipped.append(f"{k} {tuple(sd[k].shape)} -> {tuple(own[k].shape)}")
            del sd[k]
    blocks_skipped = [k for k in skipped if k.startswith("blocks.") and "->" in k]
    if blocks_skipped:  # a silently random MLP is a wrong run, not a partial load
        shape = checkpoint_block_shape(path)
        raise ConfigError(
            f"{path}: {len(blocks_skipped)} transformer tensors have another shape than the model's (e.g. "
            f"{blocks_skipped[0]}): the checkpoint's blocks have MLP ratio {shape['mlp_ratio']:g} and "
            f"{'a' if shape['qkv_bias'] else 'no'} qkv bias, the model {cfg.mlp_ratio:g} and "
            f"{'a' if cfg.qkv_bias else 'no'} qkv bias (--mlp_ratio {shape['mlp_ratio']:g})")
    missing, _ = model.load_state_dict(sd, strict=False)
    not_gates = [k for k in missing if not k.endswith("log_alpha")]
    log.info("loaded %s: %d tensors; kept init for %s; skipped %s", path, len(sd), not_gates, skipped)
    return {"missing": list(missing), "skipped": skipped}


def checkpoint_block_shape(path: Path) -> dict[str, Any]:
    """The MLP ratio and qkv bias of a timm-layout checkpoint's blocks (``blocks.0.mlp.fc1``, ``attn.qkv.bias``),
    so an encoder built for it takes every tensor (``weakseg refine --pretrained``)."""
    sd = read_state_dict(Path(path))
    fc1, qkv = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.attn.qkv.weight")
    if fc1 is None or qkv is None:
        raise ConfigError(f"{path} is not a ViT checkpoint in timm's layout (no blocks.0.mlp.fc1 / attn.qkv)")
    return {"mlp_ratio": fc1.shape[0] / fc1.shape[1], "qkv_bias": "blocks.0.attn.qkv.bias" in sd}
