"""Confusion matrix and segmentation scores: OA, AA, per-class recall and IoU, mIoU, coverage.

Conventions (``datasets.md`` section 4, ``sparse_vit.md`` section 6): one confusion matrix is accumulated over
**all evaluated pixels of all images** (no per-image averaging), with rows = ground truth and columns =
prediction. Ground-truth pixels equal to :data:`~weakseg.data.classes.IGNORE_INDEX` (255) are dropped.

- OA = trace / total.
- AA = mean per-class recall over the classes present in the ground truth. This is the official score of the
  IEEE GRSS Data Fusion Contest 2020 (Robinson et al., "Global Land-Cover Mapping With Weak Supervision:
  Outcome of the 2020 IEEE GRSS Data Fusion Contest", IEEE JSTARS 2021; contest ranking by AA). The sparse ViT
  paper (Hanna, Mommert and Borth, "Sparse Multimodal Vision Transformer for Weakly Supervised Semantic
  Segmentation", CVPRW 2023) evaluates on DFC2020; its code computes no metric, hence this module.
- IoU_c = CM[c, c] / (row_c + col_c - CM[c, c]); mIoU = mean IoU over the classes with row_c + col_c > 0.
  A class absent from both ground truth and prediction has no defined IoU and is **excluded**; the DFC2020
  baseline code counts it as 0, which deflates mIoU on splits where a class does not occur.

**Unlabelled predictions.** A method may leave pixels unlabelled (255, e.g. a pseudomask method that skips
uncertain pixels). Such a pixel, and any predicted id outside ``0..K-1``, counts as *wrong* for its
ground-truth class (it lowers that class's recall and IoU, and OA) and is also reported separately as
``unlabelled_pixels`` and ``coverage = 1 - unlabelled / evaluated``, so a sparse but precise method is neither
rewarded for abstaining nor hidden. Counting ids outside ``0..K-1`` as unlabelled keeps
:class:`ConfusionMatrix` total for library callers (e.g. batches of model outputs); files scored by ``weakseg
evaluate`` (:mod:`weakseg.evaluation.compare`) never get this far with such values: they are refused with the
file name and the offending values, because there they mean a wrong class list or no-data convention, not
abstention.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from weakseg.data.classes import IGNORE_INDEX
from weakseg.errors import DataError

#: Column headers for the DFC2020 classes in text tables (full names make tables too wide to read).
SHORT_CLASS_NAMES: dict[str, str] = {
    "Forest": "Forest",
    "Shrubland": "Shrub",
    "Grassland": "Grass",
    "Wetlands": "Wetland",
    "Croplands": "Crop",
    "Urban/Built-up": "Urban",
    "Barren": "Barren",
    "Water": "Water",
}


class ConfusionMatrix:
    """Accumulates a K x K pixel confusion matrix (rows = ground truth, columns = prediction) over images.

    Attributes:
        num_classes: K.
        matrix: ``np.int64 (K, K)``; ``matrix[g, p]`` counts pixels of ground-truth class g predicted as p.
        unlabelled_by_class: ``np.int64 (K,)``; pixels of ground-truth class g whose prediction was 255 or any
            id outside ``0..K-1``. They belong to row g (they are errors) but to no column.
        ignored_pixels: ground-truth pixels equal to 255 that were dropped.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.unlabelled_by_class = np.zeros(self.num_classes, dtype=np.int64)
        self.ignored_pixels = 0

    @property
    def unlabelled_pixels(self) -> int:
        """Evaluated pixels whose prediction was unlabelled (255) or an id >= K."""
        return int(self.unlabelled_by_class.sum())

    @property
    def evaluated_pixels(self) -> int:
        """Pixels with a valid ground-truth class, including those with an unlabelled prediction."""
        return int(self.matrix.sum()) + self.unlabelled_pixels

    def reset(self) -> None:
        """Zero all counts."""
        self.matrix[:] = 0
        self.unlabelled_by_class[:] = 0
        self.ignored_pixels = 0

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one image (or a batch: any shape, as long as ``gt`` and ``pred`` match).

        Args:
            gt: integer ground truth, ids ``0..K-1`` or 255 (dropped).
            pred: integer prediction; 255, negative ids and ids >= K count as unlabelled (wrong for their
                ground-truth class).

        Raises:
            ValueError: the shapes differ (a caller bug; :mod:`weakseg.evaluation.compare` checks sizes first
                and names the files).
            DataError: the ground truth holds ids that are neither a class nor 255.
        """
        gt = np.asarray(gt)
        pred = np.asarray(pred)
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth shape {gt.shape} differs from prediction shape {pred.shape}")
        if not np.issubdtype(pred.dtype, np.integer):
            raise DataError(f"predictions must hold integer class ids, got dtype {pred.dtype}")
        k = self.num_classes
        gt_flat = gt.reshape(-1).astype(np.int64, copy=False)  # (P,)
        pred_flat = pred.reshape(-1).astype(np.int64, copy=False)  # (P,)

        keep = gt_flat != IGNORE_INDEX
        self.ignored_pixels += int(gt_flat.size - np.count_nonzero(keep))
        gt_flat = gt_flat[keep]
        pred_flat = pred_flat[keep]
        if gt_flat.size == 0:
            return
        bad_gt = (gt_flat < 0) | (gt_flat >= k)
        if bad_gt.any():
            bad_ids = np.unique(gt_flat[bad_gt])[:10].tolist()
            raise DataError(
                f"ground truth holds ids {bad_ids} that are neither a class id 0..{k - 1} "
                f"nor the ignore index {IGNORE_INDEX}"
            )
        # Every invalid prediction lands in one extra column K, so a single bincount counts everything.
        pred_flat = np.where((pred_flat >= 0) & (pred_flat < k), pred_flat, k)
        counts = np.bincount(gt_flat * (k + 1) + pred_flat, minlength=k * (k + 1)).reshape(k, k + 1)
        self.matrix += counts[:, :k]
        self.unlabelled_by_class += counts[:, k]

    def merge(self, other: ConfusionMatrix) -> None:
        """Add the counts of another matrix with the same K (e.g. from another worker)."""
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one"
            )
        self.matrix += other.matrix
        self.unlabelled_by_class += other.unlabelled_by_class
        self.ignored_pixels += other.ignored_pixels


def _ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator as a Python float, or None (JSON null) when undefined."""
    return float(numerator) / float(denominator) if denominator > 0 else None


