"""Progress lines of long runs when no progress bar is drawn."""

import logging
from types import SimpleNamespace

import torch

from weakseg.pipeline.progress import EpochLog


def _trainer(bar=None):
    return SimpleNamespace(is_global_zero=True, progress_bar_callback=bar, num_training_batches=40, current_epoch=1,
                           max_epochs=3, callback_metrics={"train_loss_step": torch.tensor(0.25)})


def test_lines_within_a_long_epoch_at_most_every_interval(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="weakseg")
    clock = iter([100.0, 105.0, 121.0, 125.0, 142.0])
    monkeypatch.setattr("weakseg.pipeline.progress.time.monotonic", lambda: next(clock))
    cb = EpochLog("iter1", batch_metric="train_loss_step", every_seconds=20)
    trainer = _trainer()
    cb.on_train_epoch_start(trainer, None)  # t = 100
    for batch_idx in range(4):  # t = 105 (quiet), 121 (line), 125 (quiet), 142 (line)
        cb.on_train_batch_end(trainer, None, None, None, batch_idx)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["  iter1 epoch 2/3: batch 2/40, 21s, train_loss_step 0.2500",
                     "  iter1 epoch 2/3: batch 4/40, 42s, train_loss_step 0.2500"]


def test_no_lines_under_a_progress_bar(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="weakseg")
    monkeypatch.setattr("weakseg.pipeline.progress.time.monotonic", iter([0.0, 100.0]).__next__)
    cb = EpochLog("iter1", every_seconds=1)
    trainer = _trainer(bar=object())
    cb.on_train_epoch_start(trainer, None)
    cb.on_train_batch_end(trainer, None, None, None, 0)
    assert caplog.records == []


def test_a_header_rewrite_of_metrics_csv_is_atomic(tmp_path, monkeypatch):
    """A new column rewrites metrics.csv; a kill during that rewrite must leave the old file whole."""
    import csv

    import weakseg.io
    from weakseg.pipeline.progress import csv_logger

    logger = csv_logger(tmp_path)
    logger.log_metrics({"val_loss": 0.5, "epoch": 0}, step=0)
    logger.save()
    before = (tmp_path / "metrics.csv").read_text()

    class Killed(Exception):
        pass

    def killed_before_rename(src, dst):
        raise Killed  # the process dies after writing the temporary file, before the rename

    monkeypatch.setattr(weakseg.io.os, "replace", killed_before_rename)
    logger.log_metrics({"train_macro_f1": 0.4, "epoch": 0}, step=1)  # a new column: header rewrite
    try:
        logger.save()
    except Killed:
        pass
    assert (tmp_path / "metrics.csv").read_text() == before  # the old rows are still there, whole
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.csv" and p.name.endswith(".csv")]


def test_the_metrics_logger_writes_new_columns_as_lightnings_does(tmp_path):
    import csv

    from weakseg.pipeline.progress import csv_logger

    logger = csv_logger(tmp_path)
    logger.log_metrics({"val_loss": 0.5, "epoch": 0}, step=0)
    logger.save()
    logger.log_metrics({"train_macro_f1": 0.4, "epoch": 0}, step=1)
    logger.save()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [(r["step"], r["val_loss"], r["train_macro_f1"]) for r in rows] == [("0", "0.5", ""), ("1", "", "0.4")]
