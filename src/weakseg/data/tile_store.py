"""An on-disk, memory-mapped store of one dataset split, so training reads arrays instead of decoding GeoTIFFs.

**Why.** The real DFC2020 at 256 x 256 is about 17.5 GB as float32 S2 (20 GB with S1), SEN12MS has 180k
triplets. Without a store every epoch re-decodes every GeoTIFF (rasterio + scaling + no-data checks); the
in-memory ``cache`` of :class:`~weakseg.data.base.TileDataset` keeps float32 tiles in a dict per process, which
multiplies with DataLoader workers and DDP ranks and cannot hold the real split in 24 GB. A store is written once
by ``weakseg prepare`` and read through ``numpy`` memory maps: pages are file-backed and shared by every process
through the page cache, so reading costs no anonymous memory, and a tile is a slice plus one ``astype``.

**Layout** of a store folder (default ``<root>/.weakseg_store/<kind>-<base split>-<modality>/``,
:func:`default_store_path`)::

    images.npy          (N, C, H, W) float16 (default) or float32: exactly what ``reader.read_image(i)`` returns
                        (scaled, unnormalised; NaN where a pixel has no data), rounded to the dtype
    masks.npy           (N, H, W) uint8, ``reader.read_mask(i)``; only when the reader has masks
    meta.json           written LAST, atomically: its presence means the store is complete (format version, kind,
                        root, split, modality, dtype, ids, shape, per-band stats with the float16 rounding error,
                        per tile the fingerprint (relative path, size, mtime_ns) of every source file, skipped tiles)
    skipped_tiles.csv   tiles that could not be stored and why (``split,id,file,reason``; a header alone if none)
    progress.json       while ``prepare`` runs: how many tiles are written and flushed (removed when complete)
    fingerprints.jsonl  while ``prepare`` runs: one line per processed tile (removed when complete)

A store holds a whole *base* split (``validation``); parts (``validation:train``, ``validation:holdout``) are
views by tile id (:meth:`TileStore.index_of`), so one store serves every part. It holds fixed-size tiles only
(DFC2020, SEN12MS): a tile of another height or width than the first stops ``prepare``
(:class:`~weakseg.errors.DataError` naming the tile and both sizes); a folder dataset of mixed sizes keeps reading
its files.

**float16** halves the disk and page-cache footprint. Sentinel values scaled to [0, 1] lose at most 2^-12 (about
2.4e-4, half a float16 step below 1) per value; ``meta.json`` records the error measured while writing, per band,
so the cost is visible. Values beyond float16's range (65504) would turn into inf, which reads as "no data": such
a store is refused with a hint to use ``--dtype float32`` (bit-identical to the source reads).

**Freshness.** :meth:`TileStore.is_fresh` compares the fingerprints recorded for each tile with the files now on
disk (``stat`` only, no pixel data). :func:`attach_store` (called by :func:`weakseg.data.open_dataset`) attaches
a fresh store to the reader and otherwise logs one warning naming the store and the changed file and reads the
files, so an edited tile is never served from a stale copy.

**Resumable.** ``prepare`` flushes the memory maps, appends the fingerprints of the tiles written and then
rewrites ``progress.json`` atomically every few tiles. A killed ``prepare`` restarted with the same sources checks
the fingerprints of the tiles done and continues from there; if they changed (or the split, the tile shape, the
dtype), it starts over.

**Processes.** A :class:`TileStore` opens its memory maps lazily, once per process (the pid is checked); pickling
it (DataLoader workers started with ``spawn``, DDP) carries the path and ids, never the arrays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weakseg.errors import ConfigError, DataError, WeaksegError
from weakseg.io import (
    atomic_path,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    folder_lock,
    make_dir,
    to_json_compatible,
)

log = logging.getLogger("weakseg")

#: Bumped whenever the files of a store change meaning; a store of another version is rebuilt, never misread.
FORMAT_VERSION = 1
#: Folder below a dataset root that holds its stores.
STORE_DIRNAME = ".weakseg_store"
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
FINGERPRINTS_FILE = "fingerprints.jsonl"
IMAGES_FILE = "images.npy"
MASKS_FILE = "masks.npy"
SKIPPED_FILE = "skipped_tiles.csv"
DTYPES = ("float16", "float32")
#: Largest finite float16.
FLOAT16_MAX = float(np.finfo(np.float16).max)

#: (path, reason) pairs already warned about in this process: a run opens the same split several times.
_WARNED: set[tuple[str, str]] = set()
#: Stores whose use was already announced in this process.
_ANNOUNCED: set[str] = set()

#: (top, left, height, width) of a part of a tile.
Window = tuple[int, int, int, int]
#: One source file as recorded: (path relative to the dataset root, size in bytes, mtime in ns); -1, -1 = missing.
FileFingerprint = list[Any]


def default_store_path(kind: str, root: str | Path, split: str, modality: str = "s2") -> Path:
    """``<root>/.weakseg_store/<kind>-<base split>-<modality>/``: one store per split and modality.

    The modality is part of the name because ``s2`` and ``s1s2`` stores hold different channels; training with
    ``--multimodal`` reads ``s1s2``, so ``prepare`` runs once per modality used.
    """
    from weakseg.data.splits import parse_split

    base, _ = parse_split(split)
    return Path(root) / STORE_DIRNAME / f"{kind}-{base}-{modality}"


# ---- fingerprints ---------------------------------------------------------------------------------------------
def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the dataset root (so a copied dataset keeps its store valid), else absolute."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(Path(path).absolute())


def file_fingerprint(path: Path, root: Path) -> FileFingerprint:
    """[relative path, size, mtime_ns] of one file; size and mtime -1 when it does not exist (cheap: one stat)."""
    try:
        st = os.stat(path)
    except OSError:
        return [_relative(path, root), -1, -1]
    return [_relative(path, root), int(st.st_size), int(st.st_mtime_ns)]


def tile_files(reader: Any, i: int) -> list[Path]:
    """Every source file of tile ``i``: its image files (``reader._image_files``) and its mask file.

    A file the reader cannot even name (DFC2020's missing S1 or label file raises) is left out, so the list
    changes -- and the store goes stale -- when it appears.
    """
    try:
        files = [Path(p) for p in reader._image_files(i)]
    except DataError:
        files = [Path(reader.source_path(i))]
    if reader.has_masks:
        with suppress(DataError):
            files.append(Path(reader.mask_path(i)))
    return files


def tile_fingerprint(reader: Any, i: int, root: Path) -> list[FileFingerprint]:
    return [file_fingerprint(p, root) for p in tile_files(reader, i)]


def _describe_change(old: list[FileFingerprint], new: list[FileFingerprint]) -> str:
    """The first file whose fingerprint differs, in words."""
    old_by_path = {f[0]: f for f in old}
    for f in new:
        before = old_by_path.get(f[0])
        if before is None:
            return f"{f[0]} was not a source of this tile when the store was written"
        if f[1] == -1:
            return f"{f[0]} is missing"
        if before[1] == -1:
            return f"{f[0]} appeared after the store was written"
        if before[1] != f[1]:
            return f"{f[0]} changed size ({before[1]} -> {f[1]} bytes)"
        if before[2] != f[2]:
            return f"{f[0]} was modified after the store was written"
    gone = [f[0] for f in old if f[0] not in {g[0] for g in new}]
    return f"{gone[0]} is no longer a source of this tile" if gone else "its source files changed"


def _fingerprint_digest(files: list[FileFingerprint]) -> bytes:
    """16 bytes standing for a tile's fingerprint, kept instead of the lists themselves.

    Why: an open store checks every tile's fingerprint against the files (:meth:`TileStore.is_fresh`); kept as
    parsed lists they cost ~0.8 kB a tile (8 MB per 10,000 tiles, in every process that opens the store), the
    digest ~0.15 kB. Equal fingerprints give equal digests; the recorded lists are read again from ``meta.json``
    only to say what changed.
    """
    return hashlib.blake2b(json.dumps(files, separators=(",", ":")).encode("utf-8"), digest_size=16).digest()


def _ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


# ---- reading --------------------------------------------------------------------------------------------------
class TileStore:
    """A complete store, opened without reading pixel data (:meth:`open`).

    Attributes:
        path: the store folder.
        meta: ``meta.json`` without the per-tile fingerprints.
        ids: stored tile ids, in reader order (skipped tiles are not stored).
        dtype: "float16" or "float32".
        shape: (N, C, H, W) of :attr:`images`.
    """

    def __init__(self, path: Path, meta: dict[str, Any], tiles: dict[str, bytes] | None) -> None:
        self.path = Path(path)
        self.meta = meta
        self.ids: list[str] = list(meta["ids"])
        self.dtype: str = meta["dtype"]
        self.shape: tuple[int, int, int, int] = tuple(meta["shape"])  # type: ignore[assignment]
        self.has_masks: bool = bool(meta["has_masks"])
        self._index = {tile: k for k, tile in enumerate(self.ids)}
        # id -> digest of the fingerprint of every tile of the split (stored and skipped); None: not loaded
        self._tiles = tiles
        self._arrays: tuple[np.ndarray, np.ndarray | None] | None = None
        self._pid = -1
        self._fd: int | None = None  # images.npy opened for read-ahead requests (:meth:`_prefetch`), per process
        self._fd_pid = -1

    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether ``path`` holds a complete store (its ``meta.json``, written last)."""
        return (Path(path) / META_FILE).is_file()

    @classmethod
    def open(cls, path: str | Path) -> TileStore:
        """Open the store at ``path`` (reads ``meta.json`` only).

        Raises:
            DataError: no complete store there, or its ``meta.json`` cannot be read.
        """
        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise DataError(f"{path} holds no complete tile store (no {META_FILE}): run weakseg prepare")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            tiles = {t["id"]: _fingerprint_digest(t["files"]) for t in meta.pop("tiles")}
            for key in ("ids", "dtype", "shape", "has_masks", "format_version"):
                meta[key]  # noqa: B018 - presence check
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{meta_path} cannot be read ({e}): rerun weakseg prepare --overwrite") from e
        return cls(path, meta, tiles)

    # The arrays: opened lazily, once per process; never pickled.
    def _open_arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._arrays is None or self._pid != os.getpid():
            try:
                images = np.lib.format.open_memmap(self.path / IMAGES_FILE, mode="r")  # (N, C, H, W)
                masks = (np.lib.format.open_memmap(self.path / MASKS_FILE, mode="r")  # (N, H, W) uint8
                         if self.has_masks else None)
            except (OSError, ValueError) as e:
                raise DataError(f"cannot open the tile store {self.path}: {e}; rerun weakseg prepare --overwrite") from e
            if images.shape != self.shape or (masks is not None and masks.shape != (self.shape[0], *self.shape[2:])):
                raise DataError(f"the tile store {self.path} does not match its {META_FILE} (images {images.shape}, "
                                f"expected {self.shape}): rerun weakseg prepare --overwrite")
            self._arrays, self._pid = (images, masks), os.getpid()
        return self._arrays

    @property
    def images(self) -> np.ndarray:
        """The (N, C, H, W) memory map (read-only)."""
        return self._open_arrays()[0]

    @property
    def masks(self) -> np.ndarray | None:
        """The (N, H, W) uint8 memory map, or None when the split has no masks."""
        return self._open_arrays()[1]

    def index_of(self, tile_id: str) -> int | None:
        """Row of ``tile_id`` in :attr:`images`; None for a tile not stored (skipped by ``prepare``)."""
        return self._index.get(tile_id)

    @property
    def tile_size(self) -> tuple[int, int]:
        """(H, W) of every stored tile."""
        shape = self.images.shape  # (N, C, H, W)
        return int(shape[2]), int(shape[3])

    def image(self, k: int, window: Window | None = None) -> np.ndarray:
        """Row ``k`` as a new float32 (C, H, W) array, like ``reader.read_image`` (NaN = no data).

        float16 rows are widened by torch (vectorised, about 6x numpy's ``astype`` on 13 x 256 x 256); the row is
        copied out of the read-only map first, since torch refuses to wrap a read-only array without a warning.
        ``window`` (top, left, height, width) reads only that part: a training crop touches only its own pages.
        """
        row = self.images[k]  # (C, H, W) view of the map
        if window is not None:
            top, left, h, w = window
            self._prefetch(k, top, h)
            row = row[:, top : top + h, left : left + w]  # (C, h, w) view
        if row.dtype == np.float16:
            import torch

            return torch.from_numpy(np.array(row)).float().numpy()
        return np.array(row, dtype=np.float32)

    def _prefetch(self, k: int, top: int, h: int) -> None:
        """Ask the kernel to read the rows ``top:top+h`` of every band of tile ``k`` now, in one request.

        A window touches h rows of each of the C bands: C separate stretches of the file. Read through page
        faults on a cold store (one larger than RAM), each stretch costs synchronous faults one read-around at a
        time: 17.9 ms per 64 x 64 crop of a 15 x 256 x 256 float16 tile here, against 5.9 ms after one
        ``posix_fadvise(WILLNEED)`` over the span (``benchmarks/store_scale.py``). On a warm page cache the call
        costs microseconds. Not on systems without ``posix_fadvise``.
        """
        if not hasattr(os, "posix_fadvise"):
            return
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd, self._fd_pid = os.open(self.path / IMAGES_FILE, os.O_RDONLY), os.getpid()
        images = self.images
        C, H, W = images.shape[1:]
        item = images.dtype.itemsize
        start = images.offset + (k * C * H * W + top * W) * item
        with suppress(OSError):
            os.posix_fadvise(self._fd, start, ((C - 1) * H * W + h * W) * item, os.POSIX_FADV_WILLNEED)

    def mask(self, k: int, window: Window | None = None) -> np.ndarray:
        """Row ``k`` of the masks as a new uint8 (H, W) array (``window``: only that part, as :meth:`image`)."""
        masks = self.masks
        if masks is None:
            raise DataError(f"the tile store {self.path} holds no masks")
        if window is not None:
            top, left, h, w = window
            return np.array(masks[k, top : top + h, left : left + w], dtype=np.uint8)
        return np.array(masks[k], dtype=np.uint8)

    def _fingerprints(self) -> dict[str, bytes]:
        """Tile id -> :func:`_fingerprint_digest` of its recorded fingerprint."""
        if self._tiles is None:  # dropped when pickled: reload from meta.json
            self._tiles = TileStore.open(self.path)._tiles
        assert self._tiles is not None
        return self._tiles

    def _recorded_files(self, tile: str) -> list[FileFingerprint] | None:
        """The fingerprint ``meta.json`` records for ``tile`` (read again: only digests are kept); None if unreadable."""
        try:
            records = json.loads((self.path / META_FILE).read_text(encoding="utf-8"))["tiles"]
            return next((t["files"] for t in records if t["id"] == tile), None)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def is_fresh(self, reader: Any, root: str | Path | None = None) -> tuple[bool, str]:
        """(True, "") when every tile of ``reader`` is in the store with unchanged source files, else (False, why).

        Cheap: one ``stat`` per source file, no pixel data. ``reader`` may be a part of the split
        (``validation:train``); only its tiles are checked. ``why`` names the first changed file.

        Args:
            root: the dataset root the reader was opened with (paths are recorded relative to it); default
                ``reader.root``.
        """
        from weakseg.data.splits import parse_split

        meta = self.meta
        if meta.get("format_version") != FORMAT_VERSION:
            return False, f"it has format version {meta.get('format_version')}, this weakseg writes {FORMAT_VERSION}"
        if meta.get("reader") != type(reader).__name__:
            return False, f"it was made by {meta.get('reader')}, not {type(reader).__name__}"
        modality = getattr(reader, "modality", "s2")
        if meta.get("modality") != modality:
            return False, f"it holds modality {meta.get('modality')!r}, the reader reads {modality!r}"
        base = parse_split(str(getattr(reader, "split", meta.get("split"))))[0]
        if meta.get("split") != base:
            return False, f"it holds split {meta.get('split')!r}, the reader reads {base!r}"
        expected = self.shape[0] * int(np.prod(self.shape[1:])) * np.dtype(self.dtype).itemsize
        for name, size in ((IMAGES_FILE, expected), (MASKS_FILE, self.shape[0] * self.shape[2] * self.shape[3])):
            if name == MASKS_FILE and not self.has_masks:
                continue
            try:
                if os.stat(self.path / name).st_size < size:
                    return False, f"{self.path / name} is truncated"
            except OSError:
                return False, f"{self.path / name} is missing"
        if bool(reader.has_masks) != self.has_masks:
            return False, "the dataset " + ("now has" if reader.has_masks else "no longer has") + " masks"
        root = Path(root if root is not None else reader.root)
        tiles = self._fingerprints()
        for i, tile in enumerate(reader.ids):
            recorded = tiles.get(tile)
            if recorded is None:
                return False, f"tile {tile} ({reader.source_path(i)}) is not in the store (added after prepare)"
            now = tile_fingerprint(reader, i, root)
            if _fingerprint_digest(now) != recorded:
                files = self._recorded_files(tile)
                return False, (_describe_change(files, now) if files is not None
                               else f"the source files of tile {tile} changed")
        return True, ""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"], state["_pid"], state["_tiles"] = None, -1, None  # reopened / reloaded in the new process
        state["_fd"], state["_fd_pid"] = None, -1
        return state

    def __repr__(self) -> str:
        return f"TileStore({str(self.path)!r}, {self.shape[0]} tiles {self.shape[1:]}, {self.dtype})"


#: Stores opened in this process, by folder, with the (size, mtime_ns) of the meta.json they were read from: a run
#: opens the same split several times (tile checks, statistics, train and validation readers), and the meta.json of
#: a big split (one fingerprint per tile) is worth parsing once.
_OPENED: dict[str, tuple[tuple[int, int], TileStore]] = {}


def _open_shared(path: Path) -> TileStore:
    try:
        st = os.stat(path / META_FILE)
    except OSError:
        return TileStore.open(path)  # raises the DataError naming the folder
    key = (int(st.st_size), int(st.st_mtime_ns))
    cached = _OPENED.get(str(path))
    if cached is not None and cached[0] == key:
        return cached[1]
    opened = TileStore.open(path)
    _OPENED[str(path)] = (key, opened)
    return opened


def attach_store(reader: Any, kind: str, root: str | Path, store: str | Path | None = None) -> TileStore | None:
    """Attach a fresh store of ``reader``'s split to it (:meth:`~weakseg.data.base.TileDataset.attach_store`).

    Called by :func:`weakseg.data.open_dataset` on the whole split, before a part is selected.

    Args:
        store: a store folder; None: the default location (:func:`default_store_path`), used only if it holds a
            complete store.
    Returns:
        The attached store, or None (no store there, or a stale one: then one warning through the ``weakseg``
        logger names the store, the changed file and says to rerun ``weakseg prepare``).
    Raises:
        DataError: ``store`` was given and holds no complete store.
        ConfigError: ``store`` was given and holds another split or modality than the reader reads.
    """
    modality = getattr(reader, "modality", "s2")
    path = Path(store) if store is not None else default_store_path(kind, root, reader.split, modality)
    if store is None and not TileStore.exists(path):
        return None
    opened = _open_shared(path)
    if store is not None:
        for key, value in (("kind", kind), ("split", reader.split), ("modality", modality)):
            if opened.meta.get(key) != value:
                raise ConfigError(f"the tile store {path} holds {key} {opened.meta.get(key)!r}, but {value!r} is read "
                                  f"(store=)")
    fresh, why = opened.is_fresh(reader, root)
    if not fresh:
        key = (str(path), why)
        if key not in _WARNED:
            _WARNED.add(key)
            log.warning("warning: tile store %s is out of date (%s): reading the source files instead; rerun "
                        "weakseg prepare --datadir %s --split %s%s to use it", path, why, root, reader.split,
                        "" if modality == "s2" else f" --modality {modality}")
        return None
    reader.attach_store(opened)
    if str(path) not in _ANNOUNCED:
        _ANNOUNCED.add(str(path))
        log.info("split %r read from the tile store %s (%d tiles, %s)", reader.split, path, len(opened.ids),
                 opened.dtype)
    return opened


def store_for_split(store: str | Path | bool | None, split: str, strict: bool = False) -> Path | bool | None:
    """The ``store=`` of :func:`weakseg.data.open_dataset` for ``split`` from a command's ``--store`` value.

    Args:
        store: None (the default location, used when complete and fresh), "none" or False (never a store), or a
            store folder (``weakseg prepare --store``).
        split: the split (or part, ``validation:train``) about to be opened.
        strict: the store must hold ``split``'s base split (``pseudomasks`` reads one split); otherwise a split the
            store does not hold (training's test-split validation) takes the default location.
    Raises:
        DataError: the folder holds no complete store.
        ConfigError: ``strict`` and the store holds another split.
    """
    if store is None or store is True:
        return None
    if store is False or str(store).lower() == "none":
        return False
    from weakseg.data.splits import parse_split

    path = Path(store)
    if not TileStore.exists(path):
        raise DataError(f"--store {path}: no complete tile store there (no {META_FILE}); write it with "
                        f"weakseg prepare --store {path}, or leave --store out to read the files")
    held = _open_shared(path).meta.get("split")
    base = parse_split(split)[0]
    if held == base:
        return path
    if strict:
        raise ConfigError(f"--store {path} holds the split {held!r}, but {base!r} is read")
    return None


# ---- writing --------------------------------------------------------------------------------------------------
@dataclass
class SkippedEntry:
    """A tile ``prepare`` could not store (one row of ``skipped_tiles.csv``)."""

    id: str
    file: str
    reason: str


@dataclass
class PrepareResult:
    """What :func:`prepare_store` did."""

    path: Path
    status: str  #: "built", "resumed" or "up to date"
    total: int  #: tiles of the split
    written: int  #: tiles written by this call
    reused: int  #: stored tiles kept from an interrupted run, or all of them when the store was up to date
    skipped: list[SkippedEntry] = field(default_factory=list)
    seconds: float = 0.0
    bytes_on_disk: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    note: str = ""  #: why a store was rebuilt (stale, other dtype, --overwrite), or ""

    @property
    def tiles_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def _narrow(image: np.ndarray, dtype: str) -> np.ndarray:
    """float32 (C, H, W) -> the store's dtype. float16 goes through torch: the same IEEE round-to-nearest-even as
    numpy's ``astype`` (overflow -> inf), about 5x faster on a 15 x 256 x 256 tile."""
    if dtype != "float16":
        return np.ascontiguousarray(image, dtype=np.float32)
    import torch

    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).half().numpy()