def _mean_defined(values: Sequence[float | None]) -> float | None:
    """Mean of the defined values (None = absent class, excluded rather than counted as 0)."""
    defined = [v for v in values if v is not None]
    return float(sum(defined) / len(defined)) if defined else None


def compute_scores(cm: ConfusionMatrix | np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """OA, AA, per-class recall and IoU, mIoU, pixel counts and coverage of a confusion matrix.

    Args:
        cm: a :class:`ConfusionMatrix`, or a plain ``(K, K)`` count array (then nothing is unlabelled).
        class_names: K names, in class-id order.

    Returns:
        A JSON-serialisable dict (Python ints/floats/lists; undefined values are ``None``):
        ``oa``, ``aa``, ``miou`` (fractions in [0, 1]); ``class_names``; per-class lists aligned with it:
        ``recall`` (None where the class is absent from the ground truth), ``iou`` (None where the class is
        absent from ground truth and prediction), ``gt_pixels`` (row sums, unlabelled included),
        ``pred_pixels`` (column sums), ``correct_pixels``, ``unlabelled_by_class``; totals
        ``evaluated_pixels``, ``correct_pixels_total``, ``ignored_pixels``, ``unlabelled_pixels``;
        ``coverage`` (labelled fraction of the evaluated pixels); ``classes_in_gt`` (how many classes AA
        averages) and ``classes_in_miou``; ``confusion_matrix`` (K x K nested lists).
    """
    if isinstance(cm, ConfusionMatrix):
        matrix = cm.matrix
        unlabelled = cm.unlabelled_by_class
        ignored = cm.ignored_pixels
    else:
        matrix = np.asarray(cm)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"confusion matrix must be square (K, K), got shape {matrix.shape}")
        matrix = matrix.astype(np.int64)
        unlabelled = np.zeros(matrix.shape[0], dtype=np.int64)
        ignored = 0
    num_classes = matrix.shape[0]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a {num_classes}-class confusion matrix")

    correct = np.diag(matrix)  # (K,)
    gt_pixels = matrix.sum(axis=1) + unlabelled  # (K,) row sums; unlabelled pixels are errors of their row
    pred_pixels = matrix.sum(axis=0)  # (K,) column sums
    evaluated = int(gt_pixels.sum())
    unlabelled_total = int(unlabelled.sum())

    recall = [_ratio(correct[c], gt_pixels[c]) for c in range(num_classes)]
    iou = [_ratio(correct[c], gt_pixels[c] + pred_pixels[c] - correct[c]) for c in range(num_classes)]
    return {
        "oa": _ratio(correct.sum(), evaluated),
        "aa": _mean_defined(recall),
        "miou": _mean_defined(iou),
        "class_names": [str(name) for name in class_names],
        "recall": recall,
        "iou": iou,
        "gt_pixels": gt_pixels.tolist(),
        "pred_pixels": pred_pixels.tolist(),
        "correct_pixels": correct.tolist(),
        "unlabelled_by_class": unlabelled.tolist(),
        "evaluated_pixels": evaluated,
        "correct_pixels_total": int(correct.sum()),
        "ignored_pixels": int(ignored),
        "unlabelled_pixels": unlabelled_total,
        "coverage": _ratio(evaluated - unlabelled_total, evaluated),
        "classes_in_gt": sum(v is not None for v in recall),
        "classes_in_miou": sum(v is not None for v in iou),
        "confusion_matrix": matrix.tolist(),
    }


