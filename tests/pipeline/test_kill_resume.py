"""Real SIGKILLs: `weakseg train --resume` and a re-run of `weakseg refine` continue where a killed run stopped.

Each test runs the real CLI in a subprocess (no terminal, so it also checks that the logs are plain lines, not
progress-bar redraws), kills it with SIGKILL as soon as it has committed its first unit of work (an epoch's
``last.ckpt``, an iteration's ``done.json``), then runs it again.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_VIT_FLAGS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def weakseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "weakseg.cli", *args]


def run_until(argv: list[str], done: Path, timeout: float = 120) -> subprocess.Popen:
    """Start ``argv`` and SIGKILL it as soon as ``done`` exists; fail if it finishes first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = time.time()
    while not done.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {done} appeared:\n{proc.stdout.read()[-3000:]}")  # type: ignore[union-attr]
        if time.time() - start > timeout:
            proc.kill()
            pytest.fail(f"{done} did not appear within {timeout} s")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return proc


def run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def test_train_killed_after_an_epoch_resumes_from_it_and_keeps_every_metrics_row(tiny_dfc: Path,
                                                                                tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = [f for f in TINY_VIT_FLAGS if f not in ("--num_epochs", "1")]
    argv = weakseg("train", "--datadir", str(tiny_dfc), "--output_dir", str(out), "--num_epochs", "12", *flags)
    run_until(argv, out / "checkpoints" / "last.ckpt")
    killed_epoch = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"]
    assert killed_epoch < 11  # it really was killed in the middle
    resumed = run([*argv, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Plain lines off a terminal: one per epoch, no carriage-return progress bars.
    assert "\r" not in resumed.stdout + resumed.stderr
    assert "classifier epoch 12/12" in resumed.stderr
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 11  # the last epoch, 0-based
    with (out / "metrics.csv").open() as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f) if r.get("val_macro_f1")]
    assert epochs == list(range(12))  # every epoch's validation row, once, the killed run's rows kept
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"]["epoch"] <= 11 and not (out / ".weakseg.lock").exists()


def test_refine_killed_after_iteration_1_keeps_it_and_finishes_iteration_2(tiny_dfc: Path, tmp_path: Path) -> None:
    out = tmp_path / "refine"
    argv = weakseg("refine", "--datadir", str(tiny_dfc), "--supervised", "--split", "validation", "--output",
                   str(out), "--epochs", "1", "--widths", "4", "8")
    # The supervised stage first: then an iteration run is killed after iteration 1 and resumed.
    assert run(argv).returncode == 0
    masks = out / "supervised" / "masks"
    iterations = weakseg("refine", "--datadir", str(tiny_dfc), "--pseudomasks", str(masks), "--split",
                         "validation", "--output", str(tmp_path / "iters"), "--iterations", "3", "--epochs", "3",
                         "--widths", "4", "8")
    run_until(iterations, tmp_path / "iters" / "iter1" / "done.json")
    unet1 = tmp_path / "iters" / "iter1" / "unet.ckpt"
    stamp = unet1.stat().st_mtime_ns
    finished = run(iterations)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "\r" not in finished.stdout + finished.stderr
    assert unet1.stat().st_mtime_ns == stamp  # iteration 1 was reused, not retrained
    for i in (1, 2, 3):
        assert (tmp_path / "iters" / f"iter{i}" / "done.json").is_file()
    summary = json.loads((tmp_path / "iters" / "summary.json").read_text())
    assert [e["iteration"] for e in summary["iterations"]] == [0, 1, 2, 3]
    assert summary["iterations"][1]["resumed"] is True and summary["iterations"][3]["resumed"] is False
