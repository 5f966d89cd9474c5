"""Training targets for the segmenter: tiles of a reader paired with masks that are not the reader's own.

Refinement (:mod:`weakseg.pipeline.refine`) trains a UNet on pseudomasks, or on the previous UNet's
predictions, never on the ground truth it would read through the reader's ``__getitem__``. This module reads
those masks from a mask folder (:mod:`weakseg.data.mask_files`: ``<id>.tif`` class ids, 255 = unlabelled,
and ``confidence/<id>.tif``), turns the pixels whose confidence is below a threshold into 255 so the loss
ignores them, and serves ``(image, mask)`` samples through :class:`TargetTiles`.

Confidence rule (the same for every iteration): a pixel whose stored confidence (``round(255 * c) / 255``) is
below ``min_confidence`` becomes 255. A mask folder without a ``confidence/`` folder (masks made by another
tool) counts every pixel as confident; a ``confidence/`` folder that lacks some tiles is an error, because
filtering some tiles and not others would bias the targets silently.

Memory (issue 12): the masks are never held for the whole split. :func:`load_targets` reads every mask (and
confidence map) once to check it against its tile and count the ignored pixels, then keeps only the file names
(:class:`FolderMasks`); :class:`TargetTiles` reads a tile's mask again, with the same checks and the same
low-confidence rule, when the tile is drawn. A split of 10,000 64 x 64 tiles held 40 MB of masks that way (and
a 512 x 512 one 2.6 GB); now it holds 10,000 file names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from weakseg.data.base import ignore_invalid
from weakseg.data.classes import IGNORE_INDEX
from weakseg.data.nodata import finite_entries
from weakseg.errors import DataError
from weakseg.evaluation.compare import list_prediction_masks, read_prediction_mask
from weakseg.data.mask_files import CONFIDENCE_DIR, confidence_path, read_confidence

log = logging.getLogger(__name__)

#: How many ids an error message lists.
_IDS_SHOWN = 3


class TargetTiles(Dataset):
    """Tiles of a reader paired with target masks (pseudomasks or ground truth).

    The reader's own ``__getitem__`` is not used because it reads the ground-truth mask, which refinement must
    not see; images come from ``read_image`` and targets from ``masks``.

    Args:
        reader: dataset reader (``read_image``, ``ids``).
        masks: one uint8 (H, W) mask per tile, 255 = ignore, or None for prediction (no targets). Any sequence:
            refinement passes :class:`FolderMasks` or :class:`ReaderMasks`, which read tile ``i``'s mask only
            when ``masks[i]`` is asked for, so nothing per tile stays in memory.
        transform: sample transform (crop, augmentation, normalisation) from ``build_transform``.
        tile_size: (H, W) every tile must have (tiles are batched).
    """

    def __init__(
        self,
        reader: Any,
        masks: Sequence[np.ndarray] | None,
        transform: Callable[[dict[str, Any]], dict[str, Any]],
        tile_size: tuple[int, int],
    ) -> None:
        self.reader, self.masks, self.transform, self.tile_size = reader, masks, transform, tile_size

    def __len__(self) -> int:
        return len(self.reader.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = torch.from_numpy(np.asarray(self.reader.read_image(i), dtype=np.float32))  # (C, H, W)
        if tuple(image.shape[-2:]) != self.tile_size:
            raise DataError(
                f"tile {self.reader.source_path(i)} is {image.shape[-2]}x{image.shape[-1]} but the first "
                f"tile of the split is {self.tile_size[0]}x{self.tile_size[1]}; refinement needs tiles of "
                "one size"
            )
        sample: dict[str, Any] = {"image": image, "valid": finite_entries(image).all(0), "id": self.reader.ids[i],
                                  "index": i}  # valid: (H, W) pixels with data (weakseg.data.nodata)
        if self.masks is not None:
            mask = self.masks[i]  # (H, W)
            if mask.shape != self.tile_size:
                raise DataError(
                    f"the target mask of tile {self.reader.ids[i]!r} is {mask.shape[0]}x{mask.shape[1]} "
                    f"but the tile {self.reader.source_path(i)} is {self.tile_size[0]}x{self.tile_size[1]}"
                )
            sample["mask"] = torch.from_numpy(mask.astype(np.int64))
        return ignore_invalid(self.transform(sample))  # no-data pixels: 255 in the target, no NaN in the image


@dataclass
class TargetMasks:
    """The targets of one training stage and how much of them the loss ignores.

    Attributes:
        masks: one uint8 (H, W) mask per tile in the reader's order, 255 = ignored (unlabelled in the source,
            or below ``min_confidence``); read from disk per tile (:class:`FolderMasks`, :class:`ReaderMasks`)
            or, from :meth:`from_masks`, a list held in memory.
        ignored_fraction: fraction of all target pixels that are 255, i.e. that the loss ignores.
        low_confidence_fraction: fraction of all target pixels that were labelled in the source but turned to
            255 because their confidence is below ``min_confidence`` (part of ``ignored_fraction``).
        has_confidence: whether the source folder had confidence maps (False: every pixel counted as
            confident, or ground truth).
    """

    masks: Sequence[np.ndarray]
    ignored_fraction: float
    low_confidence_fraction: float = 0.0
    has_confidence: bool = False

    @classmethod
    def from_masks(cls, masks: Sequence[np.ndarray]) -> TargetMasks:
        """Targets used as they are (ground truth), held in memory: only their own 255 pixels are ignored."""
        masks = [np.asarray(m, dtype=np.uint8) for m in masks]
        return cls(masks=masks, ignored_fraction=ignored_fraction(masks))

    @classmethod
    def from_reader(cls, reader: Any) -> TargetMasks:
        """The reader's ground-truth masks as targets (the supervised upper bound), read per tile.

        Each mask is read once here for the ignored fraction and again when its tile is drawn, so memory does
        not grow with the split (:class:`ReaderMasks`).
        """
        masks = ReaderMasks(reader)
        return cls(masks=masks, ignored_fraction=ignored_fraction(masks))


class ReaderMasks(Sequence[np.ndarray]):
    """The ground-truth masks of ``reader`` as a sequence: ``masks[i]`` is ``reader.read_mask(i)`` as uint8 (H, W),
    read when asked for (nothing is kept)."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader.ids)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        i = range(len(self))[i]  # IndexError past the end (ends iteration), negative indices from the end
        return np.asarray(self.reader.read_mask(i), dtype=np.uint8)  # (H, W)


