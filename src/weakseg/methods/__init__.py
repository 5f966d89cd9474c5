"""WSSS pseudomask methods, one module each, registered by name; all reach the model only through the backbone
contract (:mod:`weakseg.models.vit`) and share the mask rules of :mod:`weakseg.masks`.

- ``attention`` (:mod:`~weakseg.methods.attention_clustering`): the sparse ViT paper's clustered attention of the
  kept heads, clusters given classes by a label-free rule (``--assign``; the paper's rank rule is one of them).
- ``class_attention`` (:mod:`~weakseg.methods.class_attention`): class token c's attention is the map of class c
  (Hanna & Borth, ICCV 2025); needs a classifier trained with ``--arch class_tokens``.
- ``weaktr`` (:mod:`~weakseg.methods.weaktr`): WeakTr's fine CAMs (Zhu et al., IEEE TIP); needs a classifier
  trained with ``--arch weaktr``.
- ``pcm`` (:mod:`~weakseg.methods.pcm`): ViT-PCM's per-patch class probabilities masked to the image's labels
  (Rossetti et al., ECCV 2022); needs a classifier trained with ``--arch pcm``.
- ``gradcam`` (:mod:`~weakseg.methods.gradcam`): Grad-CAM on the ViT (the baseline).
- ``top_class`` (:mod:`~weakseg.methods.top_class`): the floor, every pixel = the top predicted class.

The contract of a method is :class:`~weakseg.methods.base.PseudomaskMethod`.
"""

from __future__ import annotations

from typing import Any

from weakseg.errors import ConfigError
from weakseg.methods.attention_clustering import (
    AttentionClustering,
    attention_pseudomasks,
    head_maps_from_model,
    relabel_regions,
)
from weakseg.methods.base import ClassMapMethod, PseudomaskMethod
from weakseg.methods.class_attention import ClassAttention, class_attention_maps
from weakseg.methods.gradcam import GradCAM, gradcam_maps, gradcam_pseudomasks
from weakseg.methods.pcm import PatchClassMapping, pcm_class_maps
from weakseg.methods.top_class import TopClass, top_class_pseudomasks
from weakseg.methods.weaktr import WeakTrCAM, weaktr_cams

#: Every method, by its ``--method`` name.
METHODS: dict[str, type[PseudomaskMethod]] = {
    m.name: m for m in (AttentionClustering, ClassAttention, GradCAM, PatchClassMapping, TopClass, WeakTrCAM)
}


def get_method(name: str, **options: Any) -> PseudomaskMethod:
    """An instance of the method called ``name`` with ``options`` (its ``Options`` fields)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r} (--method); choose from {sorted(METHODS)}")
    cls = METHODS[name]
    try:
        return cls(**options)
    except TypeError as e:
        raise ConfigError(f"--method {name}: {e}") from e


__all__ = [
    "METHODS",
    "AttentionClustering",
    "ClassAttention",
    "ClassMapMethod",
    "GradCAM",
    "PatchClassMapping",
    "PseudomaskMethod",
    "TopClass",
    "WeakTrCAM",
    "attention_pseudomasks",
    "class_attention_maps",
    "get_method",
    "gradcam_maps",
    "gradcam_pseudomasks",
    "head_maps_from_model",
    "pcm_class_maps",
    "relabel_regions",
    "top_class_pseudomasks",
    "weaktr_cams",
]
