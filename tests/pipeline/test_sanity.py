"""Warnings when a classifier learned only class frequencies, or pruning left a method nothing to read."""

import math

import numpy as np
import pytest
import rasterio
import torch

from weakseg.methods import get_method
from weakseg.pipeline.sanity import (
    average_precision,
    classifier_checks,
    method_needs,
    pruning_checks,
    recorded_classifier_warnings,
)
from weakseg.pipeline.train import TrainConfig, checkpoint_monitor, train


# ---- numbers ------------------------------------------------------------------------------------------------------
def test_average_precision_by_hand():
    # ranking: 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg): precision at the positives 1/1 and 2/3 -> AP = 5/6
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1], dtype=torch.float64)
    target = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    assert average_precision(scores, target) == pytest.approx(5 / 6)
    # every score tied: one point, precision = prevalence
    assert average_precision(torch.full((4,), 0.3, dtype=torch.float64), target) == pytest.approx(0.5)
    # a tie between a positive and a negative at the top counts them together: P = 1/2 there, then 2/3 ... no:
    # scores (0.9, 0.9, 0.5) targets (1, 0, 1): point 1 after both 0.9s: tp 1 of 2 (recall 1/2), point 2: tp 2 of 3
    tied = average_precision(torch.tensor([0.9, 0.9, 0.5], dtype=torch.float64),
                             torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    assert tied == pytest.approx(0.5 * 0.5 + 0.5 * (2 / 3))


def test_constant_frequency_predictor_is_warned_with_its_numbers():
    g = torch.Generator().manual_seed(0)
    targets = (torch.rand(200, 3, generator=g) < torch.tensor([0.7, 0.4, 0.1])).double()
    freq = torch.tensor([0.7, 0.4, 0.1], dtype=torch.float64)
    probs = freq.expand(200, 3).clone()
    result = classifier_checks(probs, targets, freq, split="all:holdout")
    expected_bce = float(-(targets * freq.log() + (1 - targets) * (1 - freq).log()).mean())
    assert result["bce"] == pytest.approx(expected_bce) and result["baseline_bce"] == pytest.approx(expected_bce)
    assert result["map"] == pytest.approx(float(targets.mean(0).mean()))
    assert result["spread"] == 0.0 and result["modal_label_set_share"] == 1.0
    text = " ".join(result["warnings"])
    assert len(result["warnings"]) == 2
    assert "does not beat the class-frequency baseline on 'all:holdout'" in text and f"{expected_bce:.4f}" in text
    assert "near-constant" in text and "100% of them get the same predicted label set" in text
    assert "try:" in text


def test_informative_predictions_pass():
    g = torch.Generator().manual_seed(1)
    targets = (torch.rand(200, 3, generator=g) < 0.4).double()
    probs = 0.15 + 0.7 * targets  # right on every image, confident but not certain
    result = classifier_checks(probs, targets, targets.mean(0))
    assert result["warnings"] == [] and result["bce"] < 0.5 * result["baseline_bce"] and result["map"] == 1.0


def test_a_small_gain_over_the_baseline_still_warns():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 50, dtype=torch.float64)
    # every image 0.505 on its classes, 0.495 off them: BCE -log(0.505) = 0.6832 vs -log(0.5) = 0.6931 (1.4 % better)
    result = classifier_checks(0.5 + 0.005 * (2 * targets - 1), targets, torch.tensor([0.5, 0.5]))
    assert result["bce"] == pytest.approx(-math.log(0.505)) and result["baseline_bce"] == pytest.approx(math.log(2))
    assert any("does not beat" in w for w in result["warnings"])
    # 0.51: -log(0.51) = 0.6733, 2.9 % better than the baseline: beyond the 2 % margin
    assert not any("does not beat" in w for w in classifier_checks(0.5 + 0.01 * (2 * targets - 1), targets,
                                                                    torch.tensor([0.5, 0.5]))["warnings"])


def test_pruning_checks_name_the_blocks_and_the_method():
    all_open = torch.ones(3, 2, dtype=torch.bool)
    assert pruning_checks(all_open, gated=False, needs={}) == []
    (msg,) = pruning_checks(all_open, gated=True, needs={"attention": [2]})
    assert "closed no head (all 6 gates open)" in msg
    last_closed = torch.tensor([[True, False], [True, True], [False, False]])
    (msg,) = pruning_checks(last_closed, gated=True, needs={"attention": [2]})
    assert "block(s) [2]" in msg and "--method attention" in msg and "every tile falls back" in msg
    (msg,) = pruning_checks(last_closed, gated=True, needs={"class_attention": [0, 1, 2]})
    assert "block(s) [2]" in msg and "contribute nothing" in msg
    assert pruning_checks(last_closed, gated=True, needs={"attention": [0, 1]}) == []


def test_methods_declare_the_blocks_they_read():
    assert get_method("attention", assign="rank").attention_blocks(4) == [3]  # the paper: last block
    assert get_method("attention").attention_blocks(4) == [0, 1, 2, 3]
    assert get_method("class_attention", blocks="last").attention_blocks(4) == [3]
    assert get_method("class_attention", heads="all").attention_blocks(4) == []  # pre-gate maps: needs no head
    assert get_method("gradcam").attention_blocks(4) == []
    assert method_needs("vit", 4) == {"attention": [0, 1, 2, 3]}
    assert method_needs("class_tokens", 4) == {"attention": [0, 1, 2, 3], "class_attention": [0, 1, 2, 3]}


def test_checkpoint_monitor_names():
    assert checkpoint_monitor("map", True) == ("val_map", "max")
    assert checkpoint_monitor("loss", True) == ("val_loss", "min")
    assert checkpoint_monitor("loss", False) == ("train_bce", "min")
    assert checkpoint_monitor("macro_f1", False) == ("train_macro_f1", "max")


