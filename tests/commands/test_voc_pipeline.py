"""A VOC-layout fixture through the real CLI: train (WeakTr) -> background sweep -> pseudomasks (multi-scale +
flip, CRF) -> refine (Segmenter with the gradient-clipping loss) -> evaluate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from weakseg.cli import main
from weakseg.data.synthetic_voc import make_voc_fixture
from weakseg.evaluation.compare import read_prediction_mask as read_mask

TINY = ["--embed_dim", "24", "--depth", "2", "--num_heads", "4", "--patch_size", "8", "--imgsize", "32",
        "--train_batch_size", "8", "--num_epochs", "2"]


def test_voc_weaktr_pipeline(tmp_path: Path, capsys) -> None:
    data = tmp_path / "voc"
    make_voc_fixture(data, num_images=24, size=32, seed=0)
    run = tmp_path / "train"
    assert main(["train", "--dataset", "voc", "--datadir", str(data), "--arch", "weaktr", "--output_dir", str(run),
                 *TINY]) == 0
    ckpt = run / "checkpoints" / "best.ckpt"
    sweep = tmp_path / "sweep"
    assert main(["pseudomasks", "--model_checkpoint", str(ckpt), "--datadir", str(data), "--split", "train:holdout",
                 "--method", "weaktr", "--sweep_background", "0.3:0.6:0.1", "--output", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "chosen with the ground-truth masks of 'train:holdout'" in out
    result = json.loads((sweep / "background_sweep.json").read_text())
    assert result["used_ground_truth_masks"] and [r["threshold"] for r in result["thresholds"]] == [0.3, 0.4, 0.5, 0.6]
    assert result["best_threshold"] in (0.3, 0.4, 0.5, 0.6) and result["background_class"] == "background"
    assert not list(sweep.glob("*.tif"))  # a sweep writes no masks
    masks = tmp_path / "masks"
    t = str(result["best_threshold"])
    assert main(["pseudomasks", "--model_checkpoint", str(ckpt), "--datadir", str(data), "--split", "train",
                 "--method", "weaktr", "--background_threshold", t, "--scales", "1,1.5", "--crf",
                 "--output", str(masks)]) == 0
    rows = list(csv.DictReader((masks / "manifest.csv").open()))
    assert len(rows) == 18 and all(r["status"] in ("ok", "fallback") for r in rows)
    assert {r["reason"].split(";")[0] for r in rows} <= {"map_background", "single_label", "no_label_above_threshold"}
    values = set()
    for r in rows:
        values |= set(np.unique(read_mask(masks / r["file"])).tolist())
    assert 0 in values and values <= set(range(21))  # background painted by the plane
    refined = tmp_path / "refine"
    assert main(["refine", "--datadir", str(data), "--dataset", "voc", "--pseudomasks", str(masks), "--split",
                 "train", "--eval_split", "val", "--model_checkpoint", str(ckpt), "--model", "segmenter",
                 "--loss", "clip", "--optimizer", "sgd", "--lr_schedule", "poly", "--learning_rate", "0.01",
                 "--embed_dim", "24", "--depth", "2", "--num_heads", "4", "--epochs", "2", "--output",
                 str(refined), "--no-figures"]) == 0
    header = next(iter(sorted(refined.rglob("metrics.csv")))).read_text().splitlines()[0]
    assert "train_clip_mu" in header and "train_clipped_fraction" in header
    summary = json.loads((refined / "summary.json").read_text())
    it1 = summary["iterations"][1]
    assert it1["eval_scores"]["miou"] is not None
    assert main(["evaluate", "--datadir", str(data), "--split", "train", "--predictions", str(masks)]) == 0
    assert (tmp_path / "masks_scores_train.json").is_file()
