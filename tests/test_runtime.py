"""Threads and DataLoader workers from the machine (:mod:`weakseg.runtime`) and ``--threads`` on every command."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from weakseg import runtime
from weakseg.cli import build_parser, main
from weakseg.commands import COMMANDS
from weakseg.pipeline.pretrain import PretrainConfig
from weakseg.pipeline.refine import RefineConfig
from weakseg.pipeline.train import TrainConfig


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test leaves torch's pool and the two variables as it found them."""
    before = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", runtime.TOTAL_THREADS_ENV, "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    yield
    torch.set_num_threads(before)


def test_available_cpus_is_the_affinity_mask_not_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 7}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert runtime.available_cpus() == 3


def test_available_cpus_falls_back_to_cpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_affinity(pid: int) -> set[int]:
        raise OSError("not on this system")

    monkeypatch.setattr(os, "sched_getaffinity", no_affinity, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert runtime.available_cpus() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert runtime.available_cpus() == 1


def test_default_threads_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "available_cpus", lambda: 12)
    assert runtime.default_threads() == 12
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "three")  # not a number: ignored, not a crash
    assert runtime.default_threads() == 12
    monkeypatch.setenv("OMP_NUM_THREADS", "0")
    assert runtime.default_threads() == 12
    monkeypatch.setenv(runtime.TOTAL_THREADS_ENV, "5")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runtime.default_threads() == 2  # not a launched rank: a leftover total is not used
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.default_threads() == 5  # a DDP rank: the launching command's total wins


@pytest.mark.parametrize("cpus,processes,workers", [(1, 1, 0), (2, 1, 0), (7, 1, 0), (8, 1, 2), (12, 1, 3),
                                                    (16, 1, 4), (64, 1, 4), (16, 2, 2), (16, 4, 0)])
def test_default_num_workers(monkeypatch: pytest.MonkeyPatch, cpus: int, processes: int, workers: int) -> None:
    monkeypatch.setattr(runtime, "available_cpus", lambda: cpus)
    assert runtime.default_num_workers(processes) == workers


def test_config_defaults_take_workers_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "available_cpus", lambda: 16)
    refine = {"datadir": "d", "pseudomasks": "p", "output_dir": "o"}
    for config, required in ((TrainConfig, {}), (RefineConfig, refine), (PretrainConfig, {})):
        assert config(**required).num_workers == 4, config
        assert config(**required, num_workers=1).num_workers == 1
    monkeypatch.setattr(runtime, "available_cpus", lambda: 2)
    assert TrainConfig().num_workers == 0


@pytest.mark.parametrize("threads,processes,expected", [(4, 1, 4), (4, 2, 2), (5, 2, 2), (1, 2, 1), (3, 4, 1)])
def test_threads_are_shared_by_processes(threads: int, processes: int, expected: int) -> None:
    assert runtime.threads_per_process(threads, processes) == expected


def test_configure_threads_sets_torch_and_the_environment_for_children() -> None:
    assert runtime.configure_threads(4, num_processes=2) == 2
    assert torch.get_num_threads() == 2
    assert os.environ["OMP_NUM_THREADS"] == "2"
    assert os.environ[runtime.TOTAL_THREADS_ENV] == "4"
    # A DDP rank re-runs the command without --threads, with the launcher's environment: it takes its share of the
    # same total, not half of its already-halved OMP_NUM_THREADS.
    os.environ["LOCAL_RANK"] = "1"
    try:
        assert runtime.configure_threads(None, num_processes=2) == 2
        assert torch.get_num_threads() == 2
    finally:
        del os.environ["LOCAL_RANK"]
    assert runtime.configure_threads(3) == 3  # one process: the total is not passed on to what it starts
    assert runtime.TOTAL_THREADS_ENV not in os.environ and os.environ["OMP_NUM_THREADS"] == "3"


def test_configure_threads_refuses_zero() -> None:
    from weakseg.errors import ConfigError

    with pytest.raises(ConfigError, match="--threads must be at least 1"):
        runtime.configure_threads(0)


def test_every_command_has_a_threads_flag() -> None:
    parser = build_parser("all")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in COMMANDS:
        assert "--threads" in sub.choices[name]._option_string_actions, name


@pytest.mark.parametrize("value,message", [("0", "must be at least 1, got 0"),
                                           ("two", "expected a whole number of threads, got 'two'")])
def test_bad_threads_value_is_a_clear_usage_error(capsys: pytest.CaptureFixture[str], value: str,
                                                  message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--threads", value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_command_runs_with_the_threads_it_was_given(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    code = main(["-q", "make-data", str(tmp_path / "data"), "--train_tiles", "2", "--test_tiles", "1",
                 "--tile_size", "16", "--threads", "1"])
    assert code == 0
    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"
