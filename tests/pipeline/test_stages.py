"""Tests of weakseg.pipeline.stages: completion markers, fingerprints, reuse checks and invalidation."""

from __future__ import annotations

from pathlib import Path

import pytest

from weakseg.errors import ConfigError
from weakseg.pipeline.refine import RefineConfig
from weakseg.pipeline.stages import (
    DONE_FILE,
    check_reusable,
    invalidate_later_iterations,
    iteration_dir,
    mark_done,
    stage_fingerprint,
    unmark,
)


def make_cfg(tmp_path: Path, **kwargs) -> RefineConfig:
    return RefineConfig(datadir=str(tmp_path / "data"), pseudomasks=str(tmp_path / "pm"),
                        output_dir=str(tmp_path / "out"), **kwargs)


def test_fingerprint_records_min_confidence_and_lr_schedule(tmp_path: Path) -> None:
    fingerprint = stage_fingerprint(make_cfg(tmp_path, min_confidence=0.4, lr_schedule="constant"), None,
                                    supervised=False)
    assert fingerprint["min_confidence"] == 0.4 and fingerprint["lr_schedule"] == "constant"
    assert fingerprint["pseudomasks"] == str((tmp_path / "pm").resolve())
    # The supervised stage trains on the ground truth: neither the pseudomasks nor the threshold change it.
    supervised = stage_fingerprint(make_cfg(tmp_path, min_confidence=0.4), None, supervised=True)
    assert supervised["min_confidence"] is None and supervised["pseudomasks"] is None
    assert supervised == stage_fingerprint(make_cfg(tmp_path, min_confidence=0.9), None, supervised=True)


def test_changed_min_confidence_refuses_reuse(tmp_path: Path) -> None:
    stage = tmp_path / "out" / "iter1"
    stage.mkdir(parents=True)
    recorded = stage_fingerprint(make_cfg(tmp_path, min_confidence=0.0), None, supervised=False)
    mark_done(stage, {"stage": "iter1", "fingerprint": recorded})
    assert check_reusable(stage, recorded)["stage"] == "iter1"
    current = stage_fingerprint(make_cfg(tmp_path, min_confidence=0.5), None, supervised=False)
    message = r"iter1 was finished with other settings \(min_confidence: 0.0 then, 0.5 now\); choose a new"
    with pytest.raises(ConfigError, match=message):
        check_reusable(stage, current)


def test_stage_without_marker_is_unfinished(tmp_path: Path) -> None:
    stage = tmp_path / "iter1"
    stage.mkdir()
    fingerprint = stage_fingerprint(make_cfg(tmp_path), None, supervised=False)
    assert check_reusable(stage, fingerprint) is None
    mark_done(stage, {"fingerprint": fingerprint})
    unmark(stage)
    assert check_reusable(stage, fingerprint) is None
    (stage / DONE_FILE).write_text("{truncated")  # unreadable: as unfinished
    assert check_reusable(stage, fingerprint) is None


def test_invalidate_later_iterations_unmarks_only_later_ones(tmp_path: Path) -> None:
    for i in range(4):
        mark_done(iteration_dir(tmp_path, i), {"stage": f"iter{i}"})
    (tmp_path / "iterations_notes").mkdir()  # not an iteration folder
    invalidate_later_iterations(tmp_path, 1)
    assert [(iteration_dir(tmp_path, i) / DONE_FILE).exists() for i in range(4)] == [True, True, False, False]
