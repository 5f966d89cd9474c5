"""Vision Transformer with a Hard Concrete gate on every attention head: the backbone contract of weakseg.

Architecture: Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021 (patch embedding, prefix tokens,
learned position embedding, pre-norm blocks). Head gates: Hanna, Mommert and Borth, "Sparse Multimodal Vision
Transformer for Weakly Supervised Semantic Segmentation", CVPRW 2023 (see :mod:`weakseg.models.hard_concrete`).

State-dict names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``, ``norm``, ``head``), so DeiT, DINO and timm
checkpoints load from a local file with :func:`weakseg.models.pretrained.load_pretrained`. Gates add
``blocks.{i}.attn.gate.log_alpha``; the S1 patch embedding of the summed multimodal fusion adds
``patch_embed_s1.proj``.

**The contract.** Every method reaches the model only through:

- :meth:`GatedViT.forward_features` -> :class:`BackboneOutput` (prefix tokens, patch tokens as a sequence or a
  ``(B, D, h, w)`` grid, and the per-head attention of any set of blocks with pruned heads zeroed),
- :meth:`GatedViT.forward_head` (logits, or the pooled embedding with ``pre_logits=True``),
- :meth:`GatedViT.head_mask` (deterministic kept/pruned state of every head),
- :attr:`GatedViT.gradcam_layer` (the last block's first LayerNorm, whose output Grad-CAM differentiates).

Attention runs through fused ``scaled_dot_product_attention`` unless a block's attention map is requested; only
then is the explicit softmax computed, for those blocks. Gating after SDPA is exact because
``(g * A) @ V == g * (A @ V)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weakseg.errors import ConfigError
from weakseg.models.hard_concrete import HardConcreteGate, l0_penalty

AttentionImpl = Literal["fused", "explicit"]
#: How class-token outputs become logits (see :class:`ViTConfig`).
HeadType = Literal["pooled", "per_class", "flatten", "mean"]
HEAD_TYPES: tuple[str, ...] = ("pooled", "per_class", "flatten", "mean")
#: Adaptive Attention Fusion variants of WeakTr (:mod:`weakseg.models.weaktr`); None = no WeakTr heads.
AAF_VARIANTS: tuple[str, ...] = ("v2", "v1", "random")
CAM_FUSIONS: tuple[str, ...] = ("fused", "coarse", "attention")


@dataclass
class ViTConfig:
    """Everything that defines a :class:`GatedViT`; saved with checkpoints and compared on load.

    Attributes:
        img_size: (height, width) of the input; each must be divisible by ``patch_size``.
        patch_size: side of the square, non-overlapping patches.
        in_chans: channels of the input tensor. For multimodal input the tensor is S2 then S1 stacked.
        s1_chans: how many of the last ``in_chans`` channels are Sentinel-1 (0 = unimodal).
        fusion: multimodal early fusion. ``"concat"``: one patch embedding over all channels (TokenMasking-WSSS).
            ``"sum"``: separate S2 and S1 patch embeddings whose tokens are summed (the sparse ViT paper's MViT).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer size.
        num_classes: outputs of the multi-label head.
        num_cls_tokens: class tokens (WeakTr and TokenMasking-WSSS use one per class).
        num_register_tokens: extra learned prefix tokens (Darcet et al., "Vision Transformers Need Registers";
            TokenMasking-WSSS uses one).
        head_type: how the class-token outputs ``z`` (B, T, D) become the logits (B, C).
            ``"pooled"``: ``Linear(D, C)`` of their mean (one CLS token: the standard ViT head).
            ``"per_class"``: ``logit_c = <w_c, z_c> + b_c`` with T = C: class c's logit sees only class token c, so
            token c is *the* evidence for class c and its attention is a map of class c (weakseg's default for
            class tokens). ``"flatten"``: ``Linear(T * D, C)`` of all outputs concatenated, as released with
            TokenMasking-WSSS (Hanna & Borth, ICCV 2025): every logit sees every token, and only the random
            masking of absent classes' tokens ties token c to class c. ``"mean"``: ``logit_c = mean_d z_c[d]``, no
            weights (WeakTr's class-token logits, Zhu et al., IEEE TIP, ``weaktr.md`` 1).
        final_norm: apply the final LayerNorm before the head (timm, DeiT; TokenMasking-WSSS builds it but skips it).
        gated: put a Hard Concrete gate on every head.
        gate_temperature, gate_stretch: Hard Concrete parameters (paper: 0.33 and (-0.1, 1.1)).
        gate_init: initial log alpha of every gate; None = Xavier-uniform as the paper.
        aaf: WeakTr's heads (a conv CAM head and Adaptive Attention Fusion, :class:`weakseg.models.weaktr.WeakTrViT`)
            with this AAF variant: ``"v2"`` (the current release), ``"v1"`` (SE on pooled maps), ``"random"``
            (SE on a fixed random vector); None = no WeakTr heads.
        aaf_reduction: SE reduction of AAF (None: 8 for v2 and random, 4 for v1, as released).
        aaf_pool: token pooling of AAF v2's per-map features, ``"max"`` (the VOC recipe) or ``"avg"``.
        cam_fusion: WeakTr's CAM before patch-attention refinement: ``"fused"`` (fused class attention times the
            coarse CAM, the default), ``"coarse"`` or ``"attention"``.
        patch_classifier: ViT-PCM's patch-class mapping (:class:`weakseg.models.pcm.PCMViT`; Rossetti et al.,
            ECCV 2022): ``"linear"`` (the classifier on the patch features) or ``"bilstm"`` (after the H-V
            BiLSTM); the logits are the global max over the patches' softmax. None = no PCM head.
        pcm_lstm_hidden: hidden units per direction of the BiLSTM (None: embed_dim / 4, ViT-B's 192).
        pcm_dropout: dropout before the BiLSTM, its inputs and the patch classifier (0.2 as the original).
    """

    img_size: tuple[int, int] = (64, 64)
    patch_size: int = 8
    in_chans: int = 13
    s1_chans: int = 0
    fusion: Literal["concat", "sum"] = "concat"
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 6
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    num_classes: int = 8
    num_cls_tokens: int = 1
    num_register_tokens: int = 0
    head_type: HeadType = "pooled"
    final_norm: bool = True
    gated: bool = True
    gate_temperature: float = 0.33
    gate_stretch: tuple[float, float] = field(default=(-0.1, 1.1))
    gate_init: float | None = None
    aaf: str | None = None
    aaf_reduction: int | None = None
    aaf_pool: str = "max"
    cam_fusion: str = "fused"
    patch_classifier: str | None = None
    pcm_lstm_hidden: int | None = None
    pcm_dropout: float = 0.2

    def __post_init__(self) -> None:
        self.img_size = _pair(self.img_size)
        self.gate_stretch = (float(self.gate_stretch[0]), float(self.gate_stretch[1]))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the setting that is wrong."""
        h, w = self.img_size
        p = self.patch_size
        if p <= 0 or h % p or w % p:
            raise ConfigError(
                f"image size {h}x{w} is not divisible by patch size {p} (--imgsize / --patch_size); "
                f"for example use --imgsize {max(p, h // p * p)} {max(p, w // p * p)}"
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads} (--num_heads)"
            )
        if not 0 <= self.s1_chans < self.in_chans:
            raise ConfigError(f"s1_chans {self.s1_chans} must be in [0, in_chans={self.in_chans})")
        if self.fusion not in ("concat", "sum"):
            raise ConfigError(f"fusion must be 'concat' or 'sum', got {self.fusion!r}")
        if self.num_cls_tokens < 1:
            raise ConfigError("num_cls_tokens must be at least 1")
        if self.head_type not in HEAD_TYPES:
            raise ConfigError(f"head_type must be one of {list(HEAD_TYPES)}, got {self.head_type!r}")
        if self.head_type != "pooled" and self.num_cls_tokens != self.num_classes:
            raise ConfigError(
                f"head_type {self.head_type!r} needs one class token per class: num_cls_tokens "
                f"{self.num_cls_tokens} != num_classes {self.num_classes}"
            )
        if self.aaf is not None:
            if self.aaf not in AAF_VARIANTS:
                raise ConfigError(f"aaf must be one of {list(AAF_VARIANTS)}, got {self.aaf!r} (--aaf)")
            if self.num_cls_tokens != self.num_classes:
                raise ConfigError("WeakTr's heads (aaf) need one class token per class")
            if self.aaf_pool not in ("max", "avg"):
                raise ConfigError(f"aaf_pool must be 'max' or 'avg', got {self.aaf_pool!r} (--aaf_pool)")
            if self.cam_fusion not in CAM_FUSIONS:
                raise ConfigError(f"cam_fusion must be one of {list(CAM_FUSIONS)}, got {self.cam_fusion!r}")
            if self.aaf_reduction is not None and self.aaf_reduction < 1:
                raise ConfigError(f"aaf_reduction must be at least 1, got {self.aaf_reduction} (--aaf_reduction)")
        if self.patch_classifier is not None:
            if self.patch_classifier not in ("linear", "bilstm"):
                raise ConfigError(f"patch_classifier must be 'linear' or 'bilstm', got {self.patch_classifier!r} "
                                  "(--pcm_head)")
            if self.aaf is not None or self.head_type != "pooled" or self.num_cls_tokens != 1:
                raise ConfigError("ViT-PCM's patch classifier (--arch pcm) takes one CLS token and no other head")
            if self.pcm_lstm_hidden is not None and self.pcm_lstm_hidden < 1:
                raise ConfigError(f"pcm_lstm_hidden must be at least 1, got {self.pcm_lstm_hidden} (--pcm_lstm_hidden)")
            if not 0.0 <= self.pcm_dropout < 1.0:
                raise ConfigError(f"pcm_dropout must be in [0, 1), got {self.pcm_dropout} (--pcm_dropout)")

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return self.num_cls_tokens + self.num_register_tokens

    @property
    def has_class_tokens(self) -> bool:
        """One class token per class, each feeding its own class's logit (``class_tokens`` architecture)."""
        return self.num_cls_tokens == self.num_classes and self.head_type != "pooled"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        d["gate_stretch"] = list(self.gate_stretch)
        return d


