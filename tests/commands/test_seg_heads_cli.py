"""Heads on ViT tokens through ``weakseg refine --model``: frozen encoders end to end, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from weakseg.cli import main
from weakseg.tasks.classification import load_classifier
from weakseg.tasks.segmentation import SegmentationTask

TINY_ENCODER = ["--embed_dim", "24", "--depth", "1", "--num_heads", "4", "--patch_size", "8"]


def _refine(tiny_dfc: Path, out: Path, *extra: str) -> int:
    return main(["refine", "--datadir", str(tiny_dfc), "--supervised", "--eval_split", "test", "--output",
                 str(out), "--epochs", "1", "--no-figures", *extra])


@pytest.mark.parametrize("model", ["setr_naive", "setr_pup"])
def test_a_head_on_a_frozen_random_encoder_trains_and_scores(tiny_dfc: Path, tmp_path: Path,
                                                              model: str) -> None:
    out = tmp_path / model
    assert _refine(tiny_dfc, out, "--model", model, "--freeze_encoder", *TINY_ENCODER) == 0
    summary = json.loads((out / "summary.json").read_text())["supervised"]
    assert summary["train_scores"]["miou"] is not None and summary["eval_scores"]["miou"] is not None
    task = SegmentationTask.load_from_checkpoint(out / "supervised" / "unet.ckpt", map_location="cpu")
    assert task.hparams.model == model and task.model.freeze_encoder
    done = json.loads((out / "supervised" / "done.json").read_text())
    assert done["fingerprint"]["freeze_encoder"] is True


def test_vit_linear_probe_of_a_classifier_backbone_keeps_its_weights(tiny_dfc: Path, tiny_checkpoint: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "probe"
    assert _refine(tiny_dfc, out, "--model", "vit_linear", "--freeze_encoder", "--encoder_checkpoint",
                   str(tiny_checkpoint)) == 0
    summary = json.loads((out / "summary.json").read_text())["supervised"]
    assert summary["train_scores"]["miou"] is not None and summary["eval_scores"]["miou"] is not None
    trained = SegmentationTask.load_from_checkpoint(out / "supervised" / "unet.ckpt",
                                                    map_location="cpu").model
    backbone = load_classifier(tiny_checkpoint).model
    assert trained.encoder.cfg.embed_dim == backbone.cfg.embed_dim  # the encoder took the classifier's shape
    for name in ("patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "norm.weight"):  # frozen: unchanged
        torch.testing.assert_close(trained.encoder.state_dict()[name], backbone.state_dict()[name])


def test_freeze_encoder_needs_a_vit_encoder_model(tiny_dfc: Path, tmp_path: Path, capsys) -> None:
    assert _refine(tiny_dfc, tmp_path / "unet", "--model", "unet", "--freeze_encoder") == 2
    err = capsys.readouterr().err
    assert "--freeze_encoder" in err and "unet" in err
    assert not (tmp_path / "unet" / "supervised").exists()


def test_setr_pup_refuses_a_patch_size_that_is_not_a_power_of_two(tiny_dfc: Path, tmp_path: Path,
                                                                     capsys) -> None:
    assert _refine(tiny_dfc, tmp_path / "pup", "--model", "setr_pup", "--patch_size", "6", "--embed_dim",
                   "24", "--num_heads", "4") == 2
    assert "--patch_size" in capsys.readouterr().err
