"""Classifier architectures: which prefix tokens and head a :class:`~weakseg.models.vit.GatedViT` gets, and the
training terms that go with them. ``weakseg train --arch NAME`` picks one; every pseudomask method says which
architectures it works on (:mod:`weakseg.methods`).

- ``vit``: one CLS token and a linear head on it, the classifier of the sparse multimodal ViT (Hanna, Mommert and
  Borth, CVPRW 2023). Attention clustering and Grad-CAM read it.
- ``class_tokens``: one class token per class plus one register token and class c's logit from token c (Hanna
  and Borth, "Know Your Attention Maps: Class-specific Token Masking for Weakly Supervised Semantic Segmentation",
  ICCV 2025, ``token_masking.md``); optional class-specific token masking (``--token_mask_rate``: absent classes'
  token outputs zeroed at random in training). Class-attention pseudomasks read token c's attention as the map of
  class c.

**Head of ``class_tokens`` and token masking.** The released TokenMasking-WSSS code flattens all C class-token
outputs into one ``Linear(C * D, C)``, so every logit sees every token and only the random masking of absent
classes' tokens ties token c to class c; there masking is on (rate 0.5, as the paper). weakseg's default is the
``per_class`` head (``logit_c = <w_c, z_c> + b_c``): the tie is built in, token c's attention is by construction
what class c's score is computed from, and the head has C * D weights instead of C^2 * D. With this head masking
an absent class's token only leaves ``logit_c = b_c``, i.e. it drops that class's negative example for the token,
and on the built-in data masking 0.5 lowered the holdout mIoU of class-attention pseudomasks by 2.9 ± 1.8 (paired
over 3 seeds, pruned and unpruned; README "How the defaults were chosen"), so the per-class head trains without
masking by default.
``--class_token_head flatten`` gives the released head with masking at 0.5; ``--token_mask_rate`` sets any rate.

- ``weaktr``: WeakTr's phase-1 classifier (Zhu et al., IEEE TIP; ``weaktr.md``; :mod:`weakseg.models.weaktr`):
  one class token per class, logit c = the mean of token c's channels, no final norm, plus a conv CAM head and
  Adaptive Attention Fusion (``--aaf v2|v1|random``) trained by two more multi-label losses. ``--method weaktr``
  reads its fine CAMs; class attention and Grad-CAM read it too (it has class tokens).
- ``pcm``: ViT-PCM (Rossetti et al., ECCV 2022; ``vit_pcm.md``; :mod:`weakseg.models.pcm`): one CLS token that no
  head reads; every patch token is classified with a softmax over the classes (after an optional H-V BiLSTM,
  ``--pcm_head``) and the image logits are the global max over the patches. ``--method pcm`` reads the per-patch
  probabilities; Grad-CAM reads it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from weakseg.errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    """How an architecture configures the backbone and its training.

    Attributes:
        name: the ``--arch`` value.
        summary: one line for ``--help`` and error messages.
        class_tokens: one class token per class (else one CLS token).
        head_type: default :attr:`~weakseg.models.vit.ViTConfig.head_type`.
        num_register_tokens: default register tokens.
        token_mask_rate: default probability of masking an absent class's token output in training.
        final_norm: default of the LayerNorm before the heads.
        aaf: default WeakTr AAF variant (None: no WeakTr heads).
        head_types: the heads ``--class_token_head`` may choose (the first is the default).
        patch_classifier: default ViT-PCM patch classifier (None: no PCM head).
    """

    name: str
    summary: str
    class_tokens: bool
    head_type: str
    num_register_tokens: int
    token_mask_rate: dict[str, float]
    final_norm: bool = True
    aaf: str | None = None
    head_types: tuple[str, ...] = ()
    patch_classifier: str | None = None

    def default_token_mask_rate(self, head_type: str | None = None) -> float:
        """The masking rate this architecture trains with for ``head_type`` (default: its own head)."""
        return self.token_mask_rate.get(head_type or self.head_type, 0.0)

    def model_fields(
        self, num_classes: int, head_type: str | None = None, num_register_tokens: int | None = None
    ) -> dict[str, Any]:
        """The :class:`~weakseg.models.vit.ViTConfig` fields this architecture sets."""
        head = head_type or self.head_type
        if not self.class_tokens and head != "pooled":
            raise ConfigError(
                f"--class_token_head {head} needs --arch class_tokens (--arch {self.name} has one CLS token)"
            )
        if head_type is not None and self.head_types and head not in self.head_types:
            raise ConfigError(f"--class_token_head {head} is not a head of --arch {self.name}; choose from "
                              f"{list(self.head_types)}")
        fields: dict[str, Any] = {
            "num_cls_tokens": num_classes if self.class_tokens else 1,
            "head_type": head,
            "num_register_tokens": self.num_register_tokens if num_register_tokens is None else num_register_tokens,
        }
        if self.aaf is not None:
            fields["aaf"] = self.aaf
        if self.patch_classifier is not None:
            fields["patch_classifier"] = self.patch_classifier
        return fields


ARCHITECTURES: dict[str, Architecture] = {
    "vit": Architecture(
        name="vit",
        summary="one CLS token, linear head (sparse multimodal ViT, Hanna et al. CVPRW 2023)",
        class_tokens=False, head_type="pooled", num_register_tokens=0, token_mask_rate={},
    ),
    "class_tokens": Architecture(
        name="class_tokens",
        summary="one class token per class + 1 register, logit c from token c; class-specific token masking "
                "optional (Hanna & Borth, ICCV 2025)",
        class_tokens=True, head_type="per_class", num_register_tokens=1,
        token_mask_rate={"per_class": 0.0, "flatten": 0.5}, head_types=("per_class", "flatten"),
    ),
    "weaktr": Architecture(
        name="weaktr",
        summary="C class tokens, conv CAM head and Adaptive Attention Fusion, three multi-label losses "
                "(WeakTr, Zhu et al., IEEE TIP)",
        class_tokens=True, head_type="mean", num_register_tokens=0, token_mask_rate={},
        final_norm=False, aaf="v2", head_types=("mean", "per_class"),
    ),
    "pcm": Architecture(
        name="pcm",
        summary="patch-class mapping: softmax per patch (after an optional H-V BiLSTM), global max pooling, "
                "equivariance loss (ViT-PCM, Rossetti et al., ECCV 2022)",
        class_tokens=False, head_type="pooled", num_register_tokens=0, token_mask_rate={},
        patch_classifier="linear",
    ),
}


def get_architecture(name: str) -> Architecture:
    """The architecture called ``name``; a :class:`ConfigError` lists the valid names otherwise."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r} (--arch); choose from {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def architecture_of(model_config: Any) -> str:
    """The architecture name a :class:`~weakseg.models.vit.ViTConfig` corresponds to."""
    if getattr(model_config, "aaf", None) is not None:
        return "weaktr"
    if getattr(model_config, "patch_classifier", None) is not None:
        return "pcm"
    return "class_tokens" if model_config.has_class_tokens else "vit"


def build_classifier(cfg: Any) -> Any:
    """The classifier a :class:`~weakseg.models.vit.ViTConfig` describes: :class:`~weakseg.models.weaktr.WeakTrViT`
    when it names an AAF variant, :class:`~weakseg.models.pcm.PCMViT` when it names a patch classifier, else the
    plain :class:`~weakseg.models.vit.GatedViT`."""
    from weakseg.models.pcm import PCMViT
    from weakseg.models.vit import GatedViT
    from weakseg.models.weaktr import WeakTrViT

    if cfg.aaf is not None:
        return WeakTrViT(cfg)
    if cfg.patch_classifier is not None:
        return PCMViT(cfg)
    return GatedViT(cfg)