def _pair(v: int | Iterable[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise ConfigError(f"image size must be one or two integers, got {list(t)}")
    return (t[0], t[1])


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> linear projection (a strided convolution, as in timm)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, h*w, D)


class Attention(nn.Module):
    """Multi-head self-attention with an optional Hard Concrete gate per head."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.gate = (
            HardConcreteGate(cfg.num_heads, cfg.gate_temperature, cfg.gate_stretch, init=cfg.gate_init)
            if cfg.gated
            else None
        )
        #: "explicit" forces the softmax path even without a requested map (benchmarks, debugging).
        self.impl: AttentionImpl = "fused"

    def forward(
        self, x: Tensor, return_attention: bool = False, gated_map: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Returns the output and, with ``return_attention``, the attention map (B, heads, N, N): times the gate
        (pruned heads all zero) by default, or before the gate with ``gated_map=False`` (the output is gated
        either way)."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, hd)
        g = self.gate() if self.gate is not None else None  # (1, heads, 1, 1)
        attn = raw = None
        if return_attention or self.impl == "explicit":
            raw = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, N, N)
            attn = raw * g if g is not None else raw
            out = attn @ v  # (B, heads, N, hd)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, hd)
            if g is not None:
                out = out * g
        out = out.transpose(1, 2).reshape(B, N, D)
        if not return_attention:
            return self.proj(out), None
        return self.proj(out), attn if gated_map else raw


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))

    def forward(
        self, x: Tensor, return_attention: bool = False, gated_map: bool = True
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Returns the block's output, the attention map (with ``return_attention``) and the attention branch's
        output ``proj(A V)`` before the residual (B, N, D), which WeakTr's AAF reads."""
        y, attn = self.attn(self.norm1(x), return_attention, gated_map)
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return x, attn, y


@dataclass
class BackboneOutput:
    """What :meth:`GatedViT.forward_features` returns.

    Attributes:
        prefix: final-normed prefix tokens, (B, P, D): class tokens first, then registers.
        patches: final-normed patch tokens, (B, h*w, D), row-major over the (h, w) patch grid.
        grid: (h, w) patch grid.
        attentions: block index (0-based) -> post-softmax attention times the head gate, (B, heads, N, N)
            with N = P + h*w; rows are queries. Pruned heads (eval mode) are all zero.
        num_prefix_tokens: P.
        num_class_tokens: T, the first T prefix tokens (1 for a CLS token, C for class tokens).
        attention_outputs: block index -> the attention branch's output ``proj(A V)`` before the residual,
            (B, N, D), for the blocks of ``attentions`` when asked for (``forward_features(attention_outputs=True)``).
    """

    prefix: Tensor
    patches: Tensor
    grid: tuple[int, int]
    attentions: dict[int, Tensor]
    num_prefix_tokens: int
    num_class_tokens: int = 1
    attention_outputs: dict[int, Tensor] = field(default_factory=dict)

    def patch_grid(self) -> Tensor:
        """Patch tokens as a feature map, (B, D, h, w) (ViT-PCM and segmentation heads)."""
        B, _, D = self.patches.shape
        return self.patches.transpose(1, 2).reshape(B, D, *self.grid)

    def cls_to_patch_attention(self, block: int, cls_index: int = 0) -> Tensor:
        """Attention of class token ``cls_index`` to every patch, (B, heads, h, w), from block ``block``."""
        attn = self.attentions[block]  # (B, heads, N, N)
        row = attn[:, :, cls_index, self.num_prefix_tokens :]  # (B, heads, h*w)
        return row.reshape(*row.shape[:2], *self.grid)

    def class_token_attention(self, block: int) -> Tensor:
        """Attention of every class token to every patch, (B, heads, T, h, w), from block ``block``.

        Columns of other prefix tokens (class tokens, registers) are dropped, so a row does not sum to 1.
        """
        attn = self.attentions[block]  # (B, heads, N, N)
        rows = attn[:, :, : self.num_class_tokens, self.num_prefix_tokens :]  # (B, heads, T, h*w)
        return rows.reshape(*rows.shape[:3], *self.grid)


def interpolate_patch_positions(patches: Tensor, grid_src: tuple[int, int], grid_dst: tuple[int, int]) -> Tensor:
    """Patch position embeddings (1, h0*w0, D) of grid ``grid_src`` resized bicubically to ``grid_dst`` (1, h*w, D).

    How a ViT sees another input size: DeiT/timm checkpoints at another resolution, and multi-scale inference
    (WeakTr, ``weaktr.md``: the patch positions are interpolated, the prefix tokens' positions kept).
    """
    if tuple(grid_src) == tuple(grid_dst):
        return patches
    D = patches.shape[-1]
    grid = patches.reshape(1, *grid_src, D).permute(0, 3, 1, 2)  # (1, D, h0, w0)
    grid = F.interpolate(grid.float(), size=tuple(grid_dst), mode="bicubic", align_corners=False).to(patches.dtype)
    return grid.permute(0, 2, 3, 1).reshape(1, grid_dst[0] * grid_dst[1], D)


class GatedViT(nn.Module):
    """ViT with Hard Concrete head gates; see the module docstring for the contract."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        if cfg.s1_chans and cfg.fusion == "sum":
            self.patch_embed = PatchEmbed(cfg.in_chans - cfg.s1_chans, D, cfg.patch_size)
            self.patch_embed_s1: PatchEmbed | None = PatchEmbed(cfg.s1_chans, D, cfg.patch_size)
        else:
            self.patch_embed = PatchEmbed(cfg.in_chans, D, cfg.patch_size)
            self.patch_embed_s1 = None
        h, w = cfg.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, cfg.num_cls_tokens, D))
        self.reg_token = (
            nn.Parameter(torch.zeros(1, cfg.num_register_tokens, D)) if cfg.num_register_tokens else None
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_prefix_tokens + h * w, D))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm: nn.Module = nn.LayerNorm(D, eps=1e-6) if cfg.final_norm else nn.Identity()
        # "pooled" and "per_class" both hold one weight row per class, (C, D); "flatten" sees all T tokens.
        head_in = D * cfg.num_cls_tokens if cfg.head_type == "flatten" else D
        # "mean" (WeakTr) has no weights: logit c is the mean of class token c's channels.
        self.head: nn.Module = nn.Identity() if cfg.head_type == "mean" else nn.Linear(head_in, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """timm-style init; gates keep their own (:meth:`HardConcreteGate.reset_parameters`)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.reg_token is not None:
            nn.init.trunc_normal_(self.reg_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- properties every method may read -------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        return self.cfg.num_prefix_tokens

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.cfg.grid_size

    @property
    def num_class_tokens(self) -> int:
        return self.cfg.num_cls_tokens

    @property
    def has_class_tokens(self) -> bool:
        return self.cfg.has_class_tokens

    @property
    def gradcam_layer(self) -> nn.Module:
        """Grad-CAM's target: the first LayerNorm of the last block that kept a head (``blocks[-1].norm1`` unless
        pruning emptied the last blocks).

        The last block's own patch outputs never reach a class token, so its *input* is the last place the patches
        feed the logits; a block whose heads were all pruned passes nothing from the patches to the class tokens,
        so the gradient at its input is zero and the target moves to the last block that still attends.
        """
        kept = self.head_mask().any(dim=1)  # (depth,)
        alive = kept.nonzero().flatten().tolist()
        return self.blocks[alive[-1] if alive else -1].norm1

    def head_output_layer(self, block: int) -> nn.Module:
        """The module whose *input* is block ``block``'s gated per-head outputs, (B, N, heads * head_dim).

        Head ``h`` owns channels ``h * head_dim : (h + 1) * head_dim``. Gradient times this input, summed over a
        head's channels and the tokens, is the first-order effect of switching the head off (Michel et al.,
        "Are Sixteen Heads Really Better than One?", NeurIPS 2019): a head's relevance to a class.
        """
        return self.blocks[block % self.cfg.depth].attn.proj

    @property
    def gates(self) -> list[HardConcreteGate]:
        return [b.attn.gate for b in self.blocks if b.attn.gate is not None]

    def set_attention_impl(self, impl: AttentionImpl) -> None:
        """Use fused SDPA ("fused", default) or always the explicit softmax ("explicit") in every block."""
        for b in self.blocks:
            b.attn.impl = impl

    # ---- the contract ---------------------------------------------------------------------------------
    def embed(self, x: Tensor, modality: str | None = None) -> Tensor:
        """Image (B, C, H, W) -> tokens with prefix and position embedding, (B, P + h*w, D).

        ``modality`` embeds one sensor alone through its own patch embedding (the summed multimodal fusion only):
        ``"s2"`` for the first ``in_chans - s1_chans`` channels, ``"s1"`` for the Sentinel-1 ones. Barlow Twins'
        cross-modal views (:mod:`weakseg.tasks.pretraining`) feed S2 and S1 of one tile this way into one
        transformer. None: the whole stacked input, as everywhere else.
        """
        B, C, H, W = x.shape
        expected = self.cfg.in_chans
        if modality is not None:
            if self.patch_embed_s1 is None:
                raise ConfigError(f"modality {modality!r} needs separate S2 and S1 patch embeddings (--multimodal "
                                  "--fusion sum)")
            if modality not in ("s1", "s2"):
                raise ConfigError(f"unknown modality {modality!r}; choose s1 or s2")
            expected = self.cfg.s1_chans if modality == "s1" else self.cfg.in_chans - self.cfg.s1_chans
        if C != expected:
            raise ConfigError(f"model expects {expected} input channels, got {C}")
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ConfigError(f"model input {H}x{W} is not a multiple of the patch size {p} (the model was "
                              f"trained on {self.cfg.img_size[0]}x{self.cfg.img_size[1]})")
        pos = self.pos_embed  # (1, P + h*w, D)
        if (H, W) != self.cfg.img_size:  # another scale (multi-scale inference): resize the patch positions
            P = self.num_prefix_tokens
            pos = torch.cat([pos[:, :P], interpolate_patch_positions(pos[:, P:], self.cfg.grid_size,
                                                                     (H // p, W // p))], dim=1)
        if modality == "s2":
            tokens = self.patch_embed(x)  # (B, h*w, D)
        elif modality == "s1":
            assert self.patch_embed_s1 is not None
            tokens = self.patch_embed_s1(x)  # (B, h*w, D)
        elif self.patch_embed_s1 is not None:
            s1 = self.cfg.s1_chans
            tokens = self.patch_embed(x[:, :-s1]) + self.patch_embed_s1(x[:, -s1:])  # (B, h*w, D)
        else:
            tokens = self.patch_embed(x)  # (B, h*w, D)
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        return torch.cat([*prefix, tokens], dim=1) + pos

    def forward_features(
        self, x: Tensor, attention_blocks: Iterable[int] | None = None, gated_maps: bool = True,
        attention_outputs: bool = False, modality: str | None = None,
    ) -> BackboneOutput:
        """Run the backbone.

        Args:
            x: (B, C, H, W) image.
            attention_blocks: block indices (negative allowed) whose attention maps to return; only these blocks
                take the explicit-softmax path. None or empty: all blocks use fused SDPA.
            gated_maps: return the maps times the head gates (pruned heads all zero; the contract), or, with
                False, before the gates (what TokenMasking-WSSS's released code averaged; its defect 2). The
                forward pass is gated either way.
            attention_outputs: also return those blocks' attention-branch outputs ``proj(A V)`` (WeakTr's AAF).
            modality: one sensor's bands alone (:meth:`embed`); None the whole input.
        """
        wanted = {i % self.cfg.depth for i in (attention_blocks or ())}
        tokens = self.embed(x, modality)
        attentions: dict[int, Tensor] = {}
        branch: dict[int, Tensor] = {}
        for i, blk in enumerate(self.blocks):
            tokens, attn, y = blk(tokens, return_attention=i in wanted, gated_map=gated_maps)
            if attn is not None:
                attentions[i] = attn
                if attention_outputs:
                    branch[i] = y
        tokens = self.norm(tokens)
        P = self.num_prefix_tokens
        grid = (x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size)  # the input's own grid
        return BackboneOutput(tokens[:, :P], tokens[:, P:], grid, attentions, P, self.cfg.num_cls_tokens, branch)

    def forward_head(
        self, out: BackboneOutput, pre_logits: bool = False, drop_class_tokens: Tensor | None = None
    ) -> Tensor:
        """Multi-label logits (B, classes), or with ``pre_logits`` what the head reads.

        Args:
            out: the backbone's output.
            pre_logits: return the head's input instead: the pooled embedding (B, D) for ``"pooled"``, the class
                token outputs (B, T, D) for ``"per_class"`` and ``"flatten"``.
            drop_class_tokens: optional (B, T) bool; True zeroes that class token's output before the head.
                Class-specific token masking (Hanna & Borth, ICCV 2025) drops tokens of absent classes at random
                during training; the draw is the caller's (:class:`weakseg.tasks.classification.ClassificationTask`).
        """
        tokens = out.prefix[:, : self.cfg.num_cls_tokens]  # (B, T, D)
        if drop_class_tokens is not None:
            tokens = tokens.masked_fill(drop_class_tokens[..., None].to(tokens.device), 0.0)
        head_type = self.cfg.head_type
        if head_type == "pooled":
            pooled = tokens.mean(dim=1)  # (B, D)
            return pooled if pre_logits else self.head(pooled)
        if pre_logits:
            return tokens
        if head_type == "mean":
            return tokens.mean(dim=-1)  # (B, C): WeakTr's class-token logits
        if head_type == "per_class":
            return (tokens * self.head.weight).sum(dim=-1) + self.head.bias  # (B, C): token c -> logit c
        return self.head(tokens.flatten(1))  # (B, T*D) -> (B, C)

    def forward(self, x: Tensor) -> Tensor:
        """Multi-label logits (B, num_classes); apply a sigmoid for probabilities."""
        return self.forward_head(self.forward_features(x))

    # ---- extra training terms of an architecture (WeakTr overrides) ----------------------------------
    def auxiliary_blocks(self) -> list[int]:
        """Blocks whose attention maps and branch outputs :meth:`auxiliary_logits` reads in training (none)."""
        return []

    def auxiliary_logits(self, out: BackboneOutput) -> dict[str, Tensor]:
        """Extra (B, C) logits trained with the same multi-label loss as the head's, by name (none here)."""
        return {}

    # ---- gates ---------------------------------------------------------------------------------------
    def head_mask(self) -> Tensor:
        """Deterministic head state, bool (depth, heads): True = kept (log_alpha > 0, or the model is ungated)."""
        if not self.cfg.gated:
            return torch.ones(self.cfg.depth, self.cfg.num_heads, dtype=torch.bool)
        return torch.stack([g.is_open().cpu() for g in self.gates])

    def pruned_heads_per_layer(self) -> list[int]:
        return (~self.head_mask()).sum(dim=1).tolist()

    def pruned_fraction(self) -> float:
        mask = self.head_mask()
        return float((~mask).sum()) / mask.numel()

    def l0_penalty(self, normalize: bool = False) -> Tensor:
        return l0_penalty(self.gates, normalize=normalize)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay: gates (defect 6 of the original), embeddings, norms, biases."""
        names = set()
        for name, p in self.named_parameters():
            if p.ndim <= 1 or name.endswith("log_alpha") or name in ("pos_embed", "cls_token", "reg_token"):
                names.add(name)
        return names


def build_vit(**kwargs: object) -> GatedViT:
    """Build a :class:`GatedViT` from keyword arguments of :class:`ViTConfig`."""
    return GatedViT(ViTConfig(**kwargs))  # type: ignore[arg-type]
