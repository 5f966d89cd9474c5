"""ViT-PCM through the real CLI: train -> pseudomasks -> evaluate on the built-in Sentinel data (S2, S1+S2) and on
a VOC-layout fixture (background channel, high-resolution inference, CRF, refine)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY_VIT_FLAGS
from weakseg.cli import main
from weakseg.data.synthetic_voc import make_voc_fixture
from weakseg.evaluation.compare import read_prediction_mask as read_mask
from weakseg.tasks.classification import load_classifier


@pytest.mark.parametrize("modality", ["s2", "s1s2"])
def test_pcm_train_pseudomasks_evaluate(tiny_dfc: Path, tmp_path: Path, modality: str, capsys) -> None:
    run = tmp_path / "run"
    extra = ["--multimodal"] if modality == "s1s2" else []
    assert main(["train", "--datadir", str(tiny_dfc), "--arch", "pcm", "--prune", "--output_dir", str(run),
                 *extra, *TINY_VIT_FLAGS]) == 0
    ckpt = run / "checkpoints" / "best.ckpt"
    task = load_classifier(ckpt)
    assert task.hparams["arch"] == "pcm" and task.model_config.patch_classifier == "linear"
    assert task.model_config.in_chans == (15 if modality == "s1s2" else 13)
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "train_pcm_et" in header and "train_pcm_l2" in header  # both extra terms trained
    masks = tmp_path / "masks"
    assert main(["pseudomasks", "--model_checkpoint", str(ckpt), "--datadir", str(tiny_dfc), "--split",
                 "validation:holdout", "--method", "pcm", "--masking", "labels", "--scales", "1", "--output",
                 str(masks), "--batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert "pcm" in out and "mIoU" in out  # scored against the holdout's masks
    rows = list(csv.DictReader((masks / "manifest.csv").open()))
    assert len(rows) == 5 and all(r["method"] == "pcm" for r in rows)
    assert {r["reason"].split(";")[0] for r in rows} <= {"pcm_argmax", "single_label", "no_label_above_threshold"}
    assert main(["evaluate", "--datadir", str(tiny_dfc), "--split", "validation:holdout", "--predictions",
                 str(masks)]) == 0
    default = tmp_path / "default"  # the defaults: no labels, 2.5 x input
    assert main(["pseudomasks", "--model_checkpoint", str(ckpt), "--datadir", str(tiny_dfc), "--split",
                 "validation:holdout", "--method", "pcm", "--output", str(default), "--no-evaluate"]) == 0
    rows = list(csv.DictReader((default / "manifest.csv").open()))
    assert {r["reason"] for r in rows} == {"pcm_all_classes"}
    options = json.loads((default / "run.json").read_text())["method_options"]
    assert (options["masking"], options["scales"]) == ("none", "2.5")


def test_pcm_flags_need_the_pcm_arch_and_even_grids(tiny_dfc: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--datadir", str(tiny_dfc), "--arch", "vit", "--pcm_head", "linear", "--output_dir",
                 str(tmp_path / "r"), *TINY_VIT_FLAGS]) == 2
    assert "--pcm_head configure ViT-PCM and need --arch pcm" in capsys.readouterr().err
    flags = [f for f in TINY_VIT_FLAGS]
    flags[flags.index("--imgsize") + 1] = "24"  # 3 x 3 patches: no 2 x 2 mosaic of whole patches
    assert main(["train", "--datadir", str(tiny_dfc), "--arch", "pcm", "--output_dir", str(tmp_path / "r2"),
                 *flags]) == 2
    assert "multiple of 2 x the patch size (16" in capsys.readouterr().err
    assert main(["train", "--datadir", str(tiny_dfc), "--arch", "pcm", "--frozen_epochs", "1", "--output_dir",
                 str(tmp_path / "r3"), *TINY_VIT_FLAGS]) == 2
    assert "--frozen_epochs 1 leaves no epoch" in capsys.readouterr().err


def test_pcm_two_stage_schedule_through_the_cli(tiny_dfc: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    flags = [f for f in TINY_VIT_FLAGS]
    flags[flags.index("--num_epochs") + 1] = "2"
    assert main(["train", "--datadir", str(tiny_dfc), "--arch", "pcm", "--pcm_head", "bilstm", "--frozen_epochs",
                 "1", "--trainable_blocks", "1", "--frozen_lr", "0.01", "--optimizer", "adam", "--no-lr_scheduler",
                 "--output_dir", str(run), *flags]) == 0
    task = load_classifier(run / "checkpoints" / "last.ckpt")
    assert task.hparams["frozen_epochs"] == 1 and task.hparams["trainable_blocks"] == 1
    assert task.model_config.patch_classifier == "bilstm"


def test_voc_pcm_pipeline(tmp_path: Path, capsys) -> None:
    data = tmp_path / "voc"
    make_voc_fixture(data, num_images=24, size=32, seed=0)
    run = tmp_path / "train"
    assert main(["train", "--dataset", "voc", "--datadir", str(data), "--arch", "pcm", "--output_dir", str(run),
                 "--embed_dim", "24", "--depth", "2", "--num_heads", "4", "--patch_size", "8", "--imgsize", "32",
                 "--train_batch_size", "8", "--num_epochs", "2"]) == 0
    ckpt = run / "checkpoints" / "best.ckpt"
    assert load_classifier(ckpt).model_config.num_classes == 21  # background is a softmax channel
    masks = tmp_path / "masks"
    assert main(["pseudomasks", "--model_checkpoint", str(ckpt), "--datadir", str(data), "--split", "train",
                 "--method", "pcm", "--oracle", "--masking", "labels", "--crf", "--output", str(masks)]) == 0
    rows = list(csv.DictReader((masks / "manifest.csv").open()))
    assert len(rows) == 18 and all(r["status"] == "ok" for r in rows)
    values = set()
    for r in rows:
        values |= set(np.unique(read_mask(masks / r["file"])).tolist())
    assert 0 in values and values <= set(range(21))  # background painted from its own channel
    run_json = json.loads((masks / "run.json").read_text())
    assert run_json["method_options"]["scales"] == "2.5" and run_json["oracle"]
    refined = tmp_path / "refine"
    assert main(["refine", "--datadir", str(data), "--dataset", "voc", "--pseudomasks", str(masks), "--split",
                 "train", "--eval_split", "val", "--model_checkpoint", str(ckpt), "--epochs", "1", "--output",
                 str(refined), "--no-figures"]) == 0
    summary = json.loads((refined / "summary.json").read_text())
    assert summary["iterations"][1]["eval_scores"]["miou"] is not None
    assert main(["evaluate", "--datadir", str(data), "--split", "train", "--predictions", str(masks)]) == 0