def _widen(values: np.ndarray) -> np.ndarray:
    """The float32 values a reader gets back from stored ``values`` (float16 widened by torch, exactly)."""
    if values.dtype != np.float16:
        return values
    import torch

    return torch.from_numpy(values).float().numpy()


class _BandStats:
    """Running per-band min / max / mean of the stored values and the max |stored - source| (finite values)."""

    def __init__(self, channels: int) -> None:
        self.count = np.zeros(channels, dtype=np.int64)
        self.total = np.zeros(channels, dtype=np.float64)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)
        self.err = np.zeros(channels, dtype=np.float64)

    def add(self, source: np.ndarray, stored: np.ndarray) -> None:
        """source: (C, H, W) float32 as read; stored: (C, H, W) float32 of the stored values."""
        c = source.shape[0]
        v = stored.reshape(c, -1)  # (C, H*W)
        # |stored - source| is exact in float32: both are float32 values within a factor 2 of each other (Sterbenz)
        diff = np.abs(v - source.reshape(c, -1))  # (C, H*W), NaN where there is no data
        finite = np.isfinite(v)
        if finite.all():  # the common tile: no masking, no temporaries
            self.count += v.shape[1]
            self.total += v.sum(axis=1, dtype=np.float64)
            self.min = np.minimum(self.min, v.min(axis=1))
            self.max = np.maximum(self.max, v.max(axis=1))
            self.err = np.maximum(self.err, diff.max(axis=1))
            return
        self.count += finite.sum(axis=1)
        self.total += np.where(finite, v, 0.0).sum(axis=1, dtype=np.float64)
        self.min = np.minimum(self.min, np.where(finite, v, np.inf).min(axis=1))
        self.max = np.maximum(self.max, np.where(finite, v, -np.inf).max(axis=1))
        self.err = np.maximum(self.err, np.where(finite, diff, 0.0).max(axis=1))

    def state(self) -> dict[str, list[Any]]:
        """JSON-safe state (inf as None) for ``progress.json``; exact: floats round-trip through JSON."""
        def finite(a: np.ndarray) -> list[float | None]:
            return [float(x) if np.isfinite(x) else None for x in a]

        return {"count": self.count.tolist(), "total": self.total.tolist(), "min": finite(self.min),
                "max": finite(self.max), "err": self.err.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, list[Any]]) -> _BandStats:
        stats = cls(len(state["count"]))
        stats.count = np.asarray(state["count"], dtype=np.int64)
        stats.total = np.asarray(state["total"], dtype=np.float64)
        stats.min = np.asarray([np.inf if x is None else x for x in state["min"]], dtype=np.float64)
        stats.max = np.asarray([-np.inf if x is None else x for x in state["max"]], dtype=np.float64)
        stats.err = np.asarray(state["err"], dtype=np.float64)
        return stats

    def summary(self) -> list[dict[str, Any]]:
        """Per band: valid values, min, max, mean of the stored values, max absolute rounding error."""
        rows = []
        for b in range(len(self.count)):
            n = int(self.count[b])
            rows.append({"band": b, "valid_values": n,
                         "min": float(self.min[b]) if n else None, "max": float(self.max[b]) if n else None,
                         "mean": float(self.total[b] / n) if n else None,
                         "max_abs_rounding_error": float(self.err[b])})
        return rows


