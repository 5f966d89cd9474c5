"""Warnings, with numbers, when a classifier learned nothing useful or pruning left a method nothing to read.

On a user's own data a run can "succeed" and still be useless: the classifier learned only how often each class
occurs (every image gets the same label set with near-identical probabilities), pruning closed no head, or it
closed every head of the block a pseudomask method reads. Nothing fails, and pseudomasks made from such a model are
noise. These checks run at the end of ``weakseg train`` (on the holdout, with the chosen checkpoint) and again
before ``weakseg pseudomasks`` (the pruning check on the loaded model; the classifier checks repeated from the
training run's ``summary.json``), and each message says what to try.

**Class-frequency baseline.** The constant predictor that gives every image the training frequency of each class
is what a classifier that learned nothing about the images converges to under BCE. Its holdout BCE is the bar:
a classifier whose holdout BCE is not at least :data:`BASELINE_MARGIN` below it has learned nothing beyond those
frequencies. The mAP of a constant predictor is the mean class prevalence (every image ties), printed beside it.

**Near-constant predictions.** The largest per-class standard deviation of the predicted probabilities across the
holdout images below :data:`CONSTANT_SPREAD` means every image gets (almost) the same probabilities.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("weakseg")

#: Relative BCE improvement over the class-frequency baseline a classifier must reach not to be warned about.
BASELINE_MARGIN = 0.02
#: Largest per-class standard deviation of the probabilities across images below which predictions are constant.
CONSTANT_SPREAD = 0.02

_TRY_LEARNING = ("try: more epochs or tiles, another --learning_rate (x3 or /3), --normalization standardize, "
                 "and check that the labels belong to the images (labels.csv ids, class order)")


def classifier_checks(probs: Tensor, targets: Tensor, train_frequency: Tensor | None,
                      split: str = "holdout") -> dict[str, Any]:
    """Compare a classifier's probabilities on ``split`` with the class-frequency baseline.

    Args:
        probs: (N, C) predicted probabilities.
        targets: (N, C) 0/1 image labels.
        train_frequency: (C,) fraction of training images holding each class; None uses the frequencies of
            ``targets`` themselves (the best constant predictor of this split: a stricter bar).
        split: name of the split, for messages.

    Returns:
        ``{"bce", "baseline_bce", "map", "baseline_map", "spread", "modal_label_set_share", "warnings"}``;
        ``warnings`` is a list of messages (empty when the classifier passes).
    """
    probs = probs.double().clamp(1e-7, 1 - 1e-7)  # (N, C)
    targets = targets.double()  # (N, C)
    n, c = probs.shape
    freq = (targets.mean(0) if train_frequency is None else train_frequency.double()).clamp(1e-4, 1 - 1e-4)
    bce = float(torch.nn.functional.binary_cross_entropy(probs, targets))
    baseline_bce = float(torch.nn.functional.binary_cross_entropy(freq.expand(n, c), targets))
    present = targets.sum(0) > 0  # AP is undefined for a class absent from the split
    ap = [average_precision(probs[:, k], targets[:, k]) for k in range(c) if present[k]]
    m_ap = float(sum(ap) / len(ap)) if ap else math.nan
    baseline_map = float(targets.mean(0)[present].mean()) if ap else math.nan
    spread = float(probs.std(0, unbiased=False).max()) if n > 1 else math.nan
    label_sets = [tuple(row) for row in (probs > 0.5).int().tolist()]
    modal_share = max(label_sets.count(s) for s in set(label_sets)) / n if n else math.nan
    warnings: list[str] = []
    if n and not bce < (1 - BASELINE_MARGIN) * baseline_bce:
        warnings.append(
            f"the classifier does not beat the class-frequency baseline on {split!r}: BCE {bce:.4f} vs "
            f"{baseline_bce:.4f} for predicting each class's training frequency on every image (mAP {m_ap:.3f} vs "
            f"{baseline_map:.3f}); it has learned how often classes occur, not what they look like, and masks "
            f"made from it are not meaningful; {_TRY_LEARNING}"
        )
    if n > 1 and spread < CONSTANT_SPREAD:
        warnings.append(
            f"predictions are near-constant across {split!r}: no class's probability varies by more than "
            f"{spread:.3f} (std) over its {n} images, and {100 * modal_share:.0f}% of them get the same predicted "
            f"label set; {_TRY_LEARNING}"
        )
    return {"bce": bce, "baseline_bce": baseline_bce, "map": m_ap, "baseline_map": baseline_map,
            "spread": spread, "modal_label_set_share": modal_share, "warnings": warnings}


def average_precision(scores: Tensor, target: Tensor) -> float:
    """Average precision of one class (N,) with tied scores counted together (a constant score -> prevalence)."""
    order = torch.argsort(scores, descending=True)
    s, t = scores[order], target[order]
    # Close each group of equal scores at its last element, so ties share one precision/recall point.
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tp = torch.cumsum(t, 0)[last]
    seen = torch.arange(1, len(s) + 1, dtype=torch.float64)[last]
    precision = tp / seen
    recall_gain = torch.diff(tp, prepend=tp.new_zeros(1)) / t.sum()
    return float((precision * recall_gain).sum())


def pruning_checks(head_mask: Tensor, gated: bool, needs: dict[str, list[int]]) -> list[str]:
    """Warnings when pruning closed no head, or every head of a block a method reads.

    Args:
        head_mask: (depth, heads) bool, the eval state of the gates (True = open).
        gated: whether the classifier was trained with gates at all (no gates: nothing to check).
        needs: method name -> blocks whose kept heads it reads (:meth:`PseudomaskMethod.attention_blocks`).
    """
    if not gated:
        return []
    messages: list[str] = []
    depth, heads = head_mask.shape
    if bool(head_mask.all()):
        messages.append(
            f"pruning closed no head (all {depth * heads} gates open): the L0 penalty had no effect; try a larger "
            "--target_pruned_fraction or --pr_rate, or more steps"
        )
    closed = [b for b in range(depth) if not bool(head_mask[b].any())]
    for method, blocks in needs.items():
        dead = [b for b in blocks if b in closed]
        if not dead:
            continue
        every = len(dead) == len(blocks)
        messages.append(
            f"pruning closed every head of block(s) {dead}, which --method {method} reads ({blocks}): "
            + ("it has no attention left and every tile falls back to its top class" if every else
               "those blocks contribute nothing to its maps")
            + "; try a smaller --target_pruned_fraction or --pr_rate, or --blocks with blocks that kept heads"
        )
    return messages


def method_needs(arch: str, depth: int) -> dict[str, list[int]]:
    """Blocks each method that reads ``arch`` classifiers needs with its default options (methods reading none
    left out)."""
    from weakseg.methods import METHODS

    runners = [cls() for cls in METHODS.values() if arch in cls.architectures]
    return {r.name: blocks for r in runners if (blocks := r.attention_blocks(depth))}


def report(messages: list[str], where: str) -> None:
    """Log each message as a warning, prefixed with the stage it comes from."""
    for message in messages:
        log.warning("warning (%s): %s", where, message)


def warn_before_pseudomasks(task: Any, runner: Any, checkpoint: Path) -> list[str]:
    """The checks that apply before ``weakseg pseudomasks`` with ``runner`` on ``checkpoint``; logged and returned.

    The pruning check runs on the loaded model; the classifier checks are those ``weakseg train`` recorded for this
    checkpoint in its run's ``summary.json`` (when the checkpoint is still in its run folder).
    """
    model = task.model
    blocks = runner.attention_blocks(model.cfg.depth)
    messages = pruning_checks(model.head_mask().cpu(), bool(model.cfg.gated), {runner.name: blocks} if blocks else {})
    messages += recorded_classifier_warnings(checkpoint)
    report(messages, f"classifier {checkpoint}")
    return messages


def recorded_classifier_warnings(checkpoint: Path) -> list[str]:
    """Classifier warnings that ``weakseg train`` wrote for ``checkpoint`` into ``<run>/summary.json``."""
    import json

    summary = Path(checkpoint).resolve().parent.parent / "summary.json"
    try:
        data = json.loads(summary.read_text())
    except (OSError, ValueError):
        return []
    sanity = data.get("sanity") or {}
    if Path(sanity.get("checkpoint", "")).resolve() != Path(checkpoint).resolve():
        return []
    return list((sanity.get("classifier") or {}).get("warnings") or [])