# ---- end to end: a classifier on labels that are / are not in the images ------------------------------------------
def _folder(root, learnable: bool, n: int = 96, size: int = 16):
    """Three classes; in the learnable data class k is present iff band k is bright, otherwise labels are coin flips
    independent of the (random) images."""
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\nc\n")
    rng = np.random.default_rng(0)
    rows = ["id,labels"]
    for i in range(n):
        present = rng.random(3) < 0.5
        if not present.any():
            present[rng.integers(3)] = True
        img = rng.integers(500, 2500, (3, size, size)).astype(np.uint16)
        if learnable:
            img[present] += 6000
        else:
            img[rng.random(3) < 0.5] += 6000  # same statistics, unrelated to the labels
        tid = f"t{i:03d}"
        with rasterio.open(root / "images" / f"{tid}.tif", "w", driver="GTiff", height=size, width=size, count=3,
                           dtype="uint16") as dst:
            dst.write(img)
        rows.append(f"{tid},{';'.join('abc'[k] for k in range(3) if present[k])}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _train(tmp_path, learnable: bool):
    data = _folder(tmp_path / "data", learnable)
    cfg = TrainConfig(datadir=str(data), dataset="folder", output_dir=str(tmp_path / "run"), imgsize=[16, 16],
                      patch_size=4, embed_dim=32, depth=2, num_heads=2, num_epochs=12, train_batch_size=16,
                      learning_rate=3e-3, warmup_epochs=0.5, augmentations=[], seed=0)
    return train(cfg)


def test_labels_independent_of_the_images_are_warned(tmp_path, caplog):
    summary = _train(tmp_path, learnable=False)
    checks = summary["sanity"]["classifier"]
    assert any("does not beat the class-frequency baseline" in w for w in checks["warnings"]), checks
    assert "does not beat" in caplog.text
    ckpt = summary["best_checkpoint"]
    assert recorded_classifier_warnings(ckpt) == checks["warnings"]  # what pseudomasks repeats


def test_learnable_labels_are_not_warned(tmp_path):
    summary = _train(tmp_path, learnable=True)
    checks = summary["sanity"]["classifier"]
    assert checks["warnings"] == [], checks
    assert checks["bce"] < 0.9 * checks["baseline_bce"] and checks["map"] > checks["baseline_map"] + 0.2
    assert summary["monitor"] == "val_map" and not math.isnan(checks["map"])


def test_checkpoint_ties_go_to_the_later_epoch(tmp_path):
    from types import SimpleNamespace

    from weakseg.pipeline.train import LatestOnTieCheckpoint

    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, **_: decision)
    trainer = SimpleNamespace(strategy=strategy, lightning_module=None)
    for mode, best, tie, worse in (("max", 0.5, 0.5, 0.4), ("min", 0.5, 0.5, 0.6)):
        cb = LatestOnTieCheckpoint(dirpath=tmp_path, filename="best", monitor="val_x", mode=mode)
        cb.best_k_models = {"epoch0": torch.tensor(best)}
        cb.kth_best_model_path = "epoch0"
        assert cb.check_monitor_top_k(trainer, torch.tensor(tie))  # Lightning's own keeps epoch 0 here
        assert not cb.check_monitor_top_k(trainer, torch.tensor(worse))


def test_epochs_before_the_pruning_target_is_reached_are_not_candidates(tmp_path):
    from types import SimpleNamespace

    from weakseg.pipeline.train import LatestOnTieCheckpoint

    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, **_: decision)
    cb = LatestOnTieCheckpoint(dirpath=tmp_path, filename="best", monitor="val_map", mode="max")
    ramping = SimpleNamespace(strategy=strategy, lightning_module=SimpleNamespace(pruning_settled=lambda: False))
    settled = SimpleNamespace(strategy=strategy, lightning_module=SimpleNamespace(pruning_settled=lambda: True))
    assert not cb.check_monitor_top_k(ramping, torch.tensor(0.9))  # even the first epoch, even a better score
    assert cb.check_monitor_top_k(settled, torch.tensor(0.1))


def test_pseudomasks_warns_before_it_starts_when_the_method_reads_a_closed_block(tmp_path, caplog):
    from types import SimpleNamespace

    from weakseg.models.vit import GatedViT, ViTConfig
    from weakseg.pipeline.sanity import warn_before_pseudomasks

    model = GatedViT(ViTConfig(img_size=(16, 16), patch_size=8, in_chans=3, embed_dim=16, depth=2, num_heads=2,
                               num_classes=3, gated=True, gate_init=1.0))
    with torch.no_grad():
        model.gates[1].log_alpha.fill_(-1.0)  # every head of the last block closed
    task = SimpleNamespace(model=model)
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    (messages,) = [warn_before_pseudomasks(task, get_method("attention", assign="rank"), ckpt)]
    assert len(messages) == 1 and "block(s) [1]" in messages[0] and "every tile falls back" in messages[0]
    assert "block(s) [1]" in caplog.text
    assert warn_before_pseudomasks(task, get_method("gradcam"), ckpt) == []  # Grad-CAM reads no head
    # the classifier warnings ``weakseg train`` recorded for this very checkpoint are repeated
    import json

    ckpt.parent.mkdir(parents=True)
    (ckpt.parent.parent / "summary.json").write_text(json.dumps(
        {"sanity": {"checkpoint": str(ckpt), "classifier": {"warnings": ["learned nothing"]}}}))
    assert warn_before_pseudomasks(task, get_method("gradcam"), ckpt) == ["learned nothing"]
    other = ckpt.parent / "last.ckpt"
    assert warn_before_pseudomasks(task, get_method("gradcam"), other) == []  # another checkpoint: not its numbers
