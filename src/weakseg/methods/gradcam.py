"""Grad-CAM pseudomasks from the gated ViT: the baseline of the sparse ViT paper.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization", ICCV
2017, applied to a ViT as compared against in Hanna, Mommert and Borth, "Sparse Multimodal Vision Transformer
for Weakly Supervised Semantic Segmentation", CVPRW 2023. The paper publishes no Grad-CAM details, so the
design below is the project default (``sparse_vit.md`` section 4):

- Target activations ``A``: the output of the last block's first LayerNorm (:attr:`GatedViT.gradcam_layer`),
  patch tokens only (the class/register prefix tokens are dropped). The last block's own patch outputs never
  reach the CLS logit, so their gradient would be zero; its *input* tokens reach it through the CLS query's
  attention.
- Score: the class **logit** (pre-sigmoid: the sigmoid saturates and would shrink the gradients of confident
  classes). Weights ``w_c,d`` = mean over patches of ``d logit_c / d A_d``; ``CAM_c = ReLU(sum_d w_c,d A_d)``.
- Batched: eval-mode images are independent (LayerNorm is per token, gates are deterministic, no batch
  statistics), so ``d (sum_b logit_b,c) / d A_b = d logit_b,c / d A_b``. One backward per class over the whole
  batch replaces one per image and class.
- Masks: CAMs are upsampled bilinearly, max-normalised per class, and each pixel takes the arg-max over the
  image's labels; pixels where every label's CAM is 0 take the nearest labelled pixel's class (the shared rule
  of :mod:`weakseg.masks.rules`; n = 0 and n = 1 labels: :func:`weakseg.masks.result.label_set_rules`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from weakseg.masks.result import PseudomaskResult
from weakseg.masks.rules import class_maps_to_masks
from weakseg.methods.base import ClassMapMethod
from weakseg.models.vit import GatedViT

REASON_CAM = "cam_argmax"
#: Followed by ``:<class id>``: that label's CAM was zero everywhere, so the class got no pixel.
REASON_EMPTY_CAM = "empty_cam"


def gradcam_maps(model: GatedViT, images: Tensor, class_sets: Tensor) -> Tensor:
    """Grad-CAM of the requested classes of every image, on the patch grid.

    The model runs in eval mode (restored afterwards). A forward hook on :attr:`GatedViT.gradcam_layer`
    replaces its output by a detached copy that requires grad, so ``torch.autograd.grad`` returns exactly the
    gradient with respect to these activations and the backward pass stops there (nothing earlier is
    differentiated and no parameter's ``.grad`` is touched). Works under
    ``torch.no_grad``/``torch.inference_mode`` callers (the Lightning predict loop) because it re-enables
    autograd locally.

    Args:
        model: the classifier.
        images: (B, C_in, H, W) model inputs.
        class_sets: (B, C) bool, the classes to explain per image (usually the label sets).

    Returns:
        (B, C, h, w) float32 non-negative CAMs; classes outside an image's set are all zero.
    """
    if class_sets.ndim != 2 or class_sets.shape[0] != images.shape[0] or class_sets.dtype != torch.bool:
        raise ValueError(
            f"class_sets must be a (B, C) bool tensor for {images.shape[0]} images, "
            f"got {tuple(class_sets.shape)} {class_sets.dtype}"
        )
    captured: dict[str, Tensor] = {}

    def capture(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        activations = output.detach().requires_grad_(True)
        captured["activations"] = activations
        return activations

    was_training = model.training
    model.eval()
    handle = model.gradcam_layer.register_forward_hook(capture)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = images.clone() if images.is_inference() else images
            out = model.forward_features(x)
            logits = model.forward_head(out)  # (B, C)
            activations = captured["activations"]  # (B, P + h*w, D)
            prefix = model.num_prefix_tokens
            patches = activations[:, prefix:].detach()  # (B, h*w, D)
            B, C = logits.shape
            if class_sets.shape[1] != C:
                raise ValueError(f"class_sets has {class_sets.shape[1]} classes but the model has {C}")
            class_sets = class_sets.to(logits.device)
            cams = torch.zeros(B, C, patches.shape[1], device=logits.device)  # (B, C, h*w)
            wanted = class_sets.any(dim=0).nonzero().flatten().tolist()
            for i, c in enumerate(wanted):
                selected = class_sets[:, c]  # (B,)
                score = logits[selected, c].sum()
                (grad,) = torch.autograd.grad(score, activations, retain_graph=i < len(wanted) - 1)
                weights = grad[:, prefix:].mean(dim=1)  # (B, D)
                cam = torch.relu(torch.einsum("bnd,bd->bn", patches, weights))  # (B, h*w)
                cams[:, c] = torch.where(selected[:, None], cam, 0.0)
    finally:
        handle.remove()
        model.train(was_training)
    return cams.reshape(B, C, *out.grid).detach()


def gradcam_pseudomasks(
    cams: Tensor, probs: Tensor, label_sets: Tensor, out_size: tuple[int, int]
) -> PseudomaskResult:
    """Pseudomasks from Grad-CAMs: per pixel the arg-max of the max-normalised CAMs over the image's labels.

    The shared arg-max rule of :mod:`weakseg.masks.rules` with max normalisation: n = 0 and n = 1 labels as
    every method; a label whose CAM is zero everywhere gets no pixel (``empty_cam:<class>``); pixels where all
    labels' CAMs are 0 take the nearest labelled pixel's class; if every CAM is zero, the most probable label
    everywhere (``fallback``, ``nothing_painted``). Confidence = margin between the best and second-best label.

    Args:
        cams: (B, C, h, w) non-negative CAMs (:func:`gradcam_maps`).
        probs: (B, C) class probabilities (fallbacks).
        label_sets: (B, C) bool labels, predicted or oracle.
        out_size: (H, W) of the masks.
    """
    return class_maps_to_masks(cams, probs, label_sets, out_size, rule="argmax", normalize="max",
                               multi_reason=REASON_CAM, empty_reason=REASON_EMPTY_CAM)


class GradCAM(ClassMapMethod):
    """Grad-CAM on the classifier's last block (module docstring); the baseline of every comparison."""

    name = "gradcam"
    summary = "Grad-CAM of each label on the last block's input tokens (the baseline)"
    needs_grad = True
    multi_reason = REASON_CAM
    empty_reason = REASON_EMPTY_CAM

    def class_maps(self, model: GatedViT, images: Tensor, label_sets: Tensor) -> Tensor:
        return gradcam_maps(model, images, label_sets)
