"""Tests of weakseg.viz.curves: training curves from metrics.csv rows and the mIoU per refinement iteration."""

from __future__ import annotations

import pytest
from PIL import Image

from weakseg.errors import WeaksegError
from weakseg.viz.curves import plot_iteration_scores, plot_training_curves


def metrics_rows(epochs: int = 3, pruning: bool = True) -> list[dict[str, str]]:
    """What Lightning's CSV logger writes: per-step train rows, per-epoch validation and epoch-end rows."""
    rows = []
    for e in range(epochs):
        for k in range(4):
            rows.append({"epoch": str(e), "step": str(4 * e + k), "train_loss": "3.5", "train_bce": f"{0.6 - 0.1 * e}",
                         "val_loss": "", "val_macro_f1": "", "val_map": "", "pruned_fraction": ""})
        rows.append({"epoch": str(e), "step": str(4 * e + 3), "train_loss": "", "train_bce": "",
                     "val_loss": f"{0.5 - 0.05 * e}", "val_macro_f1": f"{0.2 * e}", "val_map": f"{0.5 + 0.1 * e}",
                     "pruned_fraction": ""})
        rows.append({"epoch": str(e), "step": str(4 * e + 3), "train_loss": "", "train_bce": "", "val_loss": "",
                     "val_macro_f1": "", "val_map": "", "pruned_fraction": "0.25" if pruning else "0.0"})
    return rows


def png_size(path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_training_curves_draw_one_panel_per_kind(tmp_path) -> None:
    rows = metrics_rows()
    wide = png_size(plot_training_curves(rows, tmp_path / "a.png", best_epoch=1, pruning=True, dpi=50))
    narrow = png_size(plot_training_curves(rows, tmp_path / "b.png", best_epoch=1, pruning=False, dpi=50))
    assert wide[0] == 3 * 4 * 50 and narrow[0] == 2 * 4 * 50  # loss | scores | pruned fraction; no pruning panel
    only_loss = [{k: v for k, v in r.items() if k in ("epoch", "step", "train_loss")} for r in rows]
    assert png_size(plot_training_curves(only_loss, tmp_path / "c.png", dpi=50))[0] == 4 * 50


def test_training_curves_are_byte_identical_for_the_same_rows(tmp_path) -> None:
    a = plot_training_curves(metrics_rows(), tmp_path / "a.png", best_epoch=2, best_label="best.ckpt: epoch 2")
    b = plot_training_curves(metrics_rows(), tmp_path / "b.png", best_epoch=2, best_label="best.ckpt: epoch 2")
    assert a.read_bytes() == b.read_bytes()


def test_training_curves_without_any_known_column_are_an_error(tmp_path) -> None:
    with pytest.raises(WeaksegError, match="metrics.csv holds no train_loss"):
        plot_training_curves([{"epoch": "0", "step": "0", "lr-AdamW": "0.001"}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_iteration_scores_with_and_without_ground_truth(tmp_path) -> None:
    iterations = [
        {"iteration": 0, "train_scores": {"miou": 0.40}, "eval_scores": None, "eval_unet_alone_scores": None},
        {"iteration": 1, "train_scores": {"miou": 0.47}, "eval_scores": {"miou": 0.45},
         "eval_unet_alone_scores": {"miou": 0.41}},
    ]
    supervised = {"train_scores": {"miou": 0.7}, "eval_scores": {"miou": 0.65}}
    path = plot_iteration_scores(iterations, tmp_path / "m.png", supervised=supervised, split="train",
                                 eval_split="test", dpi=50)
    assert png_size(path) == (round(5.6 * 50), round(4.0 * 50))
    no_gt = [{"iteration": i, "train_scores": None, "eval_scores": None} for i in (0, 1)]
    with pytest.raises(WeaksegError, match="no ground-truth masks"):
        plot_iteration_scores(no_gt, tmp_path / "n.png")
