"""Progress of long training runs: a progress bar on a terminal, one log line per epoch everywhere else.

Lightning's progress bar redraws a line many times a second; in a log file or a CI job (no terminal) that becomes
megabytes of carriage returns. :func:`show_progress_bar` says whether to draw it, and :class:`EpochLog` writes one
line per epoch with the metrics that matter, so a run of several minutes shows it is alive either way.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback

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

    def __init__(self, stage: str, metrics: Sequence[str] = ("train_loss_epoch",)) -> None:
        self.stage = stage
        self.metrics = tuple(metrics)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        values = trainer.callback_metrics
        shown = ", ".join(f"{name} {float(values[name]):.4f}" for name in self.metrics if name in values)
        if shown:
            log.info("  %s epoch %d/%d: %s", self.stage, trainer.current_epoch + 1, trainer.max_epochs, shown)
