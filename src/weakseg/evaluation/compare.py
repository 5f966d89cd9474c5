"""Evaluate prediction folders (pseudomasks, segmenter outputs) against a dataset's ground-truth masks.

A prediction folder holds one mask per tile, named ``<id>.tif`` (single-band GeoTIFF, as the pseudomask writer
produces) or ``<id>.png`` (single channel), holding class ids with 255 = unlabelled. Scores follow
:mod:`weakseg.evaluation.metrics` (``datasets.md`` section 4; used for the pseudomasks of Hanna, Mommert and
Borth, "Sparse Multimodal Vision Transformer for Weakly Supervised Semantic Segmentation", CVPRW 2023): one
confusion matrix per folder over all pixels of all evaluated tiles.

**Strictness.** A folder that does not match its ground truth is usually a mistake (the wrong split, an
interrupted run), and a score over a silent subset is misleading, so by default:

- a ground-truth tile without a mask is an error; ``allow_missing=True`` evaluates the tiles present and
  reports ``tiles_missing`` / ``missing_ids`` plus a warning;
- a mask for a tile that is not in the ground truth is an error (it usually means predictions of another
  split); ``allow_extra=True`` ignores those masks and reports ``tiles_extra`` / ``extra_ids`` plus a warning;
- a folder whose masks match no ground-truth tile at all is an error even with both flags.

When several folders are compared, the ground truth of each tile is read once and all folders are scored in
the same pass; every check runs on every folder before any mask is read, so a mistake fails in seconds.

**Values.** A prediction mask may hold class ids ``0..K-1`` and 255 (unlabelled), nothing else. Any other
value (an id >= K, or a negative id in a signed mask, e.g. int16 with -1 for "no prediction") is an error that
names the file and the offending values with their pixel counts (:func:`check_prediction_ids`). Such values
mean the mask does not follow this project's format: predictions over another class list (raw DFC2020 ids
1..10 that were never remapped), a colour palette saved instead of ids, or another no-data convention. Scoring
them as unlabelled, as :class:`~weakseg.evaluation.metrics.ConfusionMatrix` does for a library caller, would
lower the scores with no hint why; and no writer in this project produces them, so no use case needs the
silent path.

Plain (non-georeferenced) GeoTIFF masks are read without rasterio's ``NotGeoreferencedWarning``: evaluation
never uses the georeference, so the warning would only be noise.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from weakseg.data.classes import IGNORE_INDEX
from weakseg.errors import DataError
from weakseg.evaluation.metrics import ConfusionMatrix, compute_scores

#: Endings of prediction masks (case-insensitive); other files (JSON, logs, ``.tmp``) are skipped.
MASK_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png")

#: How many ids an error message lists before summarising the rest as a count.
_IDS_SHOWN = 5


class GroundTruth(Protocol):
    """What evaluation needs from a dataset reader (``DFC2020Dataset``, ``FolderDataset`` provide it)."""

    ids: Sequence[str]
    class_names: Sequence[str]

    def read_mask(self, i: int) -> np.ndarray:
        """Mask of tile ``i``: uint8 (H, W), class ids with 255 = ignore."""
        ...


def _some_ids(ids: Sequence[str]) -> str:
    """'a, b, c' or 'a, b, c, ... (N in total)' for error messages."""
    shown = ", ".join(repr(i) for i in ids[:_IDS_SHOWN])
    return shown if len(ids) <= _IDS_SHOWN else f"{shown}, ... ({len(ids)} in total)"


def list_prediction_masks(pred_dir: Path) -> dict[str, Path]:
    """Map tile id -> mask file for every ``<id>.tif|.tiff|.png`` in ``pred_dir`` (not recursive).

    Raises:
        DataError: the folder does not exist, is not a folder, holds no masks, or holds two masks for one id.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.exists():
        raise DataError(f"prediction folder {pred_dir} does not exist")
    if not pred_dir.is_dir():
        raise DataError(f"prediction folder {pred_dir} is not a folder")
    masks: dict[str, Path] = {}
    for path in sorted(pred_dir.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in MASK_SUFFIXES or not path.is_file():
            continue
        tile_id = path.stem
        if tile_id in masks:
            raise DataError(
                f"prediction folder {pred_dir} holds two masks for tile {tile_id!r}: "
                f"{masks[tile_id].name} and {path.name}; keep one"
            )
        masks[tile_id] = path
    if not masks:
        raise DataError(
            f"prediction folder {pred_dir} holds no prediction masks (expected <id>.tif or <id>.png files)"
        )
    return masks


def read_prediction_mask(path: Path) -> np.ndarray:
    """Read one prediction mask: a single-band GeoTIFF (rasterio) or a single-channel PNG (Pillow).

    Palette PNGs are read as their indices, which is how segmentation masks are usually stored.

    Returns:
        Integer array (H, W), usually uint8, class ids with 255 = unlabelled.

    Raises:
        DataError: the file cannot be read, has more than one band, or holds non-integer values.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with warnings.catch_warnings():
                # Plain TIFFs have no georeference, and evaluation needs none.
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(path) as src:
                    if src.count != 1:
                        raise DataError(
                            f"prediction mask {path} has {src.count} bands; "
                            "a mask must be a single band of class ids"
                        )
                    mask = src.read(1)  # (H, W)
        else:
            with Image.open(path) as image:
                bands = image.getbands()
                if len(bands) != 1:
                    raise DataError(
                        f"prediction mask {path} has {len(bands)} bands ({image.mode}); "
                        "a mask must be a single channel of class ids"
                    )
                mask = np.asarray(image)  # (H, W)
    except DataError:
        raise
    except (OSError, ValueError, RasterioError) as error:
        # RasterioIOError and PIL.UnidentifiedImageError are OSErrors; truncated files raise OSError on load.
        raise DataError(f"cannot read prediction mask {path}: {error}") from error
    if not np.issubdtype(mask.dtype, np.integer):
        raise DataError(
            f"prediction mask {path} holds {mask.dtype} values; a mask holds integer class ids (uint8)"
        )
    return mask


def check_prediction_ids(mask: np.ndarray, path: Path, class_names: Sequence[str]) -> None:
    """Refuse a prediction mask holding values other than class ids ``0..K-1`` and 255 (module docstring).

    Every pixel is checked, including those whose ground truth is ignored: a single foreign value shows that
    the whole file follows another convention.

    Raises:
        DataError: naming ``path``, the offending values with their pixel counts, and the valid ids.
    """
    k = len(class_names)
    bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= k))
    if not bad.any():
        return
    values, counts = np.unique(mask[bad], return_counts=True)
    shown = ", ".join(f"{int(v)} ({int(c)} pixels)" for v, c in zip(values[:10], counts[:10], strict=True))
    if len(values) > 10:
        shown += f", ... ({len(values)} values in total)"
    raise DataError(
        f"prediction mask {path} holds values that are neither a class id 0..{k - 1} nor {IGNORE_INDEX} "
        f"(unlabelled): {shown}; a mask holds the ids of the dataset's classes "
        f"({_some_ids(list(class_names))}) and {IGNORE_INDEX} where it gives no class; convert other ids or "
        "no-data values (e.g. -1) first"
    )


class _FolderPlan:
    """One folder's masks and its tile bookkeeping, checked before any pixel is read."""

    def __init__(self, pred_dir: Path, masks: dict[str, Path], missing: list[str], extra: list[str]) -> None:
        self.pred_dir = pred_dir
        self.masks = masks
        self.missing = missing
        self.extra = extra
        self.warnings: list[str] = []
        self.evaluated: list[str] = []


def _plan_folder(pred_dir: Path, ids: Sequence[str], allow_missing: bool, allow_extra: bool) -> _FolderPlan:
    """List a folder's masks and apply the missing / extra tile rules of the module docstring."""
    masks = list_prediction_masks(pred_dir)
    gt_ids = set(ids)
    missing = [tile_id for tile_id in ids if tile_id not in masks]
    extra = sorted(tile_id for tile_id in masks if tile_id not in gt_ids)
    if len(extra) == len(masks):
        raise DataError(
            f"none of the {len(masks)} masks in {pred_dir} matches a ground-truth tile (masks: "
            f"{_some_ids(sorted(masks))}; ground truth: {_some_ids(list(ids))}); wrong folder or split?"
        )
    if missing and not allow_missing:
        raise DataError(
            f"{len(missing)} of {len(ids)} ground-truth tiles have no mask in {pred_dir}: "
            f"{_some_ids(missing)}; "
            "pass allow_missing (--allow_missing) to evaluate only the tiles present"
        )
    if extra and not allow_extra:
        raise DataError(
            f"{len(extra)} masks in {pred_dir} belong to no ground-truth tile: {_some_ids(extra)}; "
            "wrong split? pass allow_extra (--allow_extra) to ignore them"
        )
    plan = _FolderPlan(Path(pred_dir), masks, missing, extra)
    if missing:
        plan.warnings.append(
            f"{pred_dir}: {len(missing)} of {len(ids)} ground-truth tiles have no mask and were not "
            "evaluated: "
            f"{_some_ids(missing)}"
        )
    if extra:
        plan.warnings.append(
            f"{pred_dir}: {len(extra)} masks belong to no ground-truth tile and were ignored: "
            f"{_some_ids(extra)}"
        )
    return plan


def _evaluate_many(
    named_dirs: Mapping[str, Path], ground_truth: GroundTruth, allow_missing: bool, allow_extra: bool
) -> dict[str, dict[str, Any]]:
    """Score every folder in one pass over the ground truth (each ground-truth mask is read once)."""
    if not named_dirs:
        raise ValueError("no prediction folders given")
    ids = list(ground_truth.ids)
    if not ids:
        raise DataError("the ground-truth dataset has no tiles")
    if getattr(ground_truth, "has_masks", True) is False:
        raise DataError("the ground-truth dataset has no masks for this split; it cannot be evaluated")
    class_names = list(ground_truth.class_names)

    plans = {name: _plan_folder(Path(d), ids, allow_missing, allow_extra) for name, d in named_dirs.items()}
    matrices = {name: ConfusionMatrix(len(class_names)) for name in plans}

    for index, tile_id in enumerate(ids):
        needing = [name for name, plan in plans.items() if tile_id in plan.masks]
        if not needing:
            continue
        # read_target: the ground truth with 255 where the image has no data (weakseg.data.nodata), if the reader can.
        gt = np.asarray(getattr(ground_truth, "read_target", ground_truth.read_mask)(index))  # (H, W)
        for name in needing:
            plan = plans[name]
            path = plan.masks[tile_id]
            pred = read_prediction_mask(path)  # (H, W)
            if pred.shape != gt.shape:
                raise DataError(
                    f"prediction mask {path} is {pred.shape[0]}x{pred.shape[1]} (height x width) but the "
                    f"ground truth of tile {tile_id!r} is {gt.shape[0]}x{gt.shape[1]}"
                )
            check_prediction_ids(pred, path, class_names)
            try:
                matrices[name].update(gt, pred)
            except DataError as error:
                raise DataError(f"ground truth of tile {tile_id!r} (index {index}): {error}") from error
            plan.evaluated.append(tile_id)

    evaluated_sets = {frozenset(plan.evaluated) for plan in plans.values()}
    results: dict[str, dict[str, Any]] = {}
    for name, plan in plans.items():
        warnings = list(plan.warnings)
        if len(evaluated_sets) > 1:
            warnings.append(
                "the compared folders were evaluated on different tiles; "
                "their scores are not directly comparable"
            )
        result = compute_scores(matrices[name], class_names)
        if result["evaluated_pixels"] == 0:
            warnings.append(f"{plan.pred_dir}: the evaluated tiles have no labelled ground-truth pixel")
        result.update(
            {
                "predictions": str(plan.pred_dir),
                "tiles_evaluated": len(plan.evaluated),
                "tiles_in_ground_truth": len(ids),
                "tiles_missing": len(plan.missing),
                "missing_ids": plan.missing,
                "tiles_extra": len(plan.extra),
                "extra_ids": plan.extra,
                "warnings": warnings,
            }
        )
        results[name] = result
    return results


def evaluate_folder(
    pred_dir: Path, ground_truth: GroundTruth, allow_missing: bool = False, allow_extra: bool = False
) -> dict[str, Any]:
    """Score one prediction folder against the ground truth.

    Args:
        pred_dir: folder of ``<id>.tif`` / ``<id>.png`` masks.
        ground_truth: a reader with ``ids``, ``read_mask(i)`` and ``class_names``.
        allow_missing: evaluate the tiles present instead of failing when ground-truth tiles have no mask.
        allow_extra: ignore masks of tiles that are not in the ground truth instead of failing.

    Returns:
        The :func:`~weakseg.evaluation.metrics.compute_scores` dict plus ``predictions`` (the folder),
        ``tiles_evaluated``, ``tiles_in_ground_truth``, ``tiles_missing``, ``missing_ids``, ``tiles_extra``,
        ``extra_ids`` and ``warnings`` (list of messages).

    Raises:
        DataError: see the module docstring; every message names the folder or file.
    """
    return _evaluate_many({"prediction": pred_dir}, ground_truth, allow_missing, allow_extra)["prediction"]


def compare_folders(
    named_dirs: Mapping[str, Path],
    ground_truth: GroundTruth,
    allow_missing: bool = False,
    allow_extra: bool = False,
) -> dict[str, dict[str, Any]]:
    """Score several prediction folders against the same ground truth in one pass.

    Args:
        named_dirs: ``{method name: folder}``; the result keeps this order.
        ground_truth, allow_missing, allow_extra: as in :func:`evaluate_folder`, applied to every folder.

    Returns:
        ``{method name: evaluate_folder-style result}``. If the folders ended up evaluated on different tiles
        (possible only with ``allow_missing``), every result carries a warning saying so.
    """
    return _evaluate_many(named_dirs, ground_truth, allow_missing, allow_extra)
