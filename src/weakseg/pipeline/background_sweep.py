"""Choosing the background threshold t on ground truth: ``weakseg pseudomasks --sweep_background``.

WeakTr (``weaktr.md`` section 2-3) and most CAM methods on VOC paint background wherever no class map reaches a
constant t; t is swept on ground-truth masks of the training split (0.40-0.59 in WeakTr; ``datasets.md`` 4:
0.3-0.6). That uses masks, so weakseg says so and sweeps on whatever split it is given: choose it on a holdout
(``<split>:holdout``) and report on another split. For every t the masks are exactly those ``weakseg pseudomasks``
writes with ``--background_threshold t`` (the same maps, rule and no-data handling); the maps are computed once
per tile and one confusion matrix per t is accumulated.

Output: ``<output>/background_sweep.json`` (every t with OA, AA and mIoU, the best t, the split, and
``"used_ground_truth_masks": true``) and a printed table. No mask is written.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from weakseg.data.nodata import unlabel_invalid
from weakseg.errors import ConfigError
from weakseg.evaluation.metrics import ConfusionMatrix, compute_scores
from weakseg.io import atomic_write_json, make_dir
from weakseg.masks.labels import oracle_label_sets, predicted_label_sets
from weakseg.methods.base import ClassMapMethod

log = logging.getLogger(__name__)


def parse_sweep(spec: str) -> list[float]:
    """``"0.30:0.60:0.01"`` (start:stop:step, stop included) or ``"0.4,0.45"`` -> thresholds in (0, 1)."""
    spec = str(spec).strip()
    try:
        if ":" in spec:
            start, stop, step = (float(v) for v in spec.split(":"))
            if not step > 0 or stop < start:
                raise ValueError
            values = [round(start + i * step, 6) for i in range(int(np.floor((stop - start) / step + 1e-9)) + 1)]
        else:
            values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--sweep_background {spec!r}: give START:STOP:STEP such as 0.30:0.60:0.01, or a comma "
                          "list such as 0.4,0.45") from None
    if not values or any(not 0 < v < 1 for v in values):
        raise ConfigError(f"--sweep_background {spec!r}: thresholds must lie in (0, 1)")
    return values


def sweep_background_threshold(
    checkpoint: Path, datadir: Path, split: str, out_dir: Path, method: str, thresholds: list[float], *,
    method_options: dict[str, Any] | None = None, dataset: str | None = None, oracle: bool = False,
    threshold: float = 0.5, batch_size: int = 16, num_workers: int = 0, progress: bool = True,
) -> dict[str, Any]:
    """Score the masks of every background threshold in ``thresholds`` on ``split``'s masks (module docstring).

    Raises:
        ConfigError: the method has no class maps, the data has no background class or the split has no masks.
    """
    from weakseg.pipeline.pseudomasks import _SafeTiles, check_run_settings, collate_tiles, open_method_run

    check_run_settings(threshold=threshold, batch_size=batch_size, num_workers=num_workers, num_devices=1)
    options = {**(method_options or {}), "rule": "background"}
    runner, task, reader, _ = open_method_run(Path(checkpoint), Path(datadir), split, method, options, dataset,
                                              oracle)
    if not isinstance(runner, ClassMapMethod):
        raise ConfigError(f"--sweep_background needs a method with class maps (weaktr, class_attention, gradcam); "
                          f"--method {method} has none")
    if not reader.has_masks:
        raise ConfigError(f"--sweep_background needs ground-truth masks, and split {split!r} of {datadir} has none")
    model = task.model.eval()
    names = list(reader.class_names)
    matrices = [ConfusionMatrix(len(names)) for _ in thresholds]
    loader = DataLoader(_SafeTiles(reader, task.model_config.img_size, task.model_config.in_chans),
                        batch_size=batch_size, num_workers=num_workers, collate_fn=collate_tiles)
    t0, done, skipped = time.time(), 0, 0
    for batch in loader:
        ok = [i for i, e in enumerate(batch["error"]) if not e]
        skipped += len(batch["id"]) - len(ok)
        if not ok:
            continue
        images = batch["image"][ok]
        with torch.no_grad():
            probs = model(images).sigmoid()
        labels = oracle_label_sets(batch["label"][ok]) if oracle else predicted_label_sets(probs, threshold)
        sizes = [tuple(batch["mask"][i].shape) for i in ok]
        for size in sorted(set(sizes)):
            group = [j for j, s in enumerate(sizes) if s == size]
            g = torch.tensor(group)
            maps = runner.merged_maps(model, images[g], labels[g], size)  # once per tile
            for t, cm in zip(thresholds, matrices, strict=True):
                res = runner.masks_from_maps(maps, probs[g], labels[g], size, background_threshold=t)
                for k, j in enumerate(group):
                    i = ok[j]
                    mask, _ = unlabel_invalid(res.masks[k], res.confidence[k], batch["valid"][i])  # type: ignore[index]
                    cm.update(batch["mask"][i].cpu().numpy(), mask)
        done += len(ok)
        if progress:
            log.info("background sweep: %d/%d tiles (%.0fs)", done + skipped, len(reader), time.time() - t0)
    if done == 0:
        raise ConfigError(f"--sweep_background: no tile of split {split!r} could be read")
    rows = []
    for t, cm in zip(thresholds, matrices, strict=True):
        scores = compute_scores(cm, names)
        rows.append({"threshold": t, "miou": scores["miou"], "oa": scores["oa"], "aa": scores["aa"]})
    best = max(rows, key=lambda r: (r["miou"] if r["miou"] is not None else -1.0, -abs(r["threshold"] - 0.5)))
    summary = {
        "method": method, "method_options": runner.options_dict(), "split": split, "oracle": oracle,
        "tiles": done, "skipped_tiles": skipped, "used_ground_truth_masks": True,
        "best_threshold": best["threshold"], "best_miou": best["miou"], "thresholds": rows,
        "background_class": names[runner.background_index] if runner.background_index is not None else None,
        "note": f"t was chosen on the ground-truth masks of split {split!r}: report results on another split",
    }
    make_dir(Path(out_dir), "--output folder")
    atomic_write_json(Path(out_dir) / "background_sweep.json", summary, durable=True)
    return summary


def print_sweep(summary: dict[str, Any], out_dir: Path) -> None:
    print(f"\nbackground threshold sweep ({summary['method']}, {'oracle' if summary['oracle'] else 'predicted'} "
          f"labels) on the ground-truth masks of split {summary['split']!r}, {summary['tiles']} tiles:")
    print(f"  {'t':>6} {'OA':>6} {'AA':>6} {'mIoU':>6}")
    for r in summary["thresholds"]:
        mark = "  <- best" if r["threshold"] == summary["best_threshold"] else ""
        print(f"  {r['threshold']:6.3f} {_pct(r['oa'])} {_pct(r['aa'])} {_pct(r['miou'])}{mark}")
    print(f"best t = {summary['best_threshold']:g} (mIoU {_pct(summary['best_miou']).strip()}), chosen with the "
          f"ground-truth masks of {summary['split']!r}: report on another split; use it with "
          f"--background_threshold {summary['best_threshold']:g}")
    print(f"written: {out_dir / 'background_sweep.json'}")


def _pct(v: float | None) -> str:
    return f"{'-':>6}" if v is None else f"{100 * v:6.1f}"

