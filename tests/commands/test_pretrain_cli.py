"""``weakseg pretrain`` through the real CLI: pretrain -> train --pretrained -> pseudomasks -> evaluate, S2 views
and S1/S2 cross-modal views; resume; the backbone loads into every classifier architecture; bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from weakseg.cli import main

TINY = ["--embed_dim", "24", "--depth", "2", "--num_heads", "4", "--patch_size", "8", "--imgsize", "32",
        "--projector_dim", "16", "--batch_size", "8"]


@pytest.mark.parametrize("views", ["augment", "cross_modal"])
def test_pretrain_then_train_pseudomasks_evaluate(tiny_dfc: Path, tmp_path: Path, views: str, capsys) -> None:
    from tests.conftest import TINY_VIT_FLAGS

    out = tmp_path / "pt"
    multimodal = ["--multimodal"] if views == "cross_modal" else []
    assert main(["pretrain", "--datadir", str(tiny_dfc), "--views", views, *multimodal, "--epochs", "2",
                 "--figures_every", "1", "--output_dir", str(out), *TINY]) == 0
    printed = capsys.readouterr()
    assert "Barlow Twins loss batch: 8 tiles per device" in printed.err and "pretrained 24 tiles" in printed.out
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    epochs = [r for r in rows if r.get("train_diag_mean")]
    assert len(epochs) == 2 and all(r["train_offdiag_rms"] for r in epochs)
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == ["cross_correlation_epoch001.png",
                                                                       "cross_correlation_epoch002.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss_batch"] == 8 and summary["tiles"] == 24
    backbone = torch.load(out / "backbone.pth")
    maps = tmp_path / "attention"  # the pretrained backbone's own CLS attention, normalised as in pretraining
    assert main(["attention", "--checkpoint", str(out / "checkpoints" / "last.ckpt"), "--datadir", str(tiny_dfc),
                 "--split", "test", "--tiles", "1", "--output", str(maps)]) == 0
    assert len(list(maps.glob("*.png"))) == 1 and "Barlow Twins backbone" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", "--datadir", str(tiny_dfc), "--arch", "class_tokens", "--prune", "--pretrained",
                 str(out / "backbone.pth"), *multimodal, "--output_dir", str(run), *TINY_VIT_FLAGS]) == 0
    err = capsys.readouterr().err
    assert f"loaded {out / 'backbone.pth'}" in err
    if views == "cross_modal":  # the S1 patch embedding of the summed fusion came from pretraining too
        assert "patch_embed_s1.proj.weight" in backbone and "patch_embed_s1" not in err.split("kept init for")[1]
    masks = tmp_path / "masks"
    assert main(["pseudomasks", "--model_checkpoint", str(run / "checkpoints" / "best.ckpt"), "--datadir",
                 str(tiny_dfc), "--split", "validation:holdout", "--method", "class_attention", "--output",
                 str(masks)]) == 0
    assert main(["evaluate", "--datadir", str(tiny_dfc), "--split", "validation:holdout", "--predictions",
                 str(masks)]) == 0
    assert "mIoU" in capsys.readouterr().out


@pytest.mark.parametrize("arch, extra", [("vit", {}), ("class_tokens", {"num_cls_tokens": 5, "head_type": "per_class",
                                                                       "num_register_tokens": 1}),
                                         ("weaktr", {"num_cls_tokens": 5, "head_type": "mean", "aaf": "v2",
                                                     "final_norm": False})])
def test_backbone_loads_into_every_classifier_gates_included(tmp_path: Path, arch: str, extra: dict) -> None:
    from weakseg.models.pretrained import load_pretrained
    from weakseg.models.vit import ViTConfig
    from weakseg.models.architectures import build_classifier
    from weakseg.tasks.pretraining import BarlowTwinsTask

    torch.manual_seed(0)
    bt = BarlowTwinsTask(model=dict(img_size=(32, 32), patch_size=8, in_chans=13, embed_dim=24, depth=2,
                                    num_heads=4, num_classes=1, gated=False), projector_dim=16)
    torch.save(bt.backbone_state_dict(), tmp_path / "backbone.pth")
    model = build_classifier(ViTConfig(img_size=(32, 32), patch_size=8, in_chans=13, embed_dim=24, depth=2,
                                       num_heads=4, num_classes=5, gated=True, gate_init=3.0, **extra))
    result = load_pretrained(model, tmp_path / "backbone.pth")
    for name in ("blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.weight", "patch_embed.proj.weight"):
        torch.testing.assert_close(model.state_dict()[name], bt.backbone.state_dict()[name])
    # WeakTr has no final LayerNorm (as released): the pretrained one has no place there
    assert result["skipped"] == (["norm.weight", "norm.bias"] if arch == "weaktr" else [])
    assert all(bool((g.log_alpha == 3.0).all()) for g in model.gates)  # gates keep their initialisation
    assert any(k.endswith("log_alpha") for k in result["missing"])


def test_resume_keeps_every_epoch(tiny_dfc: Path, tmp_path: Path) -> None:
    out = tmp_path / "pt"
    assert main(["pretrain", "--datadir", str(tiny_dfc), "--epochs", "1", "--output_dir", str(out), *TINY]) == 0
    assert main(["pretrain", "--datadir", str(tiny_dfc), "--epochs", "2", "--resume", "--output_dir", str(out),
                 *TINY]) == 0
    epochs = [r["epoch"] for r in csv.DictReader((out / "metrics.csv").open()) if r.get("train_diag_mean")]
    assert epochs == ["0", "1"]


def test_bad_input_is_a_clear_error(tmp_path: Path, tiny_dfc: Path, capsys) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    assert main(["pretrain", "--datadir", str(folder), "--dataset", "images", "--output_dir",
                 str(tmp_path / "o")]) == 2
    assert f"no readable image in {folder}" in capsys.readouterr().err
    assert main(["pretrain", "--datadir", str(tiny_dfc), "--views", "cross_modal", "--output_dir",
                 str(tmp_path / "o2")]) == 2
    assert "add --multimodal" in capsys.readouterr().err
    assert main(["pretrain", "--datadir", str(tiny_dfc), "--batch_size", "1", "--output_dir",
                 str(tmp_path / "o3")]) == 2
    assert "--batch_size" in capsys.readouterr().err
    odd = tmp_path / "odd.pth"  # a patch embedding that is not a square conv kernel
    torch.save({"patch_embed.proj.weight": torch.zeros(24, 3, 8, 4), "pos_embed": torch.zeros(1, 17, 24)}, odd)
    assert main(["train", "--datadir", str(tiny_dfc), "--pretrained", str(odd), "--output_dir", str(tmp_path / "t"),
                 "--embed_dim", "24", "--depth", "1", "--num_heads", "4", "--imgsize", "32", "--num_epochs",
                 "1"]) == 2
    err = capsys.readouterr().err
    assert str(odd) in err and "patch size cannot be adapted" in err


def test_folder_of_unlabelled_images(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    (folder / "broken.png").write_bytes(b"x")
    out = tmp_path / "pt"
    assert main(["pretrain", "--datadir", str(folder), "--dataset", "images", "--epochs", "1", "--output_dir",
                 str(out), *TINY[:-2], "--batch_size", "4"]) == 0
    skipped = list(csv.DictReader((out / "skipped_tiles.csv").open()))
    assert [r["id"] for r in skipped] == ["broken"] and skipped[0]["reason"]
    assert json.loads((out / "summary.json").read_text())["tiles"] == 6


def test_a_probe_encoder_takes_the_pretrained_backbones_mlp_width(tmp_path: Path) -> None:
    from weakseg.pipeline.refine import RefineConfig, build_segmentation_task, model_recipe
    from weakseg.tasks.pretraining import BarlowTwinsTask

    bt = BarlowTwinsTask(model=dict(img_size=(32, 32), patch_size=8, in_chans=13, embed_dim=24, depth=2,
                                    num_heads=4, mlp_ratio=2.0, num_classes=1, gated=False), projector_dim=16)
    torch.save(bt.backbone_state_dict(), tmp_path / "backbone.pth")
    cfg = RefineConfig(datadir="d", pseudomasks=None, output_dir="o", supervised=True, model="vit_linear",
                       freeze_encoder=True, embed_dim=24, depth=2, num_heads=4, patch_size=8,
                       pretrained=str(tmp_path / "backbone.pth"), **model_recipe("vit_linear"))
    encoder = build_segmentation_task(cfg, 13, 8, [32, 32]).model.encoder
    own = encoder.state_dict()
    for name, value in bt.backbone_state_dict().items():  # every tensor, the MLPs included (DeiT's ratio is 4)
        torch.testing.assert_close(own[name], value)
