"""Tests of weakseg.evaluation.metrics against hand-computed confusion matrices."""

from __future__ import annotations

import json

import numpy as np
import pytest

from weakseg.data.classes import DFC_CLASS_NAMES
from weakseg.errors import DataError
from weakseg.evaluation.metrics import (
    SHORT_CLASS_NAMES,
    ConfusionMatrix,
    compute_scores,
    format_scores_table,
    short_class_name,
)

NAMES3 = ["a", "b", "c"]

# Ground truth / prediction pairs of the hand example (one 2 x 6 image):
#   GT   0 0 0 0 1 1 | 2 2 2 2 255 255
#   pred 0 0 1 255 1 2 | 2 2 2 0 1   255
# After dropping the two GT-255 pixels (ignored = 2):
#   CM (rows GT, cols pred)      unlabelled
#        [2, 1, 0]                  1        row 0 = 4
#        [0, 1, 1]                  0        row 1 = 2
#        [1, 0, 3]                  0        row 2 = 4
#   columns: col0 = 3, col1 = 2, col2 = 4; total = 10, trace = 6.
# OA = 6/10 = 0.6
# recall = 2/4, 1/2, 3/4 -> AA = (0.5 + 0.5 + 0.75)/3 = 0.583333
# IoU0 = 2/(4+3-2) = 2/5, IoU1 = 1/(2+2-1) = 1/3, IoU2 = 3/(4+4-3) = 3/5 -> mIoU = (0.4 + 1/3 + 0.6)/3 = 4/9
# coverage = 9/10
HAND_GT = np.array([[0, 0, 0, 0, 1, 1], [2, 2, 2, 2, 255, 255]], dtype=np.uint8)
HAND_PRED = np.array([[0, 0, 1, 255, 1, 2], [2, 2, 2, 0, 1, 255]], dtype=np.uint8)


def test_hand_computed_example() -> None:
    cm = ConfusionMatrix(3)
    cm.update(HAND_GT, HAND_PRED)
    np.testing.assert_array_equal(cm.matrix, [[2, 1, 0], [0, 1, 1], [1, 0, 3]])
    np.testing.assert_array_equal(cm.unlabelled_by_class, [1, 0, 0])
    assert cm.matrix.dtype == np.int64
    assert cm.ignored_pixels == 2
    assert cm.unlabelled_pixels == 1
    assert cm.evaluated_pixels == 10

    scores = compute_scores(cm, NAMES3)
    assert scores["oa"] == pytest.approx(0.6)
    assert scores["recall"] == pytest.approx([0.5, 0.5, 0.75])
    assert scores["aa"] == pytest.approx(1.75 / 3)
    assert scores["iou"] == pytest.approx([0.4, 1 / 3, 0.6])
    assert scores["miou"] == pytest.approx(4 / 9)
    assert scores["gt_pixels"] == [4, 2, 4]
    assert scores["pred_pixels"] == [3, 2, 4]
    assert scores["correct_pixels"] == [2, 1, 3]
    assert scores["evaluated_pixels"] == 10
    assert scores["correct_pixels_total"] == 6
    assert scores["ignored_pixels"] == 2
    assert scores["unlabelled_pixels"] == 1
    assert scores["coverage"] == pytest.approx(0.9)
    assert scores["classes_in_gt"] == 3
    assert scores["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]


def test_plain_array_matrix() -> None:
    # CM [[3, 1], [0, 4]]: OA = 7/8; recall 3/4, 1 -> AA 7/8; IoU0 = 3/(4+3-3) = 3/4, IoU1 = 4/(4+5-4) = 4/5.
    scores = compute_scores(np.array([[3, 1], [0, 4]]), ["x", "y"])
    assert scores["oa"] == pytest.approx(7 / 8)
    assert scores["aa"] == pytest.approx(7 / 8)
    assert scores["iou"] == pytest.approx([0.75, 0.8])
    assert scores["miou"] == pytest.approx(0.775)
    assert scores["coverage"] == pytest.approx(1.0)
    assert scores["unlabelled_pixels"] == 0


def test_any_prediction_outside_classes_counts_as_unlabelled_and_wrong() -> None:
    # GT all class 1 (4 pixels); predictions 1, 255, 3 (>= K), 200 -> 1 correct, 3 unlabelled.
    # recall1 = 1/4; IoU1 = 1/(4 + 1 - 1) = 1/4; classes 0 and 2 absent -> excluded from AA and mIoU.
    cm = ConfusionMatrix(3)
    cm.update(np.array([1, 1, 1, 1]), np.array([1, 255, 3, 200]))
    scores = compute_scores(cm, NAMES3)
    assert scores["unlabelled_pixels"] == 3
    assert scores["unlabelled_by_class"] == [0, 3, 0]
    assert scores["oa"] == pytest.approx(0.25)
    assert scores["aa"] == pytest.approx(0.25)
    assert scores["miou"] == pytest.approx(0.25)
    assert scores["coverage"] == pytest.approx(0.25)


def test_negative_prediction_is_unlabelled_for_signed_input() -> None:
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 1], dtype=np.int64), np.array([-1, 1], dtype=np.int64))
    np.testing.assert_array_equal(cm.matrix, [[0, 0], [0, 1]])
    np.testing.assert_array_equal(cm.unlabelled_by_class, [1, 0])