def _shrink_npy(path: Path, rows: int) -> None:
    """Cut an ``.npy`` file to its first ``rows`` rows: rewrite the shape in its header (same length) and truncate.

    ``prepare`` allocates a row per tile of the split before it knows which tiles will be skipped; the store keeps
    only the stored rows, so ``images.shape[0]`` is the number of stored tiles.
    """
    fmt = np.lib.format
    with path.open("r+b") as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
            len_size = 2
        else:
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
            len_size = 4
        offset = f.tell()
        if shape[0] == rows:
            return
        header = repr({"descr": fmt.dtype_to_descr(dtype), "fortran_order": fortran, "shape": (rows, *shape[1:])})
        room = offset - fmt.MAGIC_LEN - len_size
        if len(header) + 1 > room:  # cannot happen: fewer rows never need more digits
            raise WeaksegError(f"cannot rewrite the header of {path}")
        f.seek(fmt.MAGIC_LEN + len_size)
        f.write((header + " " * (room - len(header) - 1) + "\n").encode("latin1"))
        f.truncate(offset + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


def _allocate(path: Path, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A new ``.npy`` memory map of ``shape``, its blocks reserved on disk.

    A memory map written on a full disk kills the process with SIGBUS, not an error. So the free space is checked
    first and the file's blocks are reserved with ``posix_fallocate`` where the file system supports it: a full
    disk is then an error naming the folder, before any tile is written.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    free = shutil.disk_usage(path.parent).free
    if nbytes > free:
        raise WeaksegError(f"the tile store needs {nbytes / 1e9:.2f} GB for {path.name} but {path.parent} has "
                           f"{free / 1e9:.2f} GB free: free space or choose another folder (--store)")
    with suppress(FileNotFoundError):
        path.unlink()  # a process still mapping the old file keeps its inode; never truncate a file in use
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    except OSError as e:
        raise WeaksegError(f"cannot write {path}: {e}") from e
    if hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as e:
            if e.errno in (28, 122):  # ENOSPC, EDQUOT
                raise WeaksegError(f"cannot reserve {nbytes / 1e9:.2f} GB for {path}: {e.strerror}") from e
            # EOPNOTSUPP / EINVAL: the file system cannot reserve blocks; the free-space check above must do
        finally:
            os.close(fd)
    return array


def _append_lines(path: Path, lines: list[str]) -> None:
    """Append lines and fsync them (the fingerprints of the tiles just written), before ``progress.json``."""
    if not lines:
        return
    try:
        with path.open("ab") as f:
            f.write("".join(line + "\n" for line in lines).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WeaksegError(f"cannot write {path}: {e}") from e


def _read_fingerprint_lines(path: Path, count: int) -> list[dict[str, Any]] | None:
    """The first ``count`` records of ``fingerprints.jsonl`` (None when it holds fewer: start over)."""
    try:
        raw = path.read_bytes().split(b"\n")
    except OSError:
        return None
    rows = []
    for line in raw[:count]:
        try:
            rows.append(json.loads(line))
        except (ValueError, UnicodeDecodeError):
            return None
    return rows if len(rows) == count else None


def _remove_store_files(path: Path) -> None:
    for name in (META_FILE, PROGRESS_FILE, FINGERPRINTS_FILE, IMAGES_FILE, MASKS_FILE, SKIPPED_FILE):
        with suppress(FileNotFoundError):
            (path / name).unlink()


def _disk_size(path: Path) -> int:
    """Bytes the store's files occupy on disk (allocated blocks, so a sparse file counts what it holds)."""
    total = 0
    for name in (IMAGES_FILE, MASKS_FILE, META_FILE, SKIPPED_FILE):
        with suppress(OSError):
            st = os.stat(path / name)
            total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


def _write_skipped(path: Path, split: str, skipped: list[SkippedEntry]) -> None:
    atomic_write_csv(path / SKIPPED_FILE, ["split", "id", "file", "reason"],
                     ([split, s.id, s.file, s.reason] for s in skipped))


Progress = Callable[[int, int, int, int, float], None]


def _log_progress(split: str) -> Progress:
    """Periodic ``log.info`` lines: ``prepare <split>: i/N tiles, x tiles/s, ~s left``."""
    def report(done: int, total: int, written: int, skipped: int, elapsed: float) -> None:
        rate = written / elapsed if elapsed > 0 else 0.0
        left = f", ~{(total - done) / rate:.0f}s left" if rate > 0 and done < total else ""
        log.info("  prepare %s: %d/%d tiles (%d skipped), %.1f tiles/s%s", split, done, total, skipped, rate, left)

    return report


def prepare_store(
    reader: Any,
    path: str | Path,
    *,
    kind: str,
    root: str | Path,
    dtype: str = "float16",
    overwrite: bool = False,
    flush_every: int = 32,
    progress: Progress | None = None,
    progress_seconds: float = 5.0,
    limit: int | None = None,
) -> PrepareResult:
    """Write (or resume, or reuse) the store of ``reader``'s whole split at ``path``.

    Args:
        reader: the whole base split, opened without a store (``open_dataset(..., store=False)``).
        kind, root: the dataset kind and root ``reader`` was opened with (recorded; fingerprints are relative to
            ``root``).
        dtype: "float16" (half the size; the rounding error is recorded) or "float32" (bit-identical).
        overwrite: rebuild even when the store is up to date or an interrupted run could be resumed.
        flush_every: tiles between two flushes of the memory maps + ``progress.json`` (what a kill can lose).
        progress: called ``(done, total, written, skipped, seconds)`` at most every ``progress_seconds`` and at the
            end; default: log lines.
        limit: stop after this many tiles of the split are processed, leaving a resumable store (tests).

    Returns:
        A :class:`PrepareResult`.
    Raises:
        DataError: a tile of another height x width than the first (the message names both), values beyond
            float16's range, or no tile could be stored.
        ConfigError: an unknown ``dtype``.
        WeaksegError: the folder cannot be written, is locked by another ``prepare``, or the disk is too small.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    from weakseg.data.splits import parse_split

    t0 = time.monotonic()
    path, root = Path(path), Path(root)
    split = parse_split(reader.split)[0]
    if split != reader.split:
        raise ConfigError(f"prepare_store needs the whole split, not the part {reader.split!r}")
    make_dir(path, "tile store folder")
    progress = progress or _log_progress(split)
    with folder_lock(path, "weakseg prepare"):
        note = ""
        if TileStore.exists(path):
            existing = TileStore.open(path)
            fresh, why = existing.is_fresh(reader, root)
            if fresh and existing.dtype == dtype and existing.meta.get("kind") == kind and not overwrite:
                skipped = [SkippedEntry(**s) for s in existing.meta.get("skipped", [])]
                return PrepareResult(path, "up to date", len(reader), 0, len(existing.ids), skipped,
                                     time.monotonic() - t0, _disk_size(path), existing.meta)
            note = ("--overwrite" if overwrite else why if not fresh else
                    f"it holds {existing.dtype}, {dtype} asked")
            (path / META_FILE).unlink()  # from here on the store is incomplete: no reader may use it
        return _write(reader, path, kind=kind, root=root, split=split, dtype=dtype, overwrite=overwrite,
                      flush_every=max(1, int(flush_every)), progress=progress, progress_seconds=progress_seconds,
                      limit=limit, t0=t0, note=note)


def _write(reader: Any, path: Path, *, kind: str, root: Path, split: str, dtype: str, overwrite: bool,
           flush_every: int, progress: Progress, progress_seconds: float, limit: int | None, t0: float,
           note: str) -> PrepareResult:
    import rasterio

    total = len(reader)
    modality = getattr(reader, "modality", "s2")
    identity = {"format_version": FORMAT_VERSION, "kind": kind, "split": split, "modality": modality,
                "dtype": dtype, "reader": type(reader).__name__, "has_masks": bool(reader.has_masks),
                "num_tiles": total, "ids_sha256": _ids_digest(list(reader.ids))}
    records, state = _resume_state(reader, path, root, identity, overwrite)
    status = "resumed" if records else "built"
    if not records:
        for name in (PROGRESS_FILE, FINGERPRINTS_FILE, IMAGES_FILE, MASKS_FILE, SKIPPED_FILE):
            with suppress(FileNotFoundError):
                (path / name).unlink()
    stored = int(state.get("stored", 0))
    reused = stored
    shape: tuple[int, int, int] | None = tuple(state["shape"]) if state.get("shape") else None  # type: ignore[assignment]
    first_id: str | None = state.get("first_id")
    stats = _BandStats.from_state(state["stats"]) if state.get("stats") else None
    images: np.ndarray | None = None  # (total, C, H, W) memory map
    masks: np.ndarray | None = None  # (total, H, W) memory map
    if shape is not None:
        images = np.lib.format.open_memmap(path / IMAGES_FILE, mode="r+")
        masks = np.lib.format.open_memmap(path / MASKS_FILE, mode="r+") if reader.has_masks else None
    pending: list[str] = []
    start = len(records)
    end = total if limit is None else min(total, start + max(0, int(limit)))

    def flush(done: int) -> None:
        if images is not None:
            images.flush()
        if masks is not None:
            masks.flush()
        _append_lines(path / FINGERPRINTS_FILE, pending)
        pending.clear()
        atomic_write_json(path / PROGRESS_FILE, {
            **identity, "done": done, "stored": stored, "shape": list(shape) if shape else None,
            "first_id": first_id, "stats": stats.state() if stats else None}, durable=True)

    last_report = time.monotonic()
    reported = False
    written = 0
    with rasterio.Env():  # one GDAL environment for every file, not one per open
        for i in range(start, end):
            tile = reader.ids[i]
            files = tile_fingerprint(reader, i, root)
            reason = ""
            image = mask = None
            try:
                image = reader.read_image(i)  # (C, H, W) float32, NaN = no data
                mask = reader.read_mask(i) if reader.has_masks else None  # (H, W) uint8
            except DataError as e:
                reason = str(e)
            if not reason:
                assert image is not None
                if image.ndim != 3:
                    reason = f"the image has shape {image.shape}, expected (bands, height, width)"
                elif mask is not None and mask.shape != image.shape[1:]:
                    reason = (f"{reader.mask_path(i)} is {mask.shape[0]}x{mask.shape[1]} but {reader.source_path(i)} "
                              f"is {image.shape[1]}x{image.shape[2]}")
                elif shape is not None and image.shape[1:] != shape[1:]:
                    raise DataError(
                        f"tile {tile} ({reader.source_path(i)}) is {image.shape[1]}x{image.shape[2]} but the first "
                        f"tile {first_id} is {shape[1]}x{shape[2]}: a tile store holds tiles of one size (DFC2020, "
                        "SEN12MS); read a dataset of mixed tile sizes from its files (do not run weakseg prepare)")
                elif shape is not None and image.shape[0] != shape[0]:
                    reason = f"{reader.source_path(i)} gives {image.shape[0]} bands, the first tile {shape[0]}"
            if reason:
                pending.append(json.dumps({"i": i, "id": tile, "files": files, "stored": False,
                                           "file": str(reader.source_path(i)), "reason": reason}))
                records.append(json.loads(pending[-1]))
            else:
                assert image is not None
                if shape is None:
                    shape, first_id = tuple(int(s) for s in image.shape), tile  # type: ignore[assignment]
                    assert shape is not None
                    images = _allocate(path / IMAGES_FILE, dtype, (total, *shape))
                    masks = _allocate(path / MASKS_FILE, "uint8", (total, *shape[1:])) if reader.has_masks else None
                    stats = _BandStats(shape[0])
                assert images is not None and stats is not None
                values = _narrow(image, dtype)  # (C, H, W) in the store's dtype; an overflow is reported below
                if dtype == "float16":
                    overflow = np.isinf(values) & np.isfinite(image)
                    if overflow.any():
                        raise DataError(
                            f"tile {tile} ({reader.source_path(i)}) holds values up to "
                            f"{float(np.nanmax(np.abs(image))):.6g}, beyond float16's range ({FLOAT16_MAX:.0f}): "
                            "prepare it with --dtype float32")
                stats.add(image, _widen(values))  # (C, H, W) the values a reader will get back
                images[stored] = values
                if masks is not None:
                    masks[stored] = mask
                stored += 1
                written += 1
                pending.append(json.dumps({"i": i, "id": tile, "files": files, "stored": True}))
                records.append(json.loads(pending[-1]))
            if len(pending) >= flush_every:
                flush(i + 1)
            now = time.monotonic()
            if now - last_report >= progress_seconds:
                last_report, reported = now, True
                progress(i + 1, total, written, sum(not r["stored"] for r in records), now - t0)
        flush(end)
    skipped = [SkippedEntry(r["id"], r["file"], r["reason"]) for r in records if not r["stored"]]
    if end < total:  # stopped early (limit): resumable, not complete
        return PrepareResult(path, "incomplete", total, written, reused, skipped, time.monotonic() - t0,
                             _disk_size(path), note=note)
    if stored == 0 or images is None or stats is None or shape is None:
        reasons = "\n  ".join(f"{s.id}: {s.reason}" for s in skipped[:20])
        raise DataError(f"no tile of split {split!r} could be stored ({total} skipped):\n  {reasons}")
    images = masks = None  # unmap before cutting the files to the stored rows
    _shrink_npy(path / IMAGES_FILE, stored)
    if reader.has_masks:
        _shrink_npy(path / MASKS_FILE, stored)
    _write_skipped(path, split, skipped)
    meta = {
        **{k: v for k, v in identity.items() if k not in ("num_tiles", "ids_sha256")},
        "root": str(root.absolute()),
        "shape": [stored, *shape],
        "ids": [r["id"] for r in records if r["stored"]],
        "band_stats": stats.summary(),
        "max_abs_rounding_error": float(stats.err.max()) if len(stats.err) else 0.0,
        "skipped": [{"id": s.id, "file": s.file, "reason": s.reason} for s in skipped],
        "tiles": [{"id": r["id"], "files": r["files"]} for r in records],
    }
    atomic_write_text(path / META_FILE, _meta_text(meta), durable=True)  # last: now the store is complete
    for name in (PROGRESS_FILE, FINGERPRINTS_FILE):
        with suppress(FileNotFoundError):
            (path / name).unlink()
    if reported:  # a long run ends its progress lines with the last one; a short one only has its summary
        progress(total, total, written, len(skipped), time.monotonic() - t0)
    public_meta = {k: v for k, v in meta.items() if k != "tiles"}
    return PrepareResult(path, status, total, written, reused, skipped, time.monotonic() - t0, _disk_size(path),
                         public_meta, note)


def _meta_text(meta: dict[str, Any]) -> str:
    """``meta.json``: indented, but one line per tile fingerprint (180k tiles would be 2M lines indented)."""
    head = json.dumps(to_json_compatible({k: v for k, v in meta.items() if k != "tiles"}), indent=2, allow_nan=False)
    tiles = ",\n    ".join(json.dumps(t, separators=(",", ":")) for t in meta["tiles"])
    return head[:-2] + f',\n  "tiles": [\n    {tiles}\n  ]\n}}\n'  # head ends with "\n}"


def _resume_state(reader: Any, path: Path, root: Path, identity: dict[str, Any],
                  overwrite: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(records of the tiles done, progress state) of an interrupted run that can be continued; ([], {}) if none.

    Continued only when the split, dtype and layout are the same, the tile shape is recorded with its files, and
    every tile done still has the fingerprint recorded for it; otherwise the store is rebuilt from scratch (logged).
    """
    progress_path = path / PROGRESS_FILE
    if overwrite or not progress_path.is_file():
        return [], {}
    try:
        state = json.loads(progress_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.info("tile store %s: %s cannot be read; starting over", path, PROGRESS_FILE)
        return [], {}
    differs = [k for k, v in identity.items() if state.get(k) != v]
    if differs:
        log.info("tile store %s: the interrupted run had another %s; starting over", path, ", ".join(differs))
        return [], {}
    done = int(state.get("done", 0))
    records = _read_fingerprint_lines(path / FINGERPRINTS_FILE, done)
    if records is None:
        log.info("tile store %s: %s lacks tiles recorded as done; starting over", path, FINGERPRINTS_FILE)
        return [], {}
    for i, rec in enumerate(records):
        if rec.get("i") != i or rec.get("id") != reader.ids[i]:
            log.info("tile store %s: the tiles done are not the split's first %d; starting over", path, done)
            return [], {}
        now = tile_fingerprint(reader, i, root)
        if now != rec["files"]:
            log.info("tile store %s: tile %s changed since it was written (%s); starting over", path, rec["id"],
                     _describe_change(rec["files"], now))
            return [], {}
    if state.get("shape") is not None:
        try:
            images = np.lib.format.open_memmap(path / IMAGES_FILE, mode="r")
            ok = images.shape == (identity["num_tiles"], *state["shape"]) and images.dtype == np.dtype(
                identity["dtype"])
            if identity["has_masks"]:
                masks = np.lib.format.open_memmap(path / MASKS_FILE, mode="r")
                ok = ok and masks.shape == (identity["num_tiles"], *state["shape"][1:])
            del images
        except (OSError, ValueError):
            ok = False
        if not ok:
            log.info("tile store %s: its arrays do not match %s; starting over", path, PROGRESS_FILE)
            return [], {}
    # Drop the fingerprint lines written after the last progress update (their tiles are redone).
    with atomic_path(path / FINGERPRINTS_FILE, durable=True) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    log.info("tile store %s: resuming after %d of %d tiles", path, done, identity["num_tiles"])
    return records, state


__all__ = ["DTYPES", "FORMAT_VERSION", "PrepareResult", "SkippedEntry", "TileStore", "attach_store",
           "default_store_path", "file_fingerprint", "prepare_store", "tile_fingerprint"]
