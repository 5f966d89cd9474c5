"""Tests of weakseg.pipeline.run_figures: the seeded tile sample and that a drawing failure never fails a run."""

from __future__ import annotations

import csv
import json
import logging
import tracemalloc
from pathlib import Path

import pytest

from weakseg.pipeline import run_figures
from weakseg.pipeline.run_figures import (
    _guarded,
    sample_tiles,
    write_refine_figures,
    write_train_figures,
)


pytestmark = pytest.mark.figures


def test_sample_is_fixed_distinct_sorted_and_capped() -> None:
    picks = sample_tiles(50, 4)
    assert picks == sample_tiles(50, 4) and picks == sorted(picks) and len(set(picks)) == 4
    assert all(0 <= i < 50 for i in picks)
    assert sample_tiles(50, 4, seed=1) != picks  # the seed decides
    assert sample_tiles(3, 10) == [0, 1, 2] and sample_tiles(0, 4) == [] and sample_tiles(5, 0) == []


def test_sample_prefers_tiles_with_two_classes_within_a_budget() -> None:
    two = {7, 13, 21, 40}
    picks = sample_tiles(50, 3, has_two_classes=lambda i: i in two)
    assert set(picks) <= two and len(picks) == 3
    # Fewer such tiles than asked for: all of them, then the others in the seeded order.
    picks = sample_tiles(50, 6, has_two_classes=lambda i: i == 13)
    assert 13 in picks and len(picks) == 6
    # The rule is asked about at most 25 tiles per tile wanted, not the whole split.
    asked: list[int] = []
    sample_tiles(10_000, 2, has_two_classes=lambda i: asked.append(i) is not None)
    assert len(asked) == 50


def test_a_drawing_error_is_a_warning_and_no_files(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> list:
        raise ValueError("bad data")

    with caplog.at_level(logging.WARNING, logger="weakseg"):
        assert _guarded("weakseg train", broken) == []
    assert "weakseg train: figures not drawn (ValueError: bad data)" in caplog.text


def test_train_figures_of_a_run_without_metrics_warn_instead_of_failing(tmp_path, caplog) -> None:
    summary = {"metrics_csv": str(tmp_path / "metrics.csv"), "best": None, "best_checkpoint": ""}
    with caplog.at_level(logging.WARNING, logger="weakseg"):
        assert write_train_figures(tmp_path, summary) == []
    assert "figures not drawn" in caplog.text and "metrics.csv" in caplog.text
    assert write_train_figures(tmp_path, summary, enabled=False) == []


def test_refine_figures_disabled_read_nothing(tmp_path) -> None:
    class NoReader:
        def __len__(self) -> int:
            raise AssertionError("the reader must not be touched with figures off")

    assert write_refine_figures(tmp_path, json.loads("{}"), NoReader(), 4, enabled=False) == []


def test_the_figures_read_only_the_manifest_rows_of_the_picked_tiles(tmp_path: Path) -> None:
    """A manifest of 5,000 rows (~2 kB each as dicts, ~10 MB together): the pick keeps the skipped ids and the
    rows of the drawn tiles only (issue 12: memory flat in the number of tiles)."""
    fields = ["id", "status", "reason", "labels", "probabilities"]
    with (tmp_path / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for k in range(5000):
            w.writerow({"id": f"t{k}", "status": "skipped" if k in (3, 4000) else "ok", "reason": "r" * 40,
                        "labels": "Forest;Water", "probabilities": ";".join(f"c{c}=0.{c}000" for c in range(8))})
    tracemalloc.start()
    try:
        skipped, rows = run_figures._skipped_ids(tmp_path), run_figures._manifest(tmp_path, {"t7", "t4999"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert skipped == {"t3", "t4000"}
    assert sorted(rows) == ["t4999", "t7"] and rows["t7"]["labels"] == "Forest;Water"
    assert peak < 2**20, f"peak {peak / 2**20:.1f} MB"
    assert run_figures._manifest(tmp_path / "none", {"t7"}) == {}
    assert run_figures._skipped_ids(tmp_path / "none") == set()