def test_ignored_ground_truth_is_dropped_whatever_the_prediction() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.full((4, 4), 255, dtype=np.uint8), np.zeros((4, 4), dtype=np.uint8))
    assert cm.matrix.sum() == 0
    assert cm.ignored_pixels == 16
    scores = compute_scores(cm, NAMES3)
    # Nothing evaluated: every score is undefined (null), not 0 and not NaN.
    assert scores["oa"] is None and scores["aa"] is None and scores["miou"] is None
    assert scores["coverage"] is None
    assert scores["iou"] == [None, None, None]


def test_absent_class_excluded_from_miou_and_aa() -> None:
    # GT only classes 0, 1; prediction only 0, 1; class 2 absent from both.
    # CM [[2, 1, 0], [1, 2, 0], [0, 0, 0]]: IoU0 = 2/(3+3-2) = 1/2, IoU1 = 1/2, IoU2 undefined.
    # mIoU = 1/2 (the dfc2020_baseline convention would give (1/2 + 1/2 + 0)/3 = 1/3).
    # recall = 2/3, 2/3 -> AA = 2/3 (not 4/9).
    gt = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 1, 0])
    cm = ConfusionMatrix(3)
    cm.update(gt, pred)
    scores = compute_scores(cm, NAMES3)
    assert scores["iou"][2] is None
    assert scores["recall"][2] is None
    assert scores["miou"] == pytest.approx(0.5)
    assert scores["aa"] == pytest.approx(2 / 3)
    assert scores["classes_in_gt"] == 2
    assert scores["classes_in_miou"] == 2


def test_class_predicted_but_absent_from_gt_counts_zero_iou_but_not_in_aa() -> None:
    # GT [0, 0, 1, 1]; pred [0, 2, 1, 1]. CM [[1, 0, 1], [0, 2, 0], [0, 0, 0]].
    # IoU0 = 1/(2+1-1) = 1/2, IoU1 = 2/(2+2-2) = 1, IoU2 = 0/(0+1-0) = 0 -> mIoU = 1/2.
    # recall0 = 1/2, recall1 = 1, class 2 has no GT pixel -> AA = 3/4.
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]))
    scores = compute_scores(cm, NAMES3)
    assert scores["iou"] == pytest.approx([0.5, 1.0, 0.0])
    assert scores["miou"] == pytest.approx(0.5)
    assert scores["recall"][2] is None
    assert scores["aa"] == pytest.approx(0.75)
    assert scores["classes_in_gt"] == 2
    assert scores["classes_in_miou"] == 3


def test_accumulating_images_equals_one_big_image() -> None:
    rng = np.random.default_rng(0)
    gts = [rng.choice([0, 1, 2, 3, 255], size=(5, 7)).astype(np.uint8) for _ in range(4)]
    preds = [rng.choice([0, 1, 2, 3, 255], size=(5, 7)).astype(np.uint8) for _ in range(4)]
    several = ConfusionMatrix(4)
    for gt, pred in zip(gts, preds, strict=True):
        several.update(gt, pred)
    big = ConfusionMatrix(4)
    big.update(np.concatenate(gts, axis=0), np.concatenate(preds, axis=0))
    np.testing.assert_array_equal(several.matrix, big.matrix)
    np.testing.assert_array_equal(several.unlabelled_by_class, big.unlabelled_by_class)
    assert several.ignored_pixels == big.ignored_pixels > 0
    assert compute_scores(several, list("abcd")) == compute_scores(big, list("abcd"))

    # Merging two partial matrices gives the same counts too; a batch (B, H, W) is accepted as one update.
    first, second = ConfusionMatrix(4), ConfusionMatrix(4)
    first.update(np.stack(gts[:2]), np.stack(preds[:2]))
    second.update(np.stack(gts[2:]), np.stack(preds[2:]))
    first.merge(second)
    np.testing.assert_array_equal(first.matrix, big.matrix)
    assert first.ignored_pixels == big.ignored_pixels


