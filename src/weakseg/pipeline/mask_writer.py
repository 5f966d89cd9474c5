"""Lightning prediction writer that fills a mask folder (:mod:`weakseg.data.mask_files`) with UNet output.

Each predicted tile becomes ``<out_dir>/<id>.tif`` (argmax class ids) and ``<out_dir>/confidence/<id>.tif``
(the softmax probability of that class), both georeferenced like the source tile and written atomically. The
confidence maps make a UNet's predictions the same kind of folder as ``weakseg pseudomasks`` writes, so the
next refinement iteration applies the same ``min_confidence`` rule to them (:mod:`weakseg.data.targets`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from weakseg.data.mask_files import (
    CONFIDENCE_DIR,
    confidence_path,
    write_confidence_geotiff,
    write_mask_geotiff,
)


class MaskFolderWriter(BasePredictionWriter):
    """Writes each predicted tile's mask and confidence into ``out_dir`` (set it and ``reader`` first).

    Expects the prediction dict of :meth:`weakseg.tasks.segmentation.SegmentationTask.predict_step` (``id``,
    ``pred`` uint8 (B, H, W), ``prob`` float (B, H, W)) and batches carrying ``index`` (the reader's tile
    index, for the georeference of ``reader.source_path(index)``).
    """

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.out_dir: Path | None = None
        self.reader: Any = None
        #: Optional folder for ``pred_alone`` (the UNet's own argmax when predictions are label-weighted).
        self.alone_dir: Path | None = None

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch_indices: Any,
        batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        assert self.out_dir is not None, "set out_dir before predicting"
        preds = prediction["pred"].cpu().numpy()  # (B, H, W) uint8
        probs = prediction["prob"].cpu().numpy()  # (B, H, W) float32, probability of the predicted class
        rows = zip(prediction["id"], batch["index"].tolist(), preds, probs, strict=True)
        for tile_id, index, mask, prob in rows:
            source = self.reader.source_path(index)
            write_mask_geotiff(self.out_dir / f"{tile_id}.tif", mask, source)
            write_confidence_geotiff(confidence_path(self.out_dir, tile_id), prob, source)
        if self.alone_dir is not None and "pred_alone" in prediction:
            alone = prediction["pred_alone"].cpu().numpy()  # (B, H, W) uint8
            for tile_id, index, mask in zip(prediction["id"], batch["index"].tolist(), alone, strict=True):
                write_mask_geotiff(self.alone_dir / f"{tile_id}.tif", mask, self.reader.source_path(index))


def clear_mask_folder(folder: Path) -> None:
    """Remove the masks and confidence maps of an unfinished earlier attempt (only files the writer makes).

    Leftovers would otherwise mix with the new predictions: a stale tile of another split, a temporary file.
    """
    for sub in (Path(folder), Path(folder) / CONFIDENCE_DIR):
        if sub.is_dir():
            for path in sub.iterdir():
                if path.is_file() and (path.suffix == ".tif" or path.name.endswith(".tmp")):
                    path.unlink()
