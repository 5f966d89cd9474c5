"""Running a pseudomask method over a dataset: Lightning's predict loop, an atomic writer, a manifest, resume.

The method itself (:mod:`weakseg.methods`, looked up by name) works on a batch; this module turns a trained
classifier checkpoint and a dataset into one label image and one confidence map per tile plus a manifest that
accounts for every tile. It knows no method: a new one needs no change here.

- **Lightning predict loop** with a :class:`~lightning.pytorch.callbacks.BasePredictionWriter`, so generation
  spreads over several devices exactly like training (``--num_devices``).
- **Whole tiles.** The model sees each tile resized to its input size; maps are upsampled back to the tile, so
  masks have the tile's size and, for GeoTIFF inputs, its georeference (they open in GIS tools).
- **Atomic and resumable.** Each mask is written to a temporary file and renamed; only then is its manifest row
  appended (and flushed). A re-run skips tiles that have a row and a file, so a killed run resumes, and because
  every method is deterministic per image (independent of batch composition) the final outputs equal those of an
  uninterrupted run.
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
from weakseg.errors import ConfigError, DataError, WeaksegError
from weakseg.io import atomic_path, atomic_write_json
from weakseg.masks.labels import oracle_label_sets, predicted_label_sets
from weakseg.methods import get_method
from weakseg.methods.attention_clustering import relabel_regions
from weakseg.methods.base import PseudomaskMethod
from weakseg.data.mask_files import confidence_path, write_confidence_geotiff, write_mask_geotiff
from weakseg.tasks.classification import ClassificationTask, load_classifier

log = logging.getLogger(__name__)

MANIFEST_FIELDS = ("id", "status", "reason", "method", "labels", "used_labels", "probabilities", "assignment",
                   "file")
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
                rows[i].update(
                    status=res.status[k], reason=res.reason[k], mask=np.asarray(masks[k], dtype=np.uint8),
                    confidence=res.confidence[k], probs=probs[j].float().cpu().numpy(),  # type: ignore[index]
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
    """Writes each tile's mask atomically, then appends its manifest row (per-rank JSON lines)."""

    def __init__(self, out_dir: Path, reader: Any, job: PseudomaskJob, class_names: list[str]) -> None:
        super().__init__(write_interval="batch")
        self.out_dir, self.reader, self.job, self.class_names = out_dir, reader, job, class_names
        self.written = 0
        self.kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        manifest = self.out_dir / f".manifest.rank{trainer.global_rank}.jsonl"
        with manifest.open("a") as f:
            for row in prediction:
                file = ""
                if row["mask"] is not None:
                    file = f"{row['id']}.tif"
                    source = self.reader.source_path(row["index"])
                    write_confidence_geotiff(confidence_path(self.out_dir, row["id"]), row["confidence"], source)
                    write_mask_geotiff(self.out_dir / file, row["mask"], source)
                f.write(json.dumps(self._manifest_row(row, file)) + "\n")
                f.flush()
                os.fsync(f.fileno())
                self.written += 1
                if self.kill_after and self.written >= self.kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)

    def _manifest_row(self, row: dict[str, Any], file: str) -> dict[str, Any]:
        names = self.class_names

        def label_names(v: Any) -> str:
            return "" if v is None else ";".join(n for n, on in zip(names, v) if on)

        probs = "" if row["probs"] is None else ";".join(f"{n}={p:.4f}" for n, p in zip(names, row["probs"]))
        return {"id": row["id"], "status": row["status"], "reason": row["reason"], "method": self.job.method,
                "labels": label_names(row["labels"]), "used_labels": label_names(row["used"]),
                "probabilities": probs, "assignment": row["assignment"], "file": file, "_index": row["index"]}