def test_matches_a_reference_count_loop() -> None:
    rng = np.random.default_rng(1)
    gt = rng.choice([0, 1, 2, 255], size=200)
    pred = rng.choice([0, 1, 2, 7, 255], size=200)
    cm = ConfusionMatrix(3)
    cm.update(gt, pred)
    expected = np.zeros((3, 3), dtype=np.int64)
    expected_unlabelled = np.zeros(3, dtype=np.int64)
    for g, p in zip(gt, pred, strict=True):
        if g == 255:
            continue
        if p < 3:
            expected[g, p] += 1
        else:
            expected_unlabelled[g] += 1
    np.testing.assert_array_equal(cm.matrix, expected)
    np.testing.assert_array_equal(cm.unlabelled_by_class, expected_unlabelled)


def test_reset() -> None:
    cm = ConfusionMatrix(3)
    cm.update(HAND_GT, HAND_PRED)
    cm.reset()
    assert cm.evaluated_pixels == 0 and cm.ignored_pixels == 0


def test_bad_inputs() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(DataError, match=r"ground truth holds ids \[5\]"):
        cm.update(np.array([0, 5]), np.array([0, 0]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(DataError, match="integer"):
        cm.update(np.zeros(3, dtype=np.uint8), np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="2 class names for a 3-class"):
        compute_scores(cm, ["a", "b"])
    with pytest.raises(ValueError, match="merge"):
        cm.merge(ConfusionMatrix(2))


def test_scores_are_strict_json() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1]), np.array([0, 1]))  # class 2 absent -> None values
    scores = compute_scores(cm, NAMES3)
    text = json.dumps(scores, allow_nan=False)
    assert json.loads(text) == scores
    assert all(type(v) is int for v in scores["gt_pixels"])  # Python ints, not numpy


def test_short_names_cover_dfc_classes() -> None:
    assert set(SHORT_CLASS_NAMES) == set(DFC_CLASS_NAMES)
    assert short_class_name("Urban/Built-up") == "Urban"
    assert short_class_name("deciduous_forest_type") == "deciduo"


def test_format_scores_table() -> None:
    cm = ConfusionMatrix(3)
    cm.update(HAND_GT, HAND_PRED)
    hand = compute_scores(cm, NAMES3)
    absent = ConfusionMatrix(3)
    absent.update(np.array([0, 1]), np.array([0, 1]))
    perfect = compute_scores(absent, NAMES3)

    table = format_scores_table({"hand": hand, "perfect_but_sparse": perfect})
    lines = table.splitlines()
    header = lines[1].split()
    assert header == ["method", "OA", "AA", "mIoU", "cov", "a", "b", "c"]
    assert lines[3].split() == ["hand", "60.0", "58.3", "44.4", "90.0", "40.0", "33.3", "60.0"]
    assert lines[4].split() == ["perfect_but_sparse"] + ["100.0"] * 6 + ["-"]
    # Columns are aligned: every row has the same length.
    assert len({len(line) for line in lines[1:]}) == 1

    single = format_scores_table(hand, name="only")
    assert single.splitlines()[3].split()[0] == "only"

    other = compute_scores(np.eye(2, dtype=np.int64), ["x", "y"])
    with pytest.raises(ValueError, match="same classes"):
        format_scores_table({"hand": hand, "other": other})


def test_dfc_table_uses_short_names() -> None:
    scores = compute_scores(np.eye(8, dtype=np.int64), list(DFC_CLASS_NAMES))
    header = format_scores_table(scores).splitlines()[1].split()
    assert header[5:] == ["Forest", "Shrub", "Grass", "Wetland", "Crop", "Urban", "Barren", "Water"]


def test_update_is_fast_enough_for_a_dfc_split() -> None:
    # 16 tiles of 256 x 256 should take milliseconds (DFC test = 5,128 tiles).
    import time

    rng = np.random.default_rng(2)
    gt = rng.integers(0, 8, size=(16, 256, 256), dtype=np.uint8)
    pred = rng.integers(0, 9, size=(16, 256, 256), dtype=np.uint8)
    cm = ConfusionMatrix(8)
    start = time.perf_counter()
    cm.update(gt, pred)
    assert time.perf_counter() - start < 2.0
    assert cm.evaluated_pixels == 16 * 256 * 256
