"""ViT-PCM's classifier: softmax per patch, global max pooling, the H-V BiLSTM grid, gradients, L2 and loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weakseg.errors import ConfigError
from weakseg.models.architectures import architecture_of, build_classifier, get_architecture
from weakseg.models.pcm import HVBiLSTM, PCMViT
from weakseg.models.vit import ViTConfig

C, D = 4, 16


def tiny_pcm(head: str = "bilstm", size: tuple[int, int] = (16, 24), **kw: object) -> PCMViT:
    torch.manual_seed(0)
    fields = {**get_architecture("pcm").model_fields(C), "patch_classifier": head}
    cfg = ViTConfig(img_size=size, patch_size=4, in_chans=3, embed_dim=D, depth=2, num_heads=4,
                    num_classes=C, gated=False, **{**fields, **kw})
    model = build_classifier(cfg)
    assert isinstance(model, PCMViT)
    return model


def test_architecture_names_and_state_dict() -> None:
    model = tiny_pcm()
    assert architecture_of(model.cfg) == "pcm"
    names = set(model.state_dict())
    assert {"pcm_head.weight", "bilstm.horizontal.weight_ih_l0", "bilstm.vertical.weight_hh_l0_reverse",
            "cls_token", "pos_embed"} <= names
    assert "pcm_head.bias" not in names and "head.weight" not in names  # bias-free; no CLS head
    assert "pcm_head.weight" in model.no_weight_decay()  # the L2 term replaces AdamW decay
    linear = tiny_pcm("linear")
    assert linear.bilstm is None and linear.pcm_head.weight.shape == (C, D)


def test_softmax_per_patch_and_max_pooling_shapes_and_values() -> None:
    model = tiny_pcm().eval()
    x = torch.randn(2, 3, 16, 24)
    out = model.forward_features(x)
    probs = model.patch_probabilities(out)
    assert probs.shape == (2, C, 4, 6)  # (B, C, h, w) on the 4 x 6 grid
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, 4, 6))
    logits = model.forward_head(out)
    assert logits.shape == (2, C)
    pooled = probs.amax(dim=(2, 3))
    torch.testing.assert_close(torch.sigmoid(logits), pooled.clamp(1e-7, 1 - 1e-7), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.forward_head(out, pre_logits=True), pooled)
    torch.testing.assert_close(model(x), logits)
    # BCE-with-logits of these logits is the BCE on the pooled probabilities (the original's loss)
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    by_hand = -(y * pooled.log() + (1 - y) * (1 - pooled).log()).mean()
    torch.testing.assert_close(F.binary_cross_entropy_with_logits(logits, y), by_hand, atol=1e-5, rtol=1e-5)


def test_classifier_reads_patches_only_and_patch_order_is_row_major() -> None:
    model = tiny_pcm("linear").eval()
    out = model.forward_features(torch.randn(1, 3, 16, 24))
    manual = (out.patches @ model.pcm_head.weight.T).softmax(-1)  # (1, h*w, C)
    torch.testing.assert_close(model.patch_probabilities(out), manual.transpose(1, 2).reshape(1, C, 4, 6))
    changed = out.prefix + 100.0  # the CLS token's output is not read
    out.prefix = changed
    torch.testing.assert_close(model.patch_probabilities(out), manual.transpose(1, 2).reshape(1, C, 4, 6))


def test_gradient_reaches_backbone_bilstm_and_classifier_only_through_the_max_patch() -> None:
    model = tiny_pcm("linear").eval()
    out = model.forward_features(torch.randn(1, 3, 16, 24))
    out.patches.retain_grad()
    model.forward_head(out)[0, 1].backward()
    grad = out.patches.grad[0].abs().sum(-1)  # (h*w,)
    winner = model.patch_probabilities(out)[0, 1].flatten().argmax()
    assert grad[winner] > 0 and torch.count_nonzero(grad) == 1  # max pooling: one patch gets the gradient
    full = tiny_pcm("bilstm")
    full(torch.randn(2, 3, 16, 24)).sum().backward()
    for name in ("pcm_head.weight", "bilstm.horizontal.weight_ih_l0", "bilstm.vertical.weight_ih_l0",
                 "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"):
        p = dict(full.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bilstm_grid_shapes_and_rows_columns() -> None:
    torch.manual_seed(0)
    lstm = HVBiLSTM(dim=6, hidden=5, dropout=0.0).eval()
    grid = torch.randn(2, 3, 4, 6)  # (B, h, w, D)
    y = lstm(grid)
    assert y.shape == (2, 3, 4, 20)  # 2 directions x 2 passes x hidden 5
    # the horizontal half of patch (r, c) sees row r only; the vertical half column c only
    changed = grid.clone()
    changed[:, 1, 2] += 1.0  # one patch
    z = lstm(changed)
    rows, cols = (z - y)[..., :10].abs().sum(-1), (z - y)[..., 10:].abs().sum(-1)  # (B, h, w)
    assert torch.all(rows[:, [0, 2]] == 0) and torch.all(rows[:, 1] > 0)
    assert torch.all(cols[:, :, [0, 1, 3]] == 0) and torch.all(cols[:, :, 2] > 0)
    # the horizontal LSTM run by hand on row 1
    seq, _ = lstm.horizontal(grid[:, 1])  # (B, w, 10)
    torch.testing.assert_close(y[:, 1, :, :10], seq)
    seq_v, _ = lstm.vertical(grid[:, :, 3])  # column 3: (B, h, 10)
    torch.testing.assert_close(y[:, :, 3, 10:], seq_v)


def test_keras_lstm_init_and_classifier_init() -> None:
    model = tiny_pcm()
    H = model.bilstm.hidden
    assert H == D // 4
    b = model.bilstm.horizontal.bias_ih_l0
    assert torch.all(b[H:2 * H] == 1) and torch.all(b[:H] == 0) and torch.all(model.bilstm.horizontal.bias_hh_l0 == 0)
    w = model.bilstm.horizontal.weight_hh_l0[:H]  # the input gate's recurrent kernel: orthogonal
    torch.testing.assert_close(w @ w.T, torch.eye(H), atol=1e-5, rtol=1e-5)
    torch.manual_seed(1)
    big = build_classifier(ViTConfig(img_size=(16, 16), patch_size=4, in_chans=3, embed_dim=64, depth=1,
                                     num_heads=4, num_classes=50, gated=False, patch_classifier="linear"))
    assert abs(big.pcm_head.weight.std().item() - 0.05) < 0.005


def test_l2_penalty_is_the_squared_norm() -> None:
    model = tiny_pcm("linear")
    torch.testing.assert_close(model.l2_penalty(), (model.pcm_head.weight ** 2).sum())


def test_dropout_only_in_training() -> None:
    model = tiny_pcm()
    x = torch.randn(2, 3, 16, 24)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_other_input_size_interpolates_positions() -> None:
    model = tiny_pcm().eval()
    probs = model.patch_probabilities(model.forward_features(torch.randn(1, 3, 40, 60)))
    assert probs.shape == (1, C, 10, 15)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="linear' or 'bilstm"):
        ViTConfig(num_classes=3, patch_classifier="conv")
    with pytest.raises(ConfigError, match="one CLS token"):
        ViTConfig(num_classes=3, num_cls_tokens=3, head_type="per_class", patch_classifier="linear")
    with pytest.raises(ConfigError, match="pcm_dropout"):
        ViTConfig(num_classes=3, patch_classifier="linear", pcm_dropout=1.0)
    model = tiny_pcm()
    with pytest.raises(ValueError, match="no class token"):
        model.forward_head(model.forward_features(torch.randn(1, 3, 16, 24)),
                           drop_class_tokens=torch.zeros(1, 1, dtype=torch.bool))


def test_timm_checkpoint_loads_backbone_keeps_pcm_head(tmp_path) -> None:
    from weakseg.models.pretrained import load_pretrained

    src = tiny_pcm("linear", size=(16, 16))
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("pcm_head")}
    sd["head.weight"], sd["head.bias"] = torch.randn(1000, D), torch.zeros(1000)  # an ImageNet head
    torch.save(sd, tmp_path / "vit.pth")
    torch.manual_seed(5)
    dst = tiny_pcm("linear", size=(16, 16))
    head_before = dst.pcm_head.weight.clone()
    report = load_pretrained(dst, tmp_path / "vit.pth")
    torch.testing.assert_close(dst.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    torch.testing.assert_close(dst.pcm_head.weight, head_before)
    assert "pcm_head.weight" in report["missing"] and any(k.startswith("head.") for k in report["skipped"])
