"""Progress of long training runs: a progress bar on a terminal, log lines everywhere else.

Lightning's progress bar redraws a line many times a second; in a log file or a CI job (no terminal) that becomes
megabytes of carriage returns. :func:`show_progress_bar` says whether to draw it, and :class:`EpochLog` writes one
line per epoch with the metrics that matter, plus, when no progress bar is drawn and an epoch is long, a line
within the epoch at most every ``every_seconds`` (batch b/B, elapsed time, the running loss), so a run of several
minutes shows it is alive either way (a user's UNet refinement logged nothing for minutes per epoch).
"""

from __future__ import annotations

import csv
import logging
import sys
import time
from pathlib import Path
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.csv_logs import CSVLogger, ExperimentWriter

from weakseg.io import atomic_path

log = logging.getLogger("weakseg")


def show_progress_bar() -> bool:
    """Draw Lightning's progress bar only when standard error is a terminal."""
    return sys.stderr.isatty()


class EpochLog(Callback):
    """One ``log.info`` line per training epoch: ``<stage> epoch e/E: metric value, ...`` (rank zero only).

    Args:
        stage: what is training (e.g. ``"iter1"``, ``"classifier"``).
        metrics: names in ``trainer.callback_metrics`` to print, in order; missing ones are left out.
    """

    def __init__(self, stage: str, metrics: Sequence[str] = ("train_loss_epoch",), every_seconds: float = 20.0,
                 batch_metric: str = "train_loss") -> None:
        self.stage = stage
        self.metrics = tuple(metrics)
        self.every_seconds = every_seconds
        self.batch_metric = batch_metric
        self._epoch_start = self._last_line = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._last_line = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        """A line within a long epoch (rank zero, no progress bar), at most every ``every_seconds``."""
        if not trainer.is_global_zero or trainer.progress_bar_callback is not None:
            return
        now = time.monotonic()
        if now - self._last_line < self.every_seconds:
            return
        self._last_line = now
        total = trainer.num_training_batches
        loss = trainer.callback_metrics.get(self.batch_metric)
        log.info("  %s epoch %d/%d: batch %d/%s, %.0fs%s", self.stage, trainer.current_epoch + 1, trainer.max_epochs,
                 batch_idx + 1, total if isinstance(total, int) else "?", now - self._epoch_start,
                 "" if loss is None else f", {self.batch_metric} {float(loss):.4f}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        values = trainer.callback_metrics
        shown = ", ".join(f"{name} {float(values[name]):.4f}" for name in self.metrics if name in values)
        if shown:
            log.info("  %s epoch %d/%d: %s", self.stage, trainer.current_epoch + 1, trainer.max_epochs, shown)


def csv_logger(save_dir: str | Path) -> CSVLogger:
    """Lightning's CSV logger writing ``<save_dir>/metrics.csv``, whose header rewrites are atomic.

    When a metric appears for the first time (the first epoch's epoch-end metrics), Lightning rewrites the whole
    file in place with the new header: a run killed during that rewrite left ``metrics.csv`` truncated, and the rows
    of the epochs before were lost although ``last.ckpt`` had them (seen as a flaky kill-and-resume test). Here the
    rewrite goes to a temporary file renamed over the old one (:func:`weakseg.io.atomic_path`); appends stay
    appends.
    """
    return _AtomicCSVLogger(save_dir=str(save_dir), name="", version="")


class _AtomicHeaderWriter(ExperimentWriter):
    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        path = Path(self.metrics_file_path)
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


class _AtomicCSVLogger(CSVLogger):
    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AtomicHeaderWriter(log_dir=self.log_dir)
        return self._experiment
