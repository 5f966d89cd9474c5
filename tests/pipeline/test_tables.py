"""Tests of weakseg.pipeline.tables: the refinement table and progress line."""

from __future__ import annotations

from weakseg.pipeline.tables import format_refine_table, percent, refine_progress_line, render_table

SCORES = {"miou": 0.5, "oa": 0.755, "aa": 0.25, "coverage": 1.0}


def test_refine_table_shows_the_ignored_fraction_per_stage() -> None:
    summary = {"split": "validation", "eval_split": None,
               "iterations": [{"iteration": 0, "train_scores": SCORES, "eval_scores": None,
                               "ignored_fraction": None},
                              {"iteration": 1, "train_scores": SCORES, "eval_scores": None,
                               "ignored_fraction": 0.3125}],
               "supervised": {"iteration": "supervised", "train_scores": SCORES, "eval_scores": None,
                              "ignored_fraction": 0.0}}
    lines = format_refine_table(summary).splitlines()
    assert "ignored" in lines[0] and lines[1].split()[-1] == "ignored"
    assert lines[3].split() == ["iter0", "50.0", "75.5", "25.0", "-", "-", "-", "-"]
    assert lines[4].split() == ["iter1", "50.0", "75.5", "25.0", "-", "-", "-", "31.2"]
    assert lines[5].split() == ["supervised", "50.0", "75.5", "25.0", "-", "-", "-", "0.0"]


def test_progress_line_gives_the_ignored_fraction() -> None:
    entry = {"resumed": False, "train_seconds": 1.25, "train_loss": 0.5, "ignored_fraction": 0.3125,
             "train_scores": SCORES, "eval_scores": None}
    line = refine_progress_line("iteration 1/2", entry, None, epochs=3, tiles=24)
    assert line.startswith("iteration 1/2: 3 epochs on 24 tiles in 1.2 s (loss 0.500), ignored 31.2% of")
    assert "train tiles mIoU 50.0% OA 75.5% AA 25.0%" in line


def test_render_table_aligns_columns() -> None:
    assert render_table(["a", "bb"], [["long", percent(0.5)], ["x", percent(None)]]) == [
        "a       bb", "----------", "long  50.0", "x        -"]
