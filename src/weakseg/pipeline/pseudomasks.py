"""Running a pseudomask method over a dataset: Lightning's predict loop, an atomic writer, a manifest, resume.

The method itself (:mod:`weakseg.methods`, looked up by name) works on a batch; this module turns a trained
classifier checkpoint and a dataset into one label image and one confidence map per tile plus a manifest that
accounts for every tile. It knows no method: a new one needs no change here.

- **Lightning predict loop** with a :class:`~lightning.pytorch.callbacks.BasePredictionWriter`, so generation
  spreads over several devices exactly like training (``--num_devices``).
- **Whole tiles.** The model sees each tile resized to its input size; maps are upsampled back to the tile, so
  masks have the tile's size and, for GeoTIFF inputs, its georeference (they open in GIS tools).
- **Complete or absent, checked on resume.** Each tile's confidence map and mask are encoded in memory and written
  by :func:`weakseg.io.atomic_write_bytes` (``os.write``, ``fsync``, rename; any failure raises: GDAL writing
  to disk itself left 0-byte masks on a full disk without an error); only then is the tile's manifest row
  appended and ``fsync``-ed (:func:`weakseg.io.append_line`, which cuts a failed append back, so no half line is
  left). The row records each file's size and sha256 (``bytes``/``sha256``, ``confidence_bytes``/
  ``confidence_sha256``). A re-run counts a tile as done only when its row says so *and* both files match the
  record; an empty, truncated, altered or missing file (or a row of an older weakseg without a record) is
  redone, with a warning saying which and why. A line torn by a kill is dropped by rewriting the log before
  anything is appended (:func:`repair_manifests`). Because every method is deterministic per image (independent
  of batch composition) a killed or failed run resumes to byte-identical outputs.
- **Write failures are errors, not tracebacks.** Disk full, a read-only folder, ``--output`` under a file: a
  :class:`~weakseg.errors.WeaksegError` naming the path (the CLI prints ``error: ...`` and exits 2).
- **One run per folder.** The run holds :func:`weakseg.io.folder_lock` on ``--output`` (global rank 0 only) from
  checking the folder to writing ``summary.json``; a second run into the same folder is refused, naming the lock
  file and its holder.
- **Only our own files.** ``--overwrite`` deletes the files the manifest of the earlier run lists (masks and their
  confidence maps) and that run's bookkeeping files, nothing else; a folder with ``.tif`` files but no
  ``run.json`` is refused, and so is an output inside the dataset (``--datadir``), so a run can never replace or
  delete ground truth.
- **DDP.** Every rank writes its own row log (``.manifest.rank<k>.jsonl``); all ranks meet at a barrier after
  prediction, so rank 0 merges the manifest only when every rank's rows are on disk.
- **Nothing dropped silently** (defect 1 of the original): a tile whose files cannot be read gets a row with
  status ``skipped`` and the reason; method fallbacks are rows with status ``fallback`` and their reason.
- **Is the assignment right?** For methods that give regions classes (attention clustering), where the split has
  ground-truth masks, each multi-label tile's row says whether the chosen region -> class assignment is the best
  possible one against the ground truth (``assignment`` = ``best`` / ``not_best``); the summary counts them. A
  diagnostic only: the ground truth never changes a mask.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from scipy.optimize import linear_sum_assignment
from torch.utils.data import DataLoader, Dataset, Subset

from weakseg.data import open_dataset
from weakseg.data.classes import IGNORE_INDEX
from weakseg.data.datamodule import build_transform
from weakseg.data.nodata import unlabel_invalid
from weakseg.data.tile_store import store_for_split
from weakseg.errors import ConfigError, DataError, WeaksegError
from weakseg.io import (
    FileRecord,
    append_line,
    atomic_path,
    atomic_write_json,
    check_file,
    folder_lock,
    process_rank,
    make_dir,
    repair_jsonl,
)
from weakseg.masks.labels import oracle_label_sets, predicted_label_sets
from weakseg.methods import get_method
from weakseg.methods.attention_clustering import relabel_regions
from weakseg.methods.base import PseudomaskMethod
from weakseg.data.mask_files import CONFIDENCE_DIR, write_confidence_geotiff, write_mask_geotiff
from weakseg.pipeline.progress import show_progress_bar
from weakseg.pipeline.run_figures import DEFAULT_FIGURE_TILES, pseudomask_figure_files, write_pseudomask_figures
from weakseg.masks.crf import CRFSettings, crf_image, crf_refine, require_crf
from weakseg.pipeline.sanity import warn_before_pseudomasks
from weakseg.tasks.classification import ClassificationTask, load_classifier

log = logging.getLogger(__name__)

MANIFEST_FIELDS = ("id", "status", "reason", "method", "labels", "used_labels", "probabilities", "assignment",
                   "file", "bytes", "sha256", "confidence_file", "confidence_bytes", "confidence_sha256")
#: Files of an output folder that describe a run (deleted with ``--overwrite``, besides the listed masks).
RUN_FILES = ("run.json", "manifest.csv", "summary.json", "scores.json")
MANIFEST_LOG_GLOB = ".manifest.rank*.jsonl"
ASSIGNMENT_BEST, ASSIGNMENT_NOT_BEST = "best", "not_best"
#: Testing hook: kill the process (SIGKILL) after this many tiles were written, to exercise resume.
KILL_AFTER_ENV = "WEAKSEG_TEST_KILL_AFTER_TILES"


@dataclass
class PseudomaskJob:
    """What identifies a pseudomask run; stored as ``run.json`` so a folder never mixes two runs."""

    checkpoint: str
    checkpoint_sha256: str
    method: str
    oracle: bool
    relabel: bool
    dataset: str
    datadir: str
    split: str
    threshold: float
    method_options: dict[str, Any] = field(default_factory=dict)
    crf: dict[str, Any] | None = None  # CRFSettings of --crf, None without


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _SafeTiles(Dataset):
    """Wraps a reader: a tile whose files cannot be read becomes a placeholder carrying the error message."""

    def __init__(self, reader: Any, img_size: tuple[int, int], channels: int) -> None:
        self.reader, self.img_size, self.channels = reader, img_size, channels

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            s = self.reader[i]
            if s["image"].shape[0] != self.channels:
                raise DataError(
                    f"{self.reader.source_path(i)} gives {s['image'].shape[0]} channels; the model expects {self.channels}"
                )
            return {**s, "error": ""}
        except DataError as e:
            C = self.channels
            return {
                "image": torch.zeros(C, *self.img_size), "mask": torch.full((1, 1), IGNORE_INDEX),
                "label": torch.zeros(self.reader.num_classes), "id": self.reader.ids[i], "index": i,
                "error": str(e),
            }


def collate_tiles(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Images and labels stacked; masks kept as a list because tiles may differ in size."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.stack([s["label"] for s in samples]),
        "mask": [s["mask"] for s in samples],
        "id": [s["id"] for s in samples],
        "index": [int(s["index"]) for s in samples],
        "error": [s["error"] for s in samples],
        "valid": [s.get("valid") for s in samples],  # (H, W) pixels with data (weakseg.data.nodata)
    }


def assignment_is_best(regions: np.ndarray, region_class: np.ndarray, gt: np.ndarray) -> bool | None:
    """Is the region -> class assignment of one image the best possible against its ground truth?

    Best = the assignment of the same regions to distinct classes among those given (a permutation) that labels
    the most pixels correctly (Hungarian). Ties count as best. Pixels outside every region or with ground truth
    255 do not count.

    Args:
        regions: (H, W) region ids, -1 = none.
        region_class: (K,) class of region k, -1 = no such region.
        gt: (H, W) ground truth, 255 = ignore.

    Returns:
        None when fewer than two regions were given classes (nothing to choose).
    """
    ids = [k for k in range(len(region_class)) if region_class[k] >= 0]
    if len(ids) < 2:
        return None
    classes = np.asarray([region_class[k] for k in ids])
    valid = (regions >= 0) & (gt != IGNORE_INDEX)
    agree = np.zeros((len(ids), len(ids)), dtype=np.int64)  # region i painted as class of region j: correct px
    reg, truth = regions[valid], gt[valid]
    for i, k in enumerate(ids):
        in_region = truth[reg == k]
        agree[i] = [(in_region == c).sum() for c in classes]
    chosen = int(np.trace(agree))
    rows, cols = linear_sum_assignment(agree, maximize=True)
    return chosen >= int(agree[rows, cols].sum())


class PseudomaskModule(L.LightningModule):
    """Wraps a trained classifier and one method for ``trainer.predict``."""

    def __init__(self, task: ClassificationTask, method: PseudomaskMethod, oracle: bool, relabel: bool,
                 threshold: float) -> None:
        super().__init__()
        self.task = task
        self.method = method
        self.oracle = oracle
        self.relabel = relabel
        self.threshold = threshold

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        model = self.task.model.eval()
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        rows: list[dict[str, Any]] = [
            {"id": batch["id"][i], "index": batch["index"][i], "status": "skipped", "reason": batch["error"][i],
             "mask": None, "confidence": None, "probs": None, "labels": None, "used": None, "assignment": ""}
            for i in range(len(batch["id"]))
        ]
        if not ok:
            return rows
        images = batch["image"][ok]
        sizes = [tuple(batch["mask"][i].shape) for i in ok]
        with torch.no_grad():
            probs = model(images).sigmoid()  # (B, C)
        label_sets = oracle_label_sets(batch["label"][ok]) if self.oracle else predicted_label_sets(probs, self.threshold)
        for size in sorted(set(sizes)):
            group = [j for j, s in enumerate(sizes) if s == size]
            g = torch.tensor(group, device=images.device)
            res = self.method.pseudomasks(model, images[g], probs[g], label_sets[g], size)
            masks = res.masks
            if self.relabel:
                masks = self._relabel(images[g], masks, label_sets[g])
            for k, j in enumerate(group):
                i = ok[j]
                gt = batch["mask"][i].cpu().numpy()
                check = None
                if res.regions is not None and res.region_class is not None and (gt != IGNORE_INDEX).any():
                    check = assignment_is_best(res.regions[k], res.region_class[k], gt)
                # No-data pixels: 255 (unlabelled) with confidence 0, so refinement and evaluation ignore them.
                mask_k, conf_k = unlabel_invalid(masks[k], res.confidence[k],  # type: ignore[index]
                                                 batch["valid"][i] if "valid" in batch else None)
                rows[i].update(
                    status=res.status[k], reason=res.reason[k], mask=mask_k,
                    confidence=conf_k, probs=probs[j].float().cpu().numpy(),
                    labels=label_sets[j].cpu().numpy(), used=np.asarray(res.used_labels[k]),
                    assignment="" if check is None else ASSIGNMENT_BEST if check else ASSIGNMENT_NOT_BEST,
                )
        return rows

    def _relabel(self, images: torch.Tensor, masks: np.ndarray, label_sets: torch.Tensor) -> np.ndarray:
        """Step 8 of the paper at the model's input size; the new class of each region is mapped back to the tile."""
        model = self.task.model
        h, w = images.shape[-2:]
        small = F.interpolate(torch.as_tensor(masks)[:, None].float(), size=(h, w), mode="nearest")[:, 0]
        small_np = small.to(torch.uint8).numpy()
        new_small = relabel_regions(images, small_np, lambda x: model(x), label_sets)
        out = masks.copy()
        for b in range(masks.shape[0]):
            for c in np.unique(small_np[b]):
                out[b][masks[b] == c] = new_small[b][small_np[b] == c][0]
        return out


