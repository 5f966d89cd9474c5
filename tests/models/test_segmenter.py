"""Segmenter (WeakTr's phase-2 network): shapes, padding, gradients, timm names, sliding windows, views."""

from __future__ import annotations

import pytest
import torch

from weakseg.models.pretrained import load_pretrained
from weakseg.models.segmenter import Segmenter, sliding_window_logits, window_starts
from weakseg.models.vit import build_vit
from weakseg.tasks.segmentation import SegmentationTask


def tiny(**kw: object) -> Segmenter:
    torch.manual_seed(0)
    return Segmenter(in_chans=3, num_classes=4, img_size=(24, 24), patch_size=8, embed_dim=16, depth=2,
                     num_heads=4, **kw)


def test_logits_have_the_input_size_for_sizes_that_are_not_patch_multiples() -> None:
    model = tiny().eval()
    for size in ((24, 24), (21, 30), (8, 8)):
        assert model(torch.randn(2, 3, *size)).shape == (2, 4, *size)


def test_masks_are_layer_normed_cosine_similarities() -> None:
    model = tiny().eval()
    out = model.encoder.forward_features(torch.randn(1, 3, 24, 24))
    masks = model.decoder(out.patches, out.grid)  # (1, K, 3, 3)
    # LayerNorm over the class dimension (weight 1, bias 0 at init): zero mean over the classes
    torch.testing.assert_close(masks.mean(dim=1), torch.zeros(1, 3, 3), atol=1e-5, rtol=0)


def test_gradients_reach_encoder_and_decoder() -> None:
    model = tiny().train()
    model(torch.randn(2, 3, 24, 24)).logsumexp(dim=1).mean().backward()
    for name in ("encoder.patch_embed.proj.weight", "encoder.blocks.1.attn.qkv.weight", "decoder.cls_emb",
                 "decoder.proj_patch", "decoder.proj_classes", "decoder.blocks.0.mlp.fc1.weight"):
        param = dict(model.named_parameters())[name]
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_encoder_names_are_timm_names_and_a_checkpoint_loads(tmp_path) -> None:
    model = tiny()
    names = set(model.state_dict())
    assert {"encoder.blocks.0.attn.qkv.weight", "encoder.pos_embed", "encoder.cls_token", "encoder.norm.weight"} <= names
    assert not any(k.startswith("encoder.head.") for k in names)
    source = build_vit(img_size=(16, 16), patch_size=8, in_chans=3, embed_dim=16, depth=2, num_heads=4, gated=False,
                       mlp_ratio=4.0)  # the encoder's (DeiT's) MLP width: every tensor loads
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    load_pretrained(model.encoder, tmp_path / "vit.pth")
    torch.testing.assert_close(model.encoder.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)


def test_sliding_window_is_one_pass_when_the_window_covers_the_image() -> None:
    model = tiny().eval()
    x = torch.randn(1, 3, 24, 24)
    torch.testing.assert_close(sliding_window_logits(model, x, 32, 16), model(x))
    torch.testing.assert_close(sliding_window_logits(model, x, None, None), model(x))


def test_sliding_window_averages_overlapping_crops_by_hand() -> None:
    model = tiny().eval()
    x = torch.randn(1, 3, 16, 24)
    assert window_starts(24, 16, 8) == [0, 8] and window_starts(16, 16, 8) == [0] and window_starts(25, 16, 8) == [0, 8, 9]
    got = sliding_window_logits(model, x, 16, 8)
    left, right = model(x[..., :, 0:16]), model(x[..., :, 8:24])
    expected = torch.zeros(1, 4, 16, 24)
    expected[..., :8] = left[..., :8]
    expected[..., 8:16] = (left[..., 8:] + right[..., :8]) / 2
    expected[..., 16:] = right[..., 8:]
    torch.testing.assert_close(got, expected)