class FolderMasks(Sequence[np.ndarray]):
    """The target masks of one mask folder, one per tile of a split, read from disk when asked for.

    Why: holding every mask of the split made refinement's memory grow with the number of tiles (4 kB per
    64 x 64 tile, 256 kB per 512 x 512 one). Only the file names are kept; ``masks[i]`` reads
    ``<folder>/<name>`` and, with ``min_confidence``, ``<folder>/confidence/<id>.tif``, with the checks of
    :func:`load_targets` (so a file changed after the check fails with the same message naming it) and the same
    low-confidence rule (:func:`drop_low_confidence`).

    Args:
        folder: the mask folder.
        ids: tile ids in the reader's order.
        names: file name of each tile's mask in ``folder`` (``<id>.tif`` or ``<id>.png``).
        split, tile_size, num_classes: what the masks are checked against (named in the messages).
        min_confidence: the threshold applied with the tile's confidence map, or None to read no confidence
            (no ``confidence/`` folder, or a threshold of 0 that no pixel can be below).
    """

    def __init__(self, folder: Path, ids: Sequence[str], names: Sequence[str], split: str,
                 tile_size: tuple[int, int], num_classes: int, min_confidence: float | None = None) -> None:
        if len(ids) != len(names):
            raise ValueError(f"{len(ids)} tile ids but {len(names)} mask files")
        self.folder, self.ids, self.names = Path(folder), list(ids), list(names)
        self.split, self.tile_size, self.num_classes = split, tuple(tile_size), int(num_classes)
        self.min_confidence = min_confidence

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        return self.read(i)[0]

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(target, source) uint8 (H, W) masks of tile ``i``: the target has the low-confidence pixels set to 255,
        the source is the file as written (the same array when no confidence is applied)."""
        i = range(len(self))[i]  # IndexError past the end (ends iteration), negative indices from the end
        tile_id = self.ids[i]
        mask = _read_checked_mask(self.folder / self.names[i], tile_id, self.split, self.tile_size,
                                  self.num_classes)  # (H, W) uint8
        if self.min_confidence is None:
            return mask, mask
        path = confidence_path(self.folder, tile_id)
        confidence = read_confidence(path)  # (H, W) float32 in [0, 1]
        if confidence.shape != mask.shape:
            raise DataError(
                f"confidence map {path} is {confidence.shape[0]}x{confidence.shape[1]} but its mask is "
                f"{mask.shape[0]}x{mask.shape[1]}"
            )
        return drop_low_confidence(mask, confidence, self.min_confidence), mask

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))


def ignored_fraction(masks: Sequence[np.ndarray]) -> float:
    """Fraction of the pixels of ``masks`` equal to 255 (0.0 for no pixels); reads the masks one at a time."""
    total = ignored = 0
    for m in masks:
        total += int(m.size)
        ignored += int(np.count_nonzero(m == IGNORE_INDEX))
    return ignored / total if total else 0.0


def _some_ids(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_IDS_SHOWN])
    return shown if len(ids) <= _IDS_SHOWN else f"{shown}, ..."


def _read_checked_mask(path: Path, tile_id: str, split: str, tile_size: tuple[int, int],
                       num_classes: int) -> np.ndarray:
    """The uint8 (H, W) mask at ``path``, checked to be ``tile_size`` and to hold class ids or 255 only."""
    mask = read_prediction_mask(path)  # (H, W)
    if mask.shape != tile_size:
        raise DataError(
            f"pseudomask {path} is {mask.shape[0]}x{mask.shape[1]} but tile {tile_id!r} of split "
            f"{split!r} is {tile_size[0]}x{tile_size[1]}"
        )
    bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= num_classes))
    if bad.any():
        values = np.unique(mask[bad])[:5].tolist()
        raise DataError(
            f"pseudomask {path} holds values {values} that are neither a class id in [0, {num_classes}) "
            f"nor the ignore index {IGNORE_INDEX}"
        )
    return mask.astype(np.uint8)


def _mask_names(folder: Path, reader: Any, split: str) -> list[str]:
    """File name of each tile's mask in ``folder`` (reader order); no pixel is read.

    Raises:
        DataError: the folder is missing or empty, or lacks masks of the split (count and a few ids).
    """
    if not folder.is_dir():
        raise DataError(
            f"pseudomask folder {folder} does not exist (--pseudomasks); create it with `weakseg pseudomasks`"
        )
    files = list_prediction_masks(folder)  # id -> path of every mask in the folder, dropped on return
    ids = list(reader.ids)
    missing = [tile_id for tile_id in ids if tile_id not in files]
    if missing:
        raise DataError(
            f"pseudomask folder {folder} lacks masks for {len(missing)} of the {len(ids)} tiles of split "
            f"{split!r}: {_some_ids(missing)}; was it made for another split or interrupted?"
        )
    return [files[tile_id].name for tile_id in ids]


def load_mask_folder(folder: Path, reader: Any, split: str, tile_size: tuple[int, int]) -> FolderMasks:
    """The masks of every tile of ``split`` in ``folder``, each read once now and checked against its tile.

    Masks of other tiles in the folder are ignored (a folder may cover several splits). The masks are not kept:
    the result reads them again when indexed (:class:`FolderMasks`).

    Returns:
        One uint8 (H, W) mask per tile, in the reader's order.

    Raises:
        DataError: the folder is missing or empty, lacks masks of the split (the message gives the count and a
            few ids), a mask's size differs from the tile, or a mask holds values that are neither a class id
            nor 255.
    """
    folder = Path(folder)
    masks = FolderMasks(folder, list(reader.ids), _mask_names(folder, reader, split), split, tile_size,
                        len(reader.class_names))
    for i in range(len(masks)):
        masks.read(i)  # checked, then dropped
    return masks


def has_confidence_maps(folder: Path, ids: Sequence[str], split: str) -> bool:
    """Whether mask folder ``folder`` holds a confidence map for every tile in ``ids``.

    Returns:
        False when there is no ``confidence/`` folder at all (every pixel then counts as confident), True when
        every tile has ``confidence/<id>.tif``. Files of other tiles are ignored.

    Raises:
        DataError: ``confidence/`` exists but lacks some tiles (the message names the folder, the count and a
            few ids).
    """
    conf_dir = Path(folder) / CONFIDENCE_DIR
    if not conf_dir.is_dir():
        return False
    missing = [tile_id for tile_id in ids if not confidence_path(folder, tile_id).is_file()]
    if missing:
        raise DataError(
            f"mask folder {folder} has confidence maps ({conf_dir}) for only {len(ids) - len(missing)} "
            f"of the {len(ids)} tiles of split {split!r}; missing: {_some_ids(missing)}. Filtering some "
            "tiles by confidence and not others would bias the targets: re-create the folder, or delete "
            f"{conf_dir} to count every pixel as confident"
        )
    return True


def drop_low_confidence(mask: np.ndarray, confidence: np.ndarray, min_confidence: float) -> np.ndarray:
    """``mask`` with the pixels whose confidence is below ``min_confidence`` set to 255 (a new array).

    Args:
        mask: uint8 (H, W) class ids, 255 = unlabelled.
        confidence: float (H, W) in [0, 1], as :func:`~weakseg.data.mask_files.read_confidence` returns.
        min_confidence: threshold in [0, 1]; pixels at or above it keep their label.
    """
    if confidence.shape != mask.shape:
        raise ValueError(f"confidence {confidence.shape} and mask {mask.shape} differ in shape")
    # Compare in float32, the precision read_confidence returns: a threshold equal to a stored value keeps it.
    low = confidence < np.float32(min_confidence)  # (H, W) bool
    return np.where(low, np.uint8(IGNORE_INDEX), mask).astype(np.uint8)


def load_targets(folder: Path, reader: Any, split: str, tile_size: tuple[int, int],
                 min_confidence: float) -> TargetMasks:
    """Masks of ``folder`` for every tile of ``split``, with pixels below ``min_confidence`` set to 255.

    Reads ``<folder>/<id>.tif`` and ``<folder>/confidence/<id>.tif`` once each, to check them and count the
    ignored pixels, one tile at a time; the returned masks read them again when a tile is drawn
    (:class:`FolderMasks`). Without a ``confidence/`` folder every pixel counts as confident (one info line says
    so). With ``min_confidence == 0`` no pixel can be below it, so the confidence maps are checked for presence
    but not read. The checks that need no pixel (missing masks, missing confidence maps) come first.

    Raises:
        DataError: as :func:`load_mask_folder`; ``confidence/`` lacking some tiles
            (:func:`has_confidence_maps`); a confidence map unreadable or of another size than its mask.
    """
    folder = Path(folder)
    names = _mask_names(folder, reader, split)
    ids = list(reader.ids)
    has_confidence = has_confidence_maps(folder, ids, split)
    if not has_confidence:
        log.info("mask folder %s has no %s/ folder (masks made elsewhere?): every pixel counts as confident",
                 folder, CONFIDENCE_DIR)
    masks = FolderMasks(folder, ids, names, split, tile_size, len(reader.class_names),
                        min_confidence if has_confidence and min_confidence > 0 else None)
    total = ignored = low_confidence = 0
    for i in range(len(masks)):
        target, source = masks.read(i)  # (H, W) uint8 each
        total += int(target.size)
        ignored += int(np.count_nonzero(target == IGNORE_INDEX))
        low_confidence += int(np.count_nonzero((target == IGNORE_INDEX) & (source != IGNORE_INDEX)))
    return TargetMasks(masks=masks, ignored_fraction=ignored / total if total else 0.0,
                       low_confidence_fraction=low_confidence / total if total else 0.0,
                       has_confidence=has_confidence)
