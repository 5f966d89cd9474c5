"""Plain-text tables and progress lines for pipeline results (refinement summary; reusable by a demo).

Values are printed in percent with one decimal and ``-`` for "not available", the convention of
:func:`weakseg.evaluation.metrics.format_scores_table`, so every table of a run reads the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: How tables name the logged metric that chose a checkpoint.
_SCORE_NAMES = {"map": "mAP", "loss": "BCE", "bce": "BCE", "macro_f1": "macro F1"}


def score_name(monitor: str | None) -> str:
    """``val_map`` -> "mAP", ``val_loss`` -> "BCE", ``val_macro_f1`` -> "macro F1" (None: "score")."""
    if not monitor:
        return "score"
    return _SCORE_NAMES.get(monitor.split("_", 1)[1] if "_" in monitor else monitor, monitor)


def percent(value: float | None) -> str:
    """``0.755`` -> ``"75.5"``; None -> ``"-"``."""
    return "-" if value is None else f"{100 * value:.1f}"


def render_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """Header line, a rule, then the body lines; first column left-aligned, the others right-aligned."""
    rows = [list(header), *(list(line) for line in body)]
    widths = [max(len(line[c]) for line in rows) for c in range(len(header))]

    def render(line: list[str]) -> str:
        cells = [value.rjust(width) for value, width in zip(line[1:], widths[1:], strict=True)]
        return "  ".join([line[0].ljust(widths[0]), *cells])

    lines = [render(line) for line in rows]
    return [lines[0], "-" * len(lines[0]), *lines[1:]]


def format_refine_table(summary: dict[str, Any]) -> str:
    """Stage | train-tile mIoU/OA/AA | eval-split mIoU/OA/AA [| ignored], in percent ('-' = not available).

    The last column, the share of target pixels the loss ignored (unlabelled or below ``min_confidence``),
    appears when some stage records it; summaries of runs made before it existed have none.
    """
    rows = [(f"iter{e['iteration']}", e) for e in summary.get("iterations") or []]
    if summary.get("supervised"):
        rows.append(("supervised", summary["supervised"]))
    show_ignored = any(e.get("ignored_fraction") is not None for _, e in rows)
    show_alone = any(e.get("eval_unet_alone_scores") for _, e in rows)
    header = ["stage", "train mIoU", "train OA", "train AA", "eval mIoU", "eval OA", "eval AA"]
    if show_alone:
        header.append("eval mIoU, UNet alone")
    if show_ignored:
        header.append("ignored")
    body = []
    for name, e in rows:
        train, held_out = e.get("train_scores") or {}, e.get("eval_scores") or {}
        line = ([name] + [percent(train.get(k)) for k in ("miou", "oa", "aa")]
                + [percent(held_out.get(k)) for k in ("miou", "oa", "aa")])
        if show_alone:
            line.append(percent((e.get("eval_unet_alone_scores") or {}).get("miou")))
        if show_ignored:
            line.append(percent(e.get("ignored_fraction")))
        body.append(line)
    title = f"scores in % on the training tiles of {summary.get('split')!r} (pseudo-label quality)"
    if summary.get("eval_split"):
        title += f" and on {summary['eval_split']!r} (segmentation quality)"
    if show_alone:
        title += "; predictions weighted by the classifier's image-label probabilities, 'UNet alone' without"
    if show_ignored:
        title += "; ignored: % of target pixels the loss ignored"
    return "\n".join([title, *render_table(header, body)])


def refine_progress_line(name: str, entry: dict[str, Any], eval_split: str | None, epochs: int,
                         tiles: int) -> str:
    """One line per finished stage, e.g. ``iteration 1/2: 30 epochs on 8 tiles in 4.2 s (loss 0.812), ignored
    12.5 % of target pixels | train tiles mIoU ...``."""
    if entry["resumed"]:
        what = "finished earlier, skipped"
    elif entry["train_seconds"] is None:
        what = "input pseudomasks"
    else:
        loss = entry["train_loss"]
        what = (f"{epochs} epochs on {tiles} tiles in {entry['train_seconds']:.1f} s"
                + (f" (loss {loss:.3f})" if loss is not None else ""))
    if entry.get("ignored_fraction") is not None:
        what += f", ignored {percent(entry['ignored_fraction'])}% of target pixels"
    parts = [f"{name}: {what}"]
    train, held_out = entry["train_scores"], entry["eval_scores"]
    if train is not None:
        parts.append(f"train tiles mIoU {percent(train['miou'])}% OA {percent(train['oa'])}% "
                     f"AA {percent(train['aa'])}%")
    if held_out is not None:
        parts.append(f"{eval_split} mIoU {percent(held_out['miou'])}%")
    return " | ".join(parts)


def format_comparison_table(rows: list[dict[str, Any]], best: dict[str, Any]) -> str:
    """The table of :func:`weakseg.pipeline.comparison.run_comparison`.

    One group of rows per classifier checkpoint (its title gives the epoch, the holdout score that chose it and heads pruned of
    that checkpoint), then the refined rows of the best pipeline and the supervised upper bound, then the best
    pipeline. Columns: OA, AA, mIoU of the pseudomasks on the ``validation:train`` tiles, mIoU on the holdout
    (what chose the best pipeline) and the UNet's mIoU on ``test``.
    """
    header = ["method", "OA", "AA", "mIoU", "holdout", "test mIoU", "UNet alone"]
    titles: dict[int, str] = {}  # body index -> group title printed above it
    body: list[list[str]] = []
    current = None
    for r in rows:
        method = r["method"]
        refines_best = r.get("refines") is None or (r.get("refines") == best.get("method")
                                                     and r["classifier"] == best.get("classifier"))
        group = (("refined" if refines_best else f"refined:{r['classifier']}:{r.get('refines')}")
                 if method.startswith("refined") else method if method == "supervised" else r["classifier"])
        if group != current:
            current = group
            if group == "refined":
                titles[len(body)] = f"refined with a UNet: {best['label']}"
            elif group.startswith("refined:"):
                titles[len(body)] = f"refined with a UNet: {r['classifier_label']} + {r.get('refines_label')}"
            elif group == "supervised":
                titles[len(body)] = "trained on the ground truth"
            else:
                score = r.get("checkpoint_score")
                titles[len(body)] = (f"{r['classifier_label']}: checkpoint of epoch {r.get('epoch')}, holdout "
                                     f"{score_name(r.get('checkpoint_metric'))} "
                                     f"{'-' if score is None else f'{score:.3f}'}, heads pruned {r['pruned']}")
        train, holdout, test, alone = r.get("train") or {}, r.get("holdout"), r.get("test"), r.get("test_unet_alone")
        body.append(["  " + r["label"], percent(train.get("oa")), percent(train.get("aa")), percent(train.get("miou")),
                     percent(holdout.get("miou")) if holdout else "", percent(test.get("miou")) if test else "",
                     percent(alone.get("miou")) if alone else ""])
    rendered = render_table(header, body)
    lines = [
        "Pseudomask quality (%) on the 'validation:train' tiles with predicted labels; 'holdout' = mIoU on the",
        "'validation:holdout' tiles, which chose the best pipeline; 'test mIoU' = the method applied to the 'test'",
        "tiles, or for the UNets their prediction x the classifier's labels there; 'UNet alone' = the UNet's argmax.",
        "",
        *rendered[:2],
    ]
    for i, line in enumerate(rendered[2:]):
        if i in titles:
            lines.append(titles[i])
        lines.append(line)
    lines += ["", f"best pipeline (chosen on the holdout, mIoU {percent(best['holdout_miou'])}): {best['label']}"]
    return "\n".join(lines)