def read_manifest_rows(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Rows of earlier (possibly killed) runs: per-rank JSON lines, last row per id wins; torn lines ignored."""
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(out_dir.glob(".manifest.rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            rows[row["id"]] = row
    return rows


def check_output_dir(out_dir: Path, job: PseudomaskJob, overwrite: bool) -> None:
    """Refuse a folder that holds another run's masks (or unrelated files) unless ``overwrite``."""
    run_file = out_dir / "run.json"
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output {out_dir} exists and is not a folder (--output)")
    if overwrite and out_dir.is_dir():
        for p in [*out_dir.glob("*.tif"), *(out_dir / "confidence").glob("*.tif"), *out_dir.glob(".manifest.rank*.jsonl")]:
            p.unlink()
        for name in ("run.json", "manifest.csv", "summary.json"):
            (out_dir / name).unlink(missing_ok=True)
    if run_file.is_file():
        old = json.loads(run_file.read_text())
        if old != asdict(job):
            diff = {k: (old.get(k), v) for k, v in asdict(job).items() if old.get(k) != v}
            raise ConfigError(
                f"{out_dir} holds masks of another run (differs in {', '.join(diff)}: "
                + "; ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items())
                + "). Choose another --output or pass --overwrite."
            )
    elif out_dir.is_dir() and any(out_dir.glob("*.tif")):
        raise ConfigError(f"{out_dir} already holds .tif files that no weakseg run wrote; choose another --output")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_file, asdict(job))


def check_checkpoint_matches_data(task: ClassificationTask, reader: Any, ckpt: Path) -> None:
    """Channels, classes and tile size of the data must fit the checkpoint; say which does not."""
    cfg = task.model_config
    names = list(task.class_names)
    if list(reader.class_names) != names:
        raise ConfigError(
            f"checkpoint {ckpt} was trained on classes {names} but the data has {list(reader.class_names)}"
        )
    first = reader.read_image(0)
    if first.shape[0] != cfg.in_chans:
        hint = " (was it trained with --multimodal?)" if abs(first.shape[0] - cfg.in_chans) == 2 else ""
        raise ConfigError(
            f"checkpoint {ckpt} expects {cfg.in_chans} input channels but {reader.source_path(0)} gives "
            f"{first.shape[0]}{hint}"
        )
    H, W = first.shape[-2:]
    if H < cfg.img_size[0] or W < cfg.img_size[1]:
        raise ConfigError(
            f"tiles like {reader.source_path(0)} are {H}x{W}, smaller than the input {cfg.img_size[0]}x"
            f"{cfg.img_size[1]} of checkpoint {ckpt}"
        )


