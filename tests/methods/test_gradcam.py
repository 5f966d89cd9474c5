"""Tests of Grad-CAM on the gated ViT and of the Grad-CAM pseudomasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weakseg.methods.gradcam import gradcam_maps, gradcam_pseudomasks
from weakseg.models.vit import GatedViT, build_vit

CLASS_SETS = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)


@pytest.fixture(params=[0, 2], ids=["cls-only", "registers"])
def model(request: pytest.FixtureRequest) -> GatedViT:
    torch.manual_seed(0)
    vit = build_vit(
        img_size=(16, 24), patch_size=8, in_chans=3, embed_dim=16, depth=2, num_heads=2, num_classes=4,
        num_register_tokens=request.param,
    )
    with torch.no_grad():  # a larger head makes the CAMs clearly non-zero
        vit.head.weight.normal_(0, 1.0)
    return vit


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 16, 24, generator=torch.Generator().manual_seed(1))


def reference_gradcam(model: GatedViT, image: torch.Tensor, c: int) -> torch.Tensor:
    """Textbook Grad-CAM of one image and class: retain_grad on the hooked output, backward of the logit."""
    store = {}

    def hook(_m, _i, output):
        output.retain_grad()
        store["a"] = output

    handle = model.gradcam_layer.register_forward_hook(hook)
    model.eval()
    logits = model(image[None])
    logits[0, c].backward()
    handle.remove()
    model.zero_grad()
    p = model.num_prefix_tokens
    a, g = store["a"][0, p:].detach(), store["a"].grad[0, p:]  # (h*w, D)
    return torch.relu(a @ g.mean(dim=0)).reshape(model.grid_size)


def test_shapes_non_negative_and_only_requested_classes(model: GatedViT, images: torch.Tensor) -> None:
    cams = gradcam_maps(model, images, CLASS_SETS)
    assert cams.shape == (3, 4, 2, 3)  # non-square grid (h=2, w=3)
    assert (cams >= 0).all()
    assert (cams[~CLASS_SETS] == 0).all()
    assert (cams[CLASS_SETS].flatten(1).amax(dim=1) > 0).all()  # gradient reached every requested CAM


def test_batched_backward_per_class_equals_per_image_gradcam(model: GatedViT, images: torch.Tensor) -> None:
    cams = gradcam_maps(model, images, CLASS_SETS)
    for b in range(3):
        single = gradcam_maps(model, images[b : b + 1], CLASS_SETS[b : b + 1])
        torch.testing.assert_close(single[0], cams[b], rtol=1e-5, atol=1e-7)
        for c in CLASS_SETS[b].nonzero().flatten().tolist():
            expected = reference_gradcam(model, images[b], c)
            torch.testing.assert_close(cams[b, c], expected, rtol=1e-5, atol=1e-7)


def test_works_under_inference_mode_and_leaves_the_model_alone(model: GatedViT, images: torch.Tensor) -> None:
    expected = gradcam_maps(model, images, CLASS_SETS)
    model.train()
    with torch.inference_mode():
        cams = gradcam_maps(model, images, CLASS_SETS)
    torch.testing.assert_close(cams, expected)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="class_sets"):
        gradcam_maps(model, images, CLASS_SETS[:2])


# ---- pseudomasks from CAMs ---------------------------------------------------------------------------------
def probs_for(*labels: int, c: int = 3) -> torch.Tensor:
    p = torch.full((1, c), 0.2)
    p[0, list(labels)] = torch.linspace(0.9, 0.6, len(labels))
    return p


def test_argmax_over_max_normalised_label_cams() -> None:
    cams = torch.zeros(1, 3, 2, 4)
    cams[0, 0] = torch.tensor([10.0, 10.0, 2.0, 0.0])  # raw values dominate, but only relative to its own max
    cams[0, 2] = torch.tensor([0.0, 0.1, 0.5, 0.5])
    cams[0, 1] = 100.0  # not a label: ignored
    result = gradcam_pseudomasks(cams, probs_for(0, 2), probs_for(0, 2) > 0.5, (2, 4))
    np.testing.assert_array_equal(result.masks[0], [[0, 0, 2, 2]] * 2)
    assert result.status == ["ok"] and result.reason == ["cam_argmax"]


def test_pixels_without_any_cam_take_the_nearest_class_and_output_can_be_non_square() -> None:
    cams = torch.zeros(1, 3, 2, 4)
    cams[0, 0, :, 0] = 1.0
    cams[0, 2, :, 3] = 1.0
    result = gradcam_pseudomasks(cams, probs_for(0, 2), probs_for(0, 2) > 0.5, (2, 4))
    np.testing.assert_array_equal(result.masks[0], [[0, 0, 2, 2]] * 2)
    wide = gradcam_pseudomasks(cams, probs_for(0, 2), probs_for(0, 2) > 0.5, (6, 20))
    assert wide.masks.shape == (1, 6, 20)
    assert (wide.masks[0, :, :8] == 0).all() and (wide.masks[0, :, 12:] == 2).all()


def test_failure_cases_have_defined_masks_and_reasons() -> None:
    cams = torch.zeros(4, 3, 2, 2)
    cams[2, 0] = 1.0  # label 1's CAM is empty
    probs = torch.cat([probs_for(), probs_for(1), probs_for(0, 1), probs_for(2, 0)])
    probs[0, 2] = 0.4  # no label: top class 2
    result = gradcam_pseudomasks(cams, probs, probs > 0.5, (2, 2))
    np.testing.assert_array_equal(result.masks[:, 0, 0], [2, 1, 0, 2])
    assert all((m == m[0, 0]).all() for m in result.masks)
    assert result.status == ["fallback", "ok", "ok", "fallback"]
    assert result.reason == [
        "no_label_above_threshold",
        "single_label",
        "cam_argmax;empty_cam:1",
        "cam_argmax;empty_cam:0;empty_cam:2;nothing_painted",
    ]
    np.testing.assert_array_equal(np.flatnonzero(result.used_labels[0]), [2])