class PseudomaskWriter(BasePredictionWriter):
    """Writes each tile's files (complete or absent), then appends its manifest row to this rank's log.

    The row is the commit record: it is appended only after both files are on disk, and it carries their sizes and
    checksums so a later run can tell a complete file from an empty or truncated one.
    """

    def __init__(self, out_dir: Path, reader: Any, job: PseudomaskJob, class_names: list[str],
                 log_every: int = 0) -> None:
        super().__init__(write_interval="batch")
        self.out_dir, self.reader, self.job, self.class_names = out_dir, reader, job, class_names
        self.crf = CRFSettings(**job.crf) if job.crf is not None else None
        self.written = 0
        #: Without a progress bar (no terminal), one log line per this many tiles written by this rank (0: none).
        self.log_every = log_every
        self.kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        manifest = self.out_dir / f".manifest.rank{trainer.global_rank}.jsonl"
        for row in prediction:
            files: dict[str, Any] = {}
            if row["mask"] is not None and self.crf is not None:
                row = self._with_crf(row)
            if row["mask"] is not None:
                source = self.reader.source_path(row["index"])
                conf_file = f"{CONFIDENCE_DIR}/{row['id']}.tif"
                conf = write_confidence_geotiff(self.out_dir / conf_file, row["confidence"], source)
                mask_file = f"{row['id']}.tif"
                mask = write_mask_geotiff(self.out_dir / mask_file, row["mask"], source)
                files = {"file": mask_file, "bytes": mask.size, "sha256": mask.sha256,
                         "confidence_file": conf_file, "confidence_bytes": conf.size,
                         "confidence_sha256": conf.sha256}
            append_line(manifest, json.dumps(self._manifest_row(row, files)))
            self.written += 1
            if self.kill_after and self.written >= self.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.log_every and self.written % self.log_every == 0:
                log.info("  pseudomasks: %d tiles written by rank %d", self.written, trainer.global_rank)

    def _with_crf(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` with its mask after the dense CRF (:mod:`weakseg.masks.crf`) on the tile's own pixels; the
        confidence becomes the CRF's marginal probability of the written class (0 where unlabelled), since the
        method's confidence belongs to labels the CRF may have changed."""
        image = self.reader.read_image(row["index"])  # (C, H, W) at the tile's size, as the mask
        mask, confidence = crf_refine(row["mask"], crf_image(image), self.crf, return_confidence=True)
        return {**row, "mask": mask, "confidence": confidence if confidence is not None else row["confidence"]}

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Wait for every rank: rank 0 merges the manifest next and must see every rank's rows (a no-op alone)."""
        trainer.strategy.barrier("weakseg_pseudomasks_written")

    def _manifest_row(self, row: dict[str, Any], files: dict[str, Any]) -> dict[str, Any]:
        names = self.class_names

        def label_names(v: Any) -> str:
            return "" if v is None else ";".join(n for n, on in zip(names, v) if on)

        probs = "" if row["probs"] is None else ";".join(f"{n}={p:.4f}" for n, p in zip(names, row["probs"]))
        empty = {"file": "", "bytes": "", "sha256": "", "confidence_file": "", "confidence_bytes": "",
                 "confidence_sha256": ""}
        return {"id": row["id"], "status": row["status"], "reason": row["reason"], "method": self.job.method,
                "labels": label_names(row["labels"]), "used_labels": label_names(row["used"]),
                "probabilities": probs, "assignment": row["assignment"], **empty, **files, "_index": row["index"],
                "_time": time.time_ns()}


def _log_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(byte offset, row) of every JSON-object line of one rank's log, read a line at a time; torn lines skipped.

    The lines :func:`weakseg.io.read_jsonl` accepts, without holding the file: a log has a row per tile.

    Raises:
        DataError: the log cannot be read (the message names it).
    """
    try:
        with path.open("rb") as f:
            offset = 0
            for line in f:  # split at b"\n", as read_jsonl
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(row, dict):
                    yield start, row
    except OSError as e:
        raise DataError(f"cannot read manifest log {path}: {e}") from e


class _LatestRows:
    """Where the latest row of each tile of ``ids`` lies in the rank logs of ``out_dir``: log and byte offset.

    Why: a manifest has a row per tile (about 3 kB as a parsed dict), so holding every row to write them in the
    dataset's order made ``pseudomasks`` grow by ~30 MB per 10,000 tiles. This keeps three integers per tile and
    reads each row back from its log when it is needed (:meth:`rows`).

    "Latest" is by the row's write time (``_time``), not by file: a tile redone by rank 0 must win over the row
    an earlier DDP run's rank 1 wrote for it; at equal times the later log, then the later line, wins. Rows of
    tiles not in ``ids`` and torn lines are ignored.
    """

    def __init__(self, out_dir: Path, ids: Sequence[str]) -> None:
        self.out_dir = out_dir
        self.logs = sorted(out_dir.glob(MANIFEST_LOG_GLOB))
        self._slot = {tid: k for k, tid in enumerate(dict.fromkeys(ids))}  # id -> slot (duplicates share one)
        n = len(self._slot)
        self._time: list[Any] = [None] * n  # _time of the latest row so far; None: no row
        self._log = [0] * n  # index into self.logs
        self._offset = [0] * n  # byte offset of the row in that log
        for number, path in enumerate(self.logs):
            for offset, row in _log_rows(path):
                tid = row.get("id")
                k = self._slot.get(tid) if isinstance(tid, str) else None
                if k is None:
                    continue
                t = row.get("_time", 0)
                if self._time[k] is None or t >= self._time[k]:
                    self._time[k], self._log[k], self._offset[k] = t, number, offset

    def has(self, tile_id: str) -> bool:
        """Whether ``tile_id`` has a row."""
        k = self._slot.get(tile_id)
        return k is not None and self._time[k] is not None

    def rows(self, ids: Sequence[str]) -> Iterator[dict[str, Any] | None]:
        """The latest row of every tile of ``ids`` (None: it has none), in that order, read one at a time."""
        files: dict[int, Any] = {}  # log number -> open file
        try:
            for tid in ids:
                if not self.has(tid):
                    yield None
                    continue
                k = self._slot[tid]
                number = self._log[k]
                if number not in files:
                    files[number] = self.logs[number].open("rb")
                f = files[number]
                f.seek(self._offset[k])
                yield json.loads(f.readline())
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read the manifest logs ({MANIFEST_LOG_GLOB}) of {self.out_dir} (changed while "
                            f"the run read them?): {e}") from e
        finally:
            for f in files.values():
                f.close()


def _needs_repair(path: Path) -> bool:
    """Whether a rank's log has a torn line or lacks its last newline (read a line at a time)."""
    try:
        with path.open("rb") as f:
            last = b""
            for line in f:
                last = line
                if not line.strip():
                    continue
                try:
                    if not isinstance(json.loads(line), dict):
                        return True
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return True
            return bool(last) and not last.endswith(b"\n")
    except OSError:
        return True  # repair_jsonl reports it, naming the file


def repair_manifests(out_dir: Path) -> int:
    """Drop the lines a kill cut short from every rank's log before anything is appended; returns how many.

    A log is first scanned a line at a time; only a damaged one (after a kill) is rewritten by
    :func:`weakseg.io.repair_jsonl`, which reads it whole.
    """
    dropped = 0
    for path in sorted(out_dir.glob(MANIFEST_LOG_GLOB)):
        if not _needs_repair(path):
            continue
        n = repair_jsonl(path)
        if n:
            log.warning("warning: %s: dropped %d torn line(s) left by a killed or failed run; those tiles are redone",
                        path, n)
        dropped += n
    return dropped


def _row_files(row: dict[str, Any]) -> list[tuple[str, FileRecord]] | None:
    """The files a row says were written, with their records; None when it has no complete record.

    Only the names this module writes are accepted (``<id>.tif``, ``confidence/<id>.tif``), so a damaged or
    edited manifest can neither make a run trust another file nor make ``--overwrite`` delete one.
    """
    tid = row.get("id")
    if not isinstance(tid, str) or row.get("file") != f"{tid}.tif" \
            or row.get("confidence_file") != f"{CONFIDENCE_DIR}/{tid}.tif":
        return None
    try:
        return [(row["file"], FileRecord(int(row["bytes"]), str(row["sha256"]))),
                (row["confidence_file"], FileRecord(int(row["confidence_bytes"]), str(row["confidence_sha256"])))]
    except (KeyError, TypeError, ValueError):
        return None


def incomplete_reason(out_dir: Path, row: dict[str, Any], *, checksum: bool = True) -> str:
    """Why the files of a non-skipped row are not the ones it records (``""``: complete, the tile is done)."""
    files = _row_files(row)
    if files is None:
        return "its manifest row records no file size and checksum (an older weakseg or a damaged row)"
    for name, record in files:
        why = check_file(out_dir / name, record, checksum=checksum)
        if why:
            return why
    return ""


def completed_tiles(out_dir: Path, ids: list[str], *, warn: bool = True) -> set[str]:
    """Tiles of ``ids`` with a non-skipped row whose files match it (size and sha256); warns about the others.

    Reads the rows one at a time (:class:`_LatestRows`): only the ids of the tiles done are kept.
    """
    unique = list(dict.fromkeys(ids))
    done: set[str] = set()
    redo: dict[str, str] = {}  # the first few tiles to redo, for the warning
    redone = 0
    for tid, row in zip(unique, _LatestRows(out_dir, unique).rows(unique), strict=True):
        if row is None or row.get("status") == "skipped":
            continue  # never written, or unreadable last time: tried (again)
        why = incomplete_reason(out_dir, row)
        if why:
            redone += 1
            if len(redo) < 5:
                redo[tid] = why
        else:
            done.add(tid)
    if redone and warn:
        shown = "; ".join(f"{t}: {why}" for t, why in redo.items())
        log.warning("warning: %d tile(s) listed as written have incomplete files and are redone (%s%s)", redone,
                    shown, "; ..." if redone > 5 else "")
    return done


def input_folders(datadir: Path, reader: Any) -> dict[Path, str]:
    """The dataset's input folders, resolved: the root and every folder holding a tile's image or mask.

    The folders of the files matter besides the root because a dataset may link its parts in from elsewhere
    (``masks -> /data/labels``): an output there is inside the dataset although not below ``--datadir``.
    """
    folders = {Path(datadir).resolve(): f"the dataset folder --datadir {datadir}"}
    where = {"images": reader.source_path}
    if getattr(reader, "has_masks", False) and hasattr(reader, "mask_path"):
        where["masks"] = reader.mask_path
    for kind, path_of in where.items():
        for i in range(len(reader)):
            try:
                folder = Path(path_of(i)).resolve().parent  # the file resolved: it may itself be a link
            except (NotImplementedError, OSError, DataError):
                continue
            folders.setdefault(folder, f"the dataset's {kind} folder {folder}")
    return folders


def check_output_location(out_dir: Path, datadir: Path, reader: Any) -> None:
    """Refuse an output that is a file, or is (inside) one of the dataset's input folders.

    Pointed at a dataset's own ``masks/`` folder, an earlier weakseg deleted the ground truth with ``--overwrite``;
    a run there without it would mix pseudomasks into the data the next command reads.
    """
    out_abs = Path(out_dir).resolve()
    for folder, what in input_folders(datadir, reader).items():
        if out_abs == folder or folder in out_abs.parents:
            where = "is" if out_abs == folder else "is inside"
            raise ConfigError(
                f"--output {out_dir} ({out_abs}) {where} {what} ({folder}); write pseudomasks outside the "
                f"dataset (--datadir {datadir}) so its files can never be replaced or deleted"
            )
    try:
        is_file = out_dir.exists() and not out_dir.is_dir()
    except OSError as e:  # a name too long, a loop of links: not just "missing"
        raise ConfigError(f"--output {out_dir} cannot be used: {e.strerror or e}") from e
    if is_file:
        raise ConfigError(f"--output {out_dir} exists and is not a folder")


def _read_run_file(run_file: Path) -> dict[str, Any] | None:
    try:
        old = json.loads(run_file.read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else None


def _previous_run_files(out_dir: Path) -> set[str]:
    """Names (relative to ``out_dir``) of the masks and confidence maps the earlier run's manifest lists."""
    names: set[str] = set()

    def add(row: dict[str, Any]) -> None:
        tid = row.get("id")
        # Only the names this module writes; an older manifest has no confidence_file, but its writer always put
        # the confidence map at confidence/<id>.tif beside the mask.
        if isinstance(tid, str) and tid and "/" not in tid and row.get("file") == f"{tid}.tif":
            names.update((f"{tid}.tif", f"{CONFIDENCE_DIR}/{tid}.tif"))

    for path in sorted(out_dir.glob(MANIFEST_LOG_GLOB)):  # rows read one at a time, never all held
        for _, row in _log_rows(path):
            add(row)
    csv_path = out_dir / "manifest.csv"
    if csv_path.is_file():
        try:
            with csv_path.open(newline="") as f:
                for row in csv.DictReader(f):
                    add(row)
        except (OSError, csv.Error, UnicodeDecodeError) as e:
            log.warning("warning: cannot read %s (%s): the files only it lists are left in place", csv_path, e)
    return names


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise WeaksegError(f"cannot delete {path} (--overwrite): {e.strerror or e}") from e


def prepare_output_dir(out_dir: Path, job: PseudomaskJob, overwrite: bool) -> None:
    """Check the folder holds this run's files (or nothing of anyone's), clear an earlier run's with ``overwrite``.

    - ``run.json`` of another job: refused, naming the settings that differ, unless ``overwrite``.
    - ``overwrite``: deletes only what the earlier run's manifest lists (masks, their confidence maps), its
      bookkeeping files (:data:`RUN_FILES`, the row logs) and its figures; any other file stays, with a warning.
    - ``.tif`` files but no ``run.json``: no weakseg run wrote them; refused, also with ``overwrite``.
    """
    run_file = out_dir / "run.json"
    if run_file.exists():
        old = _read_run_file(run_file)
        if overwrite:
            names = [n for n in sorted(_previous_run_files(out_dir)) if (out_dir / n).exists()]
            for name in names:
                _remove(out_dir / name)
            for path in [*sorted(out_dir.glob(MANIFEST_LOG_GLOB)), *(out_dir / n for n in RUN_FILES),
                         *pseudomask_figure_files(out_dir)]:
                _remove(path)
            log.info("--overwrite: removed %d mask and confidence file(s) of the earlier run in %s", len(names),
                     out_dir)
            left = sorted(str(p.relative_to(out_dir))
                          for p in [*out_dir.glob("*.tif"), *(out_dir / CONFIDENCE_DIR).glob("*.tif")])
            if left:
                log.warning("warning: --overwrite left %d .tif file(s) in %s that no manifest row lists: %s%s",
                            len(left), out_dir, ", ".join(left[:5]), ", ..." if len(left) > 5 else "")
        elif old is None:
            raise ConfigError(f"{run_file} cannot be read: choose another --output, or pass --overwrite to replace "
                              "the run it describes")
        elif {"crf": None, **old} != asdict(job):  # run.json of runs before --crf existed: no CRF
            diff = {k: (old.get(k), v) for k, v in asdict(job).items() if old.get(k) != v}
            raise ConfigError(
                f"{out_dir} holds masks of another run (differs in {', '.join(diff)}: "
                + "; ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items())
                + "). Choose another --output or pass --overwrite."
            )
    elif any(out_dir.glob("*.tif")):
        raise ConfigError(
            f"{out_dir} already holds .tif files that no weakseg run wrote (it has no run.json); choose another "
            "--output" + (" (--overwrite only removes files a weakseg run lists in its manifest)" if overwrite else "")
        )
    atomic_write_json(run_file, asdict(job), durable=True)


def check_checkpoint_matches_data(task: ClassificationTask, reader: Any, ckpt: Path) -> None:
    """Channels, classes and tile size of the data must fit the checkpoint; say which does not.

    The geometry comes from the first tile that can be read: an unreadable tile is the prediction loop's business
    (a ``skipped`` manifest row with the reason, wherever it is in the split), so tile 0 is not special. Only when
    no tile can be read is it an error here, naming a few files and why.
    """
    cfg = task.model_config
    names = list(task.class_names)
    if list(reader.class_names) != names:
        raise ConfigError(
            f"checkpoint {ckpt} was trained on classes {names} but the data has {list(reader.class_names)}"
        )
    first, index, failures = None, -1, []
    for i in range(len(reader)):
        try:
            first, index = reader.read_image(i), i
            break
        except DataError as e:
            path, message = str(reader.source_path(i)), str(e)
            failures.append(message if path in message else f"{path}: {message}")
    if first is None:
        if not failures:
            raise DataError(f"the split has no tiles to pseudo-label ({getattr(reader, 'root', 'the dataset')})")
        raise DataError(f"none of the {len(failures)} tiles can be read, e.g. " + "; ".join(failures[:3]))
    if failures:
        log.warning("warning: %d tile(s) before %s cannot be read; they get 'skipped' manifest rows",
                    len(failures), reader.source_path(index))
    if first.shape[0] != cfg.in_chans:
        hint = " (was it trained with --multimodal?)" if abs(first.shape[0] - cfg.in_chans) == 2 else ""
        raise ConfigError(
            f"checkpoint {ckpt} expects {cfg.in_chans} input channels but {reader.source_path(index)} gives "
            f"{first.shape[0]}{hint}"
        )
    H, W = first.shape[-2:]
    if H < cfg.img_size[0] or W < cfg.img_size[1]:
        raise ConfigError(
            f"tiles like {reader.source_path(index)} are {H}x{W}, smaller than the input {cfg.img_size[0]}x"
            f"{cfg.img_size[1]} of checkpoint {ckpt}"
        )


def open_method_run(checkpoint: Path, datadir: Path, split: str, method: str,
                    method_options: dict[str, Any] | None, dataset: str | None, oracle: bool,
                    store: str | Path | None = None,
                    ) -> tuple[PseudomaskMethod, ClassificationTask, Any, str]:
    """The method, the classifier and the split's reader of a pseudomask run, checked against each other.

    The reader sees each tile as the classifier was trained to (``data_config`` of the checkpoint; the whole tile
    resized to the input size); the method is told the data's classes (its background class, if any).

    Returns:
        (method, classifier task, reader, dataset kind).
    """
    runner = get_method(method, **(method_options or {}))
    task = load_classifier(checkpoint)
    runner.check_model(task.model, checkpoint)
    warn_before_pseudomasks(task, runner, checkpoint)
    data_cfg = dict(task.hparams.get("data_config") or {})
    kind = dataset or data_cfg.get("dataset", "dfc2020")
    modality = data_cfg.get("modality", "s2")
    if method == "attention" and not task.model_config.gated:
        log.info("checkpoint has no gates: clustering all heads (the 'attention without pruning' baseline)")
    reader = open_dataset(kind, datadir, split, modality=modality,
                          transform=build_transform("predict", task.model_config.img_size, data_cfg),
                          label_threshold=data_cfg.get("label_threshold", 0.10),
                          store=store_for_split(store, split, strict=True))
    if oracle and kind == "folder" and getattr(reader, "_csv_labels", None) is None and not reader.has_masks:
        raise ConfigError("--oracle needs ground-truth image labels")
    runner.bind_dataset(list(reader.class_names), getattr(reader, "background_index", None))
    check_checkpoint_matches_data(task, reader, checkpoint)
    return runner, task, reader, kind


def check_run_settings(threshold: float, batch_size: int, num_workers: int, num_devices: int,
                       figure_tiles: int = DEFAULT_FIGURE_TILES) -> None:
    """Range checks of the run's settings, before anything is read or written (ConfigError naming the flag)."""
    problems = []
    if not 0.0 <= threshold < 1.0:
        problems.append(f"--threshold must be in [0, 1) (a probability above which a label is predicted), got "
                        f"{threshold}")
    for flag, value, minimum in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                 ("num_devices", num_devices, 1), ("figure_tiles", figure_tiles, 1)):
        if value < minimum:
            problems.append(f"--{flag} must be at least {minimum}, got {value}")
    if problems:
        raise ConfigError("; ".join(problems))


def generate_pseudomasks(
    checkpoint: Path, datadir: Path, split: str, out_dir: Path, method: str = "attention", *,
    method_options: dict[str, Any] | None = None, dataset: str | None = None, oracle: bool = False,
    relabel: bool = False, threshold: float = 0.5, batch_size: int = 16, num_workers: int = 0, num_devices: int = 1,
    num_nodes: int = 1,
    accelerator: str = "auto", overwrite: bool = False, progress: bool = True, figures: bool = True,
    figure_tiles: int = DEFAULT_FIGURE_TILES, crf: CRFSettings | None = None, store: str | Path | None = None,
) -> dict[str, Any]:
    """Pseudomasks for every tile of ``split``; returns the summary also written to ``out_dir/summary.json``.

    Args:
        checkpoint: classifier checkpoint (``weakseg train``).
        datadir, split, dataset: the tiles (dataset kind defaults to the classifier's).
        out_dir: mask folder (masks, ``confidence/``, ``manifest.csv``, ``summary.json``, ``run.json``); it must
            not be inside ``datadir``.
        method: a name of :data:`weakseg.methods.METHODS`; ``method_options`` its ``Options`` fields.
        oracle: ground-truth image labels instead of the predicted ones.
        relabel: re-label each region by the classifier (the sparse ViT paper's step 8).
        crf: post-process every mask with a dense CRF on the tile's colours (:mod:`weakseg.masks.crf`; needs the
            ``crf`` extra); None: no CRF.
        threshold: probability above which a label is predicted.
        overwrite: delete the files of the earlier run in ``out_dir`` (only those its manifest lists) first.
        figures, figure_tiles: draw ``out_dir/figures/`` for that many sampled tiles once the masks are written
            (:func:`weakseg.pipeline.run_figures.write_pseudomask_figures`; a drawing failure is a warning).
        store: the tile store of ``split`` (``weakseg prepare``): None the default location when fresh, "none"
            the files, or a store folder (:func:`weakseg.data.tile_store.store_for_split`).

    Returns:
        The summary; ``{}`` in a DDP rank other than 0.

    Raises:
        WeaksegError: bad settings, a folder of another run or in use by one, unreadable data, a failed write
            (disk full, permissions): the message names the file or setting.
    """
    check_run_settings(threshold=threshold, batch_size=batch_size, num_workers=num_workers,
                       num_devices=num_devices, figure_tiles=figure_tiles)
    if num_nodes < 1:
        raise ConfigError(f"--num_nodes must be at least 1, got {num_nodes}")
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if crf is not None:
        require_crf()  # before anything is read or written: a missing extra is a start-up error
    runner, task, reader, kind = open_method_run(checkpoint, datadir, split, method, method_options, dataset, oracle,
                                                 store)
    img_size = task.model_config.img_size
    check_output_location(out_dir, datadir, reader)
    job = PseudomaskJob(str(checkpoint.resolve()), file_sha256(checkpoint), method, oracle, relabel, kind,
                        str(Path(datadir).resolve()), split, threshold, runner.options_dict(),
                        asdict(crf) if crf is not None else None)

    def predict(todo: list[int]) -> None:
        tiles = _SafeTiles(reader, img_size, task.model_config.in_chans)
        loader = DataLoader(Subset(tiles, todo), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=collate_tiles)
        module = PseudomaskModule(task, runner, oracle, relabel, threshold)
        log_every = 0 if (not progress or show_progress_bar()) else max(batch_size, len(todo) // 10)
        writer = PseudomaskWriter(out_dir, reader, job, list(task.class_names), log_every=log_every)
        trainer = L.Trainer(
            accelerator=accelerator, devices=num_devices, num_nodes=num_nodes,
            strategy="ddp" if num_devices * num_nodes > 1 else "auto",
            callbacks=[writer], logger=False, enable_progress_bar=progress and show_progress_bar(),
            enable_model_summary=False,
            inference_mode=False,  # gradient-based methods need autograd inside predict_step
        )
        trainer.predict(module, dataloaders=loader, return_predictions=False)

    def to_do(warn: bool = True) -> list[int]:
        done = completed_tiles(out_dir, reader.ids, warn=warn)
        return [i for i, tid in enumerate(reader.ids) if tid not in done]

    if process_rank() != 0:
        # Started by Lightning once rank 0 has prepared the folder, holds its lock and has tiles to do; rank 0
        # writes nothing before every rank joins, so this rank computes the same list. It joins the prediction
        # even if its list came out empty: rank 0 waits for every rank, and must not wait forever.
        predict(to_do(warn=False))
        return {}
    make_dir(out_dir, "--output folder")
    with folder_lock(out_dir, f"weakseg pseudomasks (--method {method}, --split {split})"):
        prepare_output_dir(out_dir, job, overwrite)
        repair_manifests(out_dir)
        todo = to_do()
        log.info("pseudomasks (%s%s%s) for %d tiles of %r: %d done earlier, %d to do -> %s", method,
                 ", oracle labels" if oracle else "", ", re-labelled" if relabel else "", len(reader), split,
                 len(reader) - len(todo), len(todo), out_dir)
        t0 = time.time()
        if todo:
            predict(todo)
        summary = finalize(out_dir, reader, job, elapsed=time.time() - t0, tiles_this_run=len(todo))
        summary["figures"] = write_pseudomask_figures(out_dir, reader, task, runner, figure_tiles, figures)
        return summary


def finalize(out_dir: Path, reader: Any, job: PseudomaskJob, elapsed: float, tiles_this_run: int) -> dict[str, Any]:
    """Merge every rank's rows into ``manifest.csv`` (dataset order) and write ``summary.json``.

    Every written tile's files are checked against their row (existence and size, no re-hash: they were hashed as
    written, and resume re-hashes), so the summary never counts a file that is not there. The rows are read back
    from the rank logs one at a time in dataset order (:class:`_LatestRows`) and written as they come, with the
    summary's counts kept on the way, so memory does not grow with the number of tiles; the manifest replaces the
    old one only when every row is written and no tile's files are broken.
    """
    ids = list(reader.ids)
    latest = _LatestRows(out_dir, ids)
    missing = [t for t in ids if not latest.has(t)]
    if missing:
        raise WeaksegError(f"{len(missing)} tile(s) have no manifest row after the run: {missing[:5]}")
    status: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    written = best = checked = num_broken = 0
    skipped: list[dict[str, Any]] = []
    broken: list[str] = []  # the first three reasons, for the message
    with atomic_path(out_dir / "manifest.csv", durable=True) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in latest.rows(ids):
            assert r is not None  # every tile has a row (checked above)
            if r["status"] != "skipped":
                why = incomplete_reason(out_dir, r, checksum=False)
                if why:
                    num_broken += 1
                    if len(broken) < 3:
                        broken.append(why)
            w.writerow(r)
            status[r["status"]] += 1
            reasons[r["reason"].split(";")[0] if r["status"] != "skipped" else "unreadable"] += 1
            written += 1 if r["file"] else 0
            if r["status"] == "skipped":
                skipped.append({"id": r["id"], "reason": r["reason"]})
            if r.get("assignment"):
                checked += 1
                best += r["assignment"] == ASSIGNMENT_BEST
        if num_broken:  # raised inside: the partial manifest is removed, the old one stays
            raise WeaksegError(
                f"{num_broken} tile(s) of {out_dir} have missing or incomplete files after the run ("
                + "; ".join(broken) + "); run the same command again to redo them"
            )
    summary = {
        "method": job.method, "oracle": job.oracle, "relabel": job.relabel, "dataset": job.dataset,
        "split": job.split, "modality": getattr(reader, "modality", "s2"),  # evaluation reads no-data the same way
        "tiles": len(ids), "written": written,
        "status": dict(status), "reasons": dict(reasons),
        "tiles_this_run": tiles_this_run, "seconds_this_run": round(elapsed, 2),
        "skipped": skipped,
    }
    if checked:
        summary["assignment"] = {"best": best, "checked": checked,
                                 "labels": "oracle" if job.oracle else "predicted"}
    atomic_write_json(out_dir / "summary.json", summary, durable=True)
    return summary


def print_summary(summary: dict[str, Any], out_dir: Path) -> None:
    print(f"\npseudomasks ({summary['method']}{', oracle' if summary['oracle'] else ''}) in {out_dir}: "
          f"{summary['written']}/{summary['tiles']} tiles written "
          f"({summary['tiles_this_run']} this run, {summary['seconds_this_run']:.1f}s)")
    for k, v in sorted(summary["status"].items()):
        print(f"  status {k:<9} {v}")
    for k, v in sorted(summary["reasons"].items()):
        print(f"  reason {k:<28} {v}")
    for s in summary["skipped"][:10]:
        print(f"  skipped {s['id']}: {s['reason']}")
    if "assignment" in summary:
        a = summary["assignment"]
        print(f"  assignment of regions to classes ({a['labels']} labels): the best possible on {a['best']} of "
              f"{a['checked']} multi-label tiles ({100 * a['best'] / a['checked']:.0f}%), checked against the "
              "ground truth")