def short_class_name(name: str, max_len: int = 7) -> str:
    """A table header for a class: the DFC abbreviation, else the first word cut to ``max_len``."""
    if name in SHORT_CLASS_NAMES:
        return SHORT_CLASS_NAMES[name]
    first_word = name.replace("/", " ").replace("_", " ").split()
    return (first_word[0] if first_word else name)[:max_len]


def _is_scores(obj: Mapping[str, Any]) -> bool:
    """Whether ``obj`` is one :func:`compute_scores` dict rather than a mapping of name -> scores."""
    return "miou" in obj and "class_names" in obj


def _percent(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100.0 * value:.1f}"


def format_scores_table(scores: Mapping[str, Any], name: str = "prediction") -> str:
    """Format one or several score dicts as a plain-text table, one row per method, values in percent.

    Columns: OA, AA, mIoU, coverage, then the IoU of every class under a short name. Undefined values (an
    absent class) print as ``-``.

    Args:
        scores: one :func:`compute_scores` dict, or a mapping ``{method name: scores dict}`` (row order kept).
        name: the row name when a single scores dict is given.

    Raises:
        ValueError: the score dicts have different class names (they cannot share columns).
    """
    rows: dict[str, Mapping[str, Any]] = {name: scores} if _is_scores(scores) else dict(scores)
    if not rows:
        return "(no results)"
    class_names = next(iter(rows.values()))["class_names"]
    for row_name, row in rows.items():
        if row["class_names"] != class_names:
            raise ValueError(
                f"scores of {row_name!r} have classes {row['class_names']}, expected {class_names}; "
                "only scores over the same classes can share a table"
            )

    header = ["method", "OA", "AA", "mIoU", "cov"] + [short_class_name(c) for c in class_names]
    body = [
        [str(row_name)]
        + [_percent(row[key]) for key in ("oa", "aa", "miou", "coverage")]
        + [_percent(v) for v in row["iou"]]
        for row_name, row in rows.items()
    ]
    widths = [max(len(line[col]) for line in [header, *body]) for col in range(len(header))]

    def render(line: list[str]) -> str:
        first = line[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    separator = "-" * len(render(header))
    title = "scores in % (OA, AA, mIoU, coverage; then IoU per class; '-' = class absent)"
    return "\n".join([title, render(header), separator, *(render(line) for line in body)])