def test_prediction_views_average_softmax_and_undo_the_flip() -> None:
    torch.manual_seed(0)
    task = SegmentationTask(in_chans=3, num_classes=4, model="segmenter", tile_size=[24, 24],
                            segmenter={"patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 4},
                            flip=True).eval()
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        expected = (task(x).softmax(1) + task(x.flip(-1)).flip(-1).softmax(1)) / 2
        torch.testing.assert_close(task.predict_probabilities(x), expected)
        out = task.predict_step({"image": x, "id": ["a"]}, 0)
    assert out["pred"].shape == (1, 24, 24) and out["prob"].max() <= 1


def test_segmenter_optimizer_scales_the_encoder_learning_rate() -> None:
    task = SegmentationTask(in_chans=3, num_classes=4, model="segmenter", tile_size=[24, 24], lr=0.01,
                            optimizer="sgd", encoder_lr_scale=0.1, lr_schedule="constant",
                            segmenter={"patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 4})
    opt = task.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]
    encoder = {id(p) for p in task.model.encoder.parameters()}
    for group in opt.param_groups:
        in_encoder = {id(p) in encoder for p in group["params"]}
        assert len(in_encoder) == 1
        assert group["lr"] == (0.001 if in_encoder.pop() else 0.01) and group["weight_decay"] == 0.0


def test_poly_schedule_is_weaktrs() -> None:
    from types import SimpleNamespace

    task = SegmentationTask(in_chans=3, num_classes=4, lr=0.01, lr_schedule="poly", optimizer="sgd")
    task._trainer = SimpleNamespace(estimated_stepping_batches=10)  # what configure_optimizers reads
    sched = task.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(11):
        lrs.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    expected = [(0.01 - 1e-5) * (1 - t / 10) ** 0.9 + 1e-5 for t in range(11)]
    assert lrs == pytest.approx(expected, rel=1e-6)


# ---- the encoder from a weakseg classifier's backbone (--encoder_checkpoint) ------------------------------------
def gated_classifier(**kw: object):
    torch.manual_seed(1)
    backbone = build_vit(img_size=(16, 16), patch_size=8, in_chans=3, embed_dim=16, depth=2, num_heads=4,
                         num_classes=4, mlp_ratio=2.0, **kw)
    with torch.no_grad():  # heads 1 and 3 of block 0 and head 0 of block 1 pruned, the rest open
        backbone.blocks[0].attn.gate.log_alpha.copy_(torch.tensor([3.0, -3.0, 3.0, -3.0]).view(1, 4, 1, 1))
        backbone.blocks[1].attn.gate.log_alpha.copy_(torch.tensor([-3.0, 3.0, 3.0, 3.0]).view(1, 4, 1, 1))
        for p in backbone.parameters():  # non-trivial norms and biases too
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return backbone.eval()


def test_classifier_backbone_gives_the_encoder_its_pruned_features() -> None:
    from weakseg.models.segmenter import load_classifier_backbone

    backbone = gated_classifier()
    model = Segmenter(in_chans=3, num_classes=4, img_size=(16, 16), patch_size=8, embed_dim=16, depth=2,
                      num_heads=4, mlp_ratio=2.0).eval()
    loaded = load_classifier_backbone(model.encoder, backbone)
    assert "blocks.0.attn.qkv.weight" in loaded["copied"] and "pos_embed" in loaded["copied"]
    assert any("log_alpha" in k for k in loaded["skipped"]) and "head.weight" in loaded["skipped"]
    proj = model.encoder.blocks[0].attn.proj.weight
    assert (proj[:, 4:8] == 0).all() and (proj[:, 12:16] == 0).all()  # the closed heads' columns (head_dim 4)
    torch.testing.assert_close(proj[:, 0:4], backbone.blocks[0].attn.proj.weight[:, 0:4])
    # one-CLS gated ViT, tiles of its size: the ungated encoder computes exactly the classifier's eval features
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.forward_features(x).patches, backbone.forward_features(x).patches)
    other = Segmenter(in_chans=3, num_classes=4, img_size=(24, 24), patch_size=8, embed_dim=16, depth=2,
                      num_heads=4, mlp_ratio=2.0)
    load_classifier_backbone(other.encoder, backbone)  # another tile size: the patch positions are resized
    assert other.encoder.pos_embed.shape == (1, 1 + 9, 16) and other(x).shape == (2, 4, 16, 16)


def test_class_token_backbone_starts_the_cls_token_at_their_mean_and_shapes_must_match() -> None:
    from weakseg.errors import ConfigError
    from weakseg.models.segmenter import load_classifier_backbone

    backbone = gated_classifier(num_cls_tokens=4, head_type="per_class", num_register_tokens=1)
    model = Segmenter(in_chans=3, num_classes=4, img_size=(16, 16), patch_size=8, embed_dim=16, depth=2,
                      num_heads=4, mlp_ratio=2.0)
    load_classifier_backbone(model.encoder, backbone)
    torch.testing.assert_close(model.encoder.cls_token, backbone.cls_token.mean(dim=1, keepdim=True))
    torch.testing.assert_close(model.encoder.pos_embed[:, 0], backbone.pos_embed[:, :4].mean(dim=1))
    torch.testing.assert_close(model.encoder.pos_embed[:, 1:], backbone.pos_embed[:, 5:])  # registers dropped
    wide = Segmenter(in_chans=3, num_classes=4, img_size=(16, 16), patch_size=8, embed_dim=16, depth=2,
                     num_heads=4)  # DeiT's MLP ratio 4, the classifier's is 2
    with pytest.raises(ConfigError, match="mlp_ratio 2.0 but the encoder has 4.0"):
        load_classifier_backbone(wide.encoder, backbone)


def test_model_registry_and_sliding_window_settings_are_checked() -> None:
    from weakseg.errors import ConfigError
    from weakseg.models.segmenter import Segmenter as SegmenterClass
    from weakseg.models.unet import UNet
    from weakseg.tasks.segmentation import SEGMENTATION_MODELS, build_segmentation_model

    assert list(SEGMENTATION_MODELS) == ["unet", "segmenter", "vit_linear", "setr_naive", "setr_pup"]
    assert isinstance(build_segmentation_model("unet", 3, 4, [4, 8], [24, 24], None), UNet)
    seg = build_segmentation_model("segmenter", 3, 4, [4, 8], [24, 24], {"embed_dim": 16, "num_heads": 4})
    assert isinstance(seg, SegmenterClass)
    with pytest.raises(ConfigError, match="unknown segmentation model 'fcn'"):
        build_segmentation_model("fcn", 3, 4, [4, 8], [24, 24], None)
    with pytest.raises(ConfigError, match="stride 16 is larger than the window 8"):
        SegmentationTask(in_chans=3, num_classes=4, window=8, stride=16)