def generate_pseudomasks(
    checkpoint: Path, datadir: Path, split: str, out_dir: Path, method: str = "attention", *,
    method_options: dict[str, Any] | None = None, dataset: str | None = None, oracle: bool = False,
    relabel: bool = False, threshold: float = 0.5, batch_size: int = 16, num_workers: int = 0, num_devices: int = 1,
    accelerator: str = "auto", overwrite: bool = False, progress: bool = True,
) -> dict[str, Any]:
    """Pseudomasks for every tile of ``split``; returns the summary also written to ``out_dir/summary.json``.

    Args:
        checkpoint: classifier checkpoint (``weakseg train``).
        datadir, split, dataset: the tiles (dataset kind defaults to the classifier's).
        out_dir: mask folder (masks, ``confidence/``, ``manifest.csv``, ``summary.json``, ``run.json``).
        method: a name of :data:`weakseg.methods.METHODS`; ``method_options`` its ``Options`` fields.
        oracle: ground-truth image labels instead of the predicted ones.
        relabel: re-label each region by the classifier (the sparse ViT paper's step 8).
        threshold: probability above which a label is predicted.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    runner = get_method(method, **(method_options or {}))
    task = load_classifier(checkpoint)
    runner.check_model(task.model, checkpoint)
    data_cfg = dict(task.hparams.get("data_config") or {})
    kind = dataset or data_cfg.get("dataset", "dfc2020")
    modality = data_cfg.get("modality", "s2")
    if method == "attention" and not task.model_config.gated:
        log.info("checkpoint has no gates: clustering all heads (the 'attention without pruning' baseline)")
    img_size = task.model_config.img_size
    reader = open_dataset(kind, datadir, split, modality=modality,
                          transform=build_transform("predict", img_size, data_cfg),
                          label_threshold=data_cfg.get("label_threshold", 0.10))
    if oracle and kind == "folder" and getattr(reader, "_csv_labels", None) is None and not reader.has_masks:
        raise ConfigError("--oracle needs ground-truth image labels")
    check_checkpoint_matches_data(task, reader, checkpoint)
    job = PseudomaskJob(str(checkpoint.resolve()), file_sha256(checkpoint), method, oracle, relabel, kind,
                        str(Path(datadir).resolve()), split, threshold, runner.options_dict())
    check_output_dir(out_dir, job, overwrite)
    done = {k: r for k, r in read_manifest_rows(out_dir).items()
            if r["status"] != "skipped" and (out_dir / r["file"]).is_file()}
    todo = [i for i, tid in enumerate(reader.ids) if tid not in done]
    log.info("pseudomasks (%s%s%s) for %d tiles of %r: %d done earlier, %d to do -> %s", method,
             ", oracle labels" if oracle else "", ", re-labelled" if relabel else "", len(reader), split,
             len(reader) - len(todo), len(todo), out_dir)
    t0 = time.time()
    if todo:
        tiles = _SafeTiles(reader, img_size, task.model_config.in_chans)
        loader = DataLoader(Subset(tiles, todo), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=collate_tiles)
        module = PseudomaskModule(task, runner, oracle, relabel, threshold)
        writer = PseudomaskWriter(out_dir, reader, job, list(task.class_names))
        trainer = L.Trainer(
            accelerator=accelerator, devices=num_devices, strategy="ddp" if num_devices > 1 else "auto",
            callbacks=[writer], logger=False, enable_progress_bar=progress, enable_model_summary=False,
            inference_mode=False,  # gradient-based methods need autograd inside predict_step
        )
        trainer.predict(module, dataloaders=loader, return_predictions=False)
        if not trainer.is_global_zero:
            return {}
    return finalize(out_dir, reader, job, elapsed=time.time() - t0, tiles_this_run=len(todo))


def finalize(out_dir: Path, reader: Any, job: PseudomaskJob, elapsed: float, tiles_this_run: int) -> dict[str, Any]:
    """Merge per-rank rows into ``manifest.csv`` (dataset order) and write ``summary.json``."""
    rows = read_manifest_rows(out_dir)
    missing = [t for t in reader.ids if t not in rows]
    if missing:
        raise WeaksegError(f"{len(missing)} tile(s) have no manifest row after the run: {missing[:5]}")
    ordered = [rows[t] for t in reader.ids]
    with atomic_path(out_dir / "manifest.csv") as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(ordered)
    status = Counter(r["status"] for r in ordered)
    reasons = Counter(r["reason"].split(";")[0] if r["status"] != "skipped" else "unreadable" for r in ordered)
    summary = {
        "method": job.method, "oracle": job.oracle, "relabel": job.relabel, "dataset": job.dataset,
        "split": job.split,
        "tiles": len(ordered), "written": sum(1 for r in ordered if r["file"]),
        "status": dict(status), "reasons": dict(reasons),
        "tiles_this_run": tiles_this_run, "seconds_this_run": round(elapsed, 2),
        "skipped": [{"id": r["id"], "reason": r["reason"]} for r in ordered if r["status"] == "skipped"],
    }
    checked = [r.get("assignment", "") for r in ordered if r.get("assignment")]
    if checked:
        summary["assignment"] = {"best": checked.count(ASSIGNMENT_BEST), "checked": len(checked),
                                 "labels": "oracle" if job.oracle else "predicted"}
    atomic_write_json(out_dir / "summary.json", summary)
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
