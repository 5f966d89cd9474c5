"""Lightning data module: splits, crops, augmentation and normalisation around a reader.

The reader (:class:`~weakseg.data.dfc2020.DFC2020Dataset` or :class:`~weakseg.data.folder.FolderDataset`) only
reads files; this module owns what happens to samples (style habit 3). Train samples get a random crop of the
model input size, the chosen joint augmentations and the normalisation; validation samples a deterministic
centre crop (defect 11 of the original: validation used random crops). Image-level labels are computed by the
reader *after* the transform, on the crop the model sees. ``predict`` samples are whole tiles resized to the
model input, so pseudomasks come out at tile resolution.

**Crops and labels.** Where labels come from masks (DFC2020, a folder without labels.csv) a training crop gets the
labels of the crop (the >= 10 % rule on the crop's mask), so cropping is right. Where only whole-image labels
exist (a folder's labels.csv) a crop can lose a labelled class (a forest in one corner) while keeping its label,
which teaches the classifier to see forest where there is none. Such data is therefore trained and validated on
the whole tile resized to the model input, the same scale prediction uses (``data_config['train_view']``:
``"crop"`` or ``"resize"``, chosen by the reader's ``labels_from_crop`` and recorded in the checkpoint). Tiles of
the model input size are not resized at all, so the choice matters only for larger tiles.

Before training, :meth:`WeakSegDataModule.check_tiles` reads the *headers* of every file of every tile of the
train and validation splits (band count, height, width; no pixels) and reports every faulty tile at once: a
missing S1 or label file, a wrong band count, a label raster of another size than its image, a tile smaller than
the model input. Without it such a tile failed at whatever batch first drew it, possibly late in a long run, one
tile per attempt.

Then :meth:`WeakSegDataModule.screen_tiles` reads the pixels of every train and validation tile once (the band
statistics of ``standardize`` come from the same pass). A tile whose pixels cannot be used -- no valid pixel
(all NaN/inf or nodata, :mod:`weakseg.data.nodata`), or pixel data or a mask that cannot be read -- is *skipped*:
logged as a warning with its file and reason, left out of both splits, listed in the run's ``skipped_tiles.csv``
and counted in its ``summary.json``, as the pseudomask stage records skipped tiles in its manifest. One bad tile
among thousands (a tile outside the swath, a truncated download) then costs that tile, not the run. With
``strict_data`` any such tile stops the run at start-up instead, listing them all; a split left without a usable
tile always does. Files that are missing or have the wrong bands or size stay start-up errors (above): they
mean a broken layout, not a bad tile.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from torch.utils.data import DataLoader

from weakseg.data import open_dataset
from weakseg.data.normalization import BandStats, Normalize
from weakseg.data.tile_store import store_for_split
from weakseg.data.transforms import CenterCrop, Compose, RandomCrop, Resize, build_augmentations
from weakseg.errors import DataError
from weakseg.io import atomic_write_csv

log = logging.getLogger(__name__)

#: Band counts of the DFC2020 files (the reader reads S2 with 13 bands, S1 with 2, labels with 1).
DFC_S2_BANDS, DFC_S1_BANDS = 13, 2
#: Faulty tiles listed in a :class:`DataError` (the message gives the count of the rest).
MAX_LISTED_FAULTS = 50
#: Skipped tiles logged one per line at start-up (all of them are in ``skipped_tiles.csv``).
MAX_LOGGED_SKIPS = 20
SKIPPED_TILES_FILE = "skipped_tiles.csv"
#: ``data_config['train_view']``: how training and validation see a tile (module docstring).
TRAIN_VIEWS = ("crop", "resize")


@dataclass(frozen=True)
class SkippedTile:
    """A tile left out of training, and why (one row of ``skipped_tiles.csv``)."""

    split: str
    id: str
    file: str
    reason: str


def raster_header(path: Path) -> tuple[int, int, int]:
    """(bands, height, width) of a raster, from its header only; OSError-like failures as :class:`DataError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return int(src.count), int(src.height), int(src.width)
    except (RasterioIOError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be read ({e})") from e


def tile_faults(reader: Any, min_size: Sequence[int] | None = None) -> list[str]:
    """One line per faulty tile of ``reader`` (empty: all fine), from file headers only (:func:`scan_tiles`)."""
    return scan_tiles(reader, min_size)[0]


def scan_tiles(reader: Any, min_size: Sequence[int] | None = None) -> tuple[list[str], int]:
    """(lines describing the faulty tiles of ``reader``, number of faulty tiles), from file headers only.

    Checks that every file of every tile (the image; DFC2020's S1 file in ``s1s2`` mode; the label raster when
    the reader has masks) exists and opens, has the band count the reader will ask for (DFC2020: 13 S2 bands, 2 S1
    bands; a folder dataset: the band count of its first image, as its reader requires; labels: 1), that S1 and the
    label raster have the image's height and width, and that the tile is at least ``min_size`` (H, W). Tiles
    smaller than ``min_size`` are summarised in one line (usually all tiles are, and ``--imgsize`` is wrong).
    """
    with rasterio.Env():  # one GDAL environment for all files, not one per open (about 2 ms per tile in all)
        return _scan_tiles(reader, min_size)


def _scan_tiles(reader: Any, min_size: Sequence[int] | None) -> tuple[list[str], int]:
    from weakseg.data.dfc2020 import DFC2020Dataset

    dfc = isinstance(reader, DFC2020Dataset)
    s1_dir = getattr(reader, "s1_dir", None) if dfc else None
    image_bands: int | None = DFC_S2_BANDS if dfc else None
    faults: list[str] = []
    small: list[str] = []
    bad_tiles: set[int] = set()
    for i in range(len(reader)):
        problems: list[str] = []
        image = Path(reader.source_path(i))
        try:
            bands, height, width = raster_header(image)
        except DataError as e:
            faults.append(f"tile {reader.ids[i]}: {e}")
            bad_tiles.add(i)
            continue
        if image_bands is None:
            image_bands = bands
        if bands != image_bands:
            problems.append(f"{image.name} has {bands} bands, expected {image_bands}")
        if min_size is not None and (height < min_size[0] or width < min_size[1]):
            small.append(f"{image} is {height}x{width}")
            bad_tiles.add(i)
        paired: list[tuple[str, Path, int]] = []
        if s1_dir is not None:  # the reader's pairing rule: the S2 file name with _s1_ for _s2_, in the S1 folder
            paired.append(("S1", Path(s1_dir) / image.name.replace("_s2_", "_s1_"), DFC_S1_BANDS))
        if reader.has_masks:
            try:
                paired.append(("label", Path(reader.mask_path(i)), 1))
            except DataError as e:  # DFC2020's reader refuses a missing label file here
                problems.append(str(e))
        for kind, path, expected in paired:
            if not path.is_file():
                problems.append(f"{path} is missing (the {kind} file of {image.name})")
                continue
            try:
                b, h, w = raster_header(path)
            except DataError as e:
                problems.append(str(e))
                continue
            if b != expected:
                problems.append(f"{path.name} has {b} bands, expected {expected}")
            if (h, w) != (height, width):
                problems.append(f"{path.name} is {h}x{w} but {image.name} is {height}x{width}")
        if problems:
            faults.append(f"tile {reader.ids[i]} ({image.parent}): " + "; ".join(problems))
            bad_tiles.add(i)
    if small:
        assert min_size is not None
        more = f" and {len(small) - 3} more" if len(small) > 3 else ""
        faults.append(f"{len(small)} tile(s) smaller than the model input {min_size[0]}x{min_size[1]} (--imgsize): "
                      f"{', '.join(small[:3])}{more}")
    return faults, len(bad_tiles)


def check_tile_files(readers: dict[str, Any], min_size: Sequence[int] | None = None) -> None:
    """Raise one :class:`DataError` listing every faulty tile of the readers ``{split: reader}``."""
    parts, lines = [], []
    for split, reader in readers.items():
        faults, count = scan_tiles(reader, min_size)
        if faults:
            parts.append(f"{count} of {len(reader)} tile(s) of split {split!r}")
            lines += faults
    if not lines:
        return
    listed = "\n  ".join(lines[:MAX_LISTED_FAULTS])
    more = f"\n  ... and {len(lines) - MAX_LISTED_FAULTS} more" if len(lines) > MAX_LISTED_FAULTS else ""
    raise DataError(f"{' and '.join(parts)} cannot be used:\n  {listed}{more}")


def build_transform(
    stage: str, img_size: tuple[int, int], data_config: dict[str, Any]
) -> Compose:
    """The sample transform for ``stage`` in {'train', 'val', 'predict'} from a data config dict.

    ``data_config['train_view']`` (module docstring): ``"crop"`` (the default) -- a random crop in training, the
    centre crop in validation, augmentation, then normalisation; ``"resize"`` (whole-image labels) -- normalise,
    resize the whole tile and its mask to ``img_size``, then augment. Normalisation comes before any resize, so a
    no-data NaN is filled before an interpolation could spread it.
    """
    norm = Normalize(data_config.get("normalization", "none"), *(data_config.get("band_stats") or (None, None)))
    whole = data_config.get("train_view", "crop") == "resize"
    if stage == "train":
        augmentations = build_augmentations(data_config.get("augmentations", ()))
        if whole:
            return Compose([norm, Resize(img_size, targets=True), *augmentations])
        return Compose([RandomCrop(img_size), *augmentations, norm])
    if stage == "val":
        if whole:
            return Compose([norm, Resize(img_size, targets=True)])
        return Compose([CenterCrop(img_size), norm])
    if stage == "predict":
        return Compose([norm, Resize(img_size)])
    raise ValueError(f"unknown stage {stage!r}")


class WeakSegDataModule(L.LightningDataModule):
    """Train / validation / predict loaders for image-level-labelled tiles.

    Args:
        datadir: dataset root.
        dataset: reader kind, "dfc2020" or "folder".
        modality: "s2" or "s1s2" (DFC2020 only).
        img_size: model input (H, W).
        train_split, val_split: split names (DFC2020: train on "validation", validate on "test", as the
            sparse ViT reference does).
        batch_size: training batch per device; ``eval_batch_size`` for validation and predict (default 2x).
        normalization: "none", "per_image_max" or "standardize" (band statistics computed on the train split).
        augmentations: names from :data:`weakseg.data.transforms.AUGMENTATIONS`.
        cache: keep tiles in memory after the first read (small datasets).
        strict_data: a tile whose pixels cannot be used stops the run instead of being skipped
            (:meth:`screen_tiles`).
    """

    def __init__(
        self,
        datadir: str | Path,
        dataset: str = "dfc2020",
        modality: str = "s2",
        img_size: Sequence[int] = (64, 64),
        train_split: str = "validation",
        val_split: str | None = "test",
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        normalization: str = "none",
        augmentations: Sequence[str] = ("fliprot",),
        label_threshold: float = 0.10,
        band_stats: tuple[list[float], list[float]] | None = None,
        cache: bool = False,
        strict_data: bool = False,
        store: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.datadir = Path(datadir)
        self.dataset_kind = dataset
        self.modality = modality
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.train_split = train_split
        self.val_split = val_split
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.num_workers = num_workers
        self.label_threshold = label_threshold
        self.cache = cache
        #: ``--store``: None (default location), "none", or the store folder of the training split.
        self.store = store
        self.data_config: dict[str, Any] = {
            "dataset": dataset,
            "modality": modality,
            "normalization": normalization,
            "augmentations": list(augmentations),
            "label_threshold": label_threshold,
            "band_stats": band_stats,
        }
        build_augmentations(augmentations)  # validate names early
        self.train_set: Any = None
        self.val_set: Any = None
        self.tiles_checked = False
        self.strict_data = strict_data
        #: Tiles left out by :meth:`screen_tiles` (None: not screened yet).
        self.skipped: list[SkippedTile] | None = None
        self._screened_stats: tuple[list[float], list[float]] | None = None

    def open(self, split: str, stage: str) -> Any:
        """The reader of ``split`` with the transform of ``stage``, less the tiles :meth:`screen_tiles` skipped."""
        reader = open_dataset(self.dataset_kind, self.datadir, split, modality=self.modality,
                              label_threshold=self.label_threshold, cache=self.cache,
                              store=store_for_split(self.store, split))
        self._choose_view(reader)
        reader.transform = build_transform(stage, self.img_size, self.data_config)
        skip = {t.id for t in self.skipped or () if t.split == split}
        if skip:
            reader.restrict([i for i, tile in enumerate(reader.ids) if tile not in skip])
        return reader

    def _choose_view(self, reader: Any) -> None:
        """Record how training sees a tile: a crop where labels follow the crop, else the whole tile resized."""
        if self.data_config.get("train_view") not in TRAIN_VIEWS:
            self.data_config["train_view"] = "crop" if getattr(reader, "labels_from_crop", True) else "resize"
            if self.data_config["train_view"] == "resize":
                log.info("labels are whole-image labels (%s): training and validation see each tile whole, resized "
                         "to %dx%d as at prediction, not a crop that could lose a labelled class",
                         getattr(reader, "root", self.datadir), *self.img_size)

    def check_tiles(self) -> None:
        """Check the headers of every file of every train and validation tile (:func:`tile_faults`) once.

        Raises:
            DataError: listing every faulty tile of both splits, with its file names.
        """
        if self.tiles_checked:
            return
        splits = [split for split in dict.fromkeys((self.train_split, self.val_split)) if split]
        check_tile_files({split: open_dataset(self.dataset_kind, self.datadir, split, modality=self.modality,
                                              store=store_for_split(self.store, split))
                          for split in splits}, self.img_size)
        self.tiles_checked = True

    def screen_tiles(self) -> list[SkippedTile]:
        """Read every tile of the train and validation splits once and skip those whose pixels cannot be used.

        A tile is skipped when reading its image or mask raises :class:`DataError`: no valid pixel (all NaN/inf or
        nodata), pixel data that cannot be decoded, mask values that are not class ids. Each is logged with its
        file and reason and kept in :attr:`skipped` (:meth:`write_skipped_tiles`); :meth:`open` leaves them out.
        The band statistics of ``standardize`` are computed in the same pass, on the valid pixels of every
        usable training tile. Runs once; call :meth:`check_tiles` first (file headers).

        Raises:
            DataError: ``strict_data`` and a tile was skipped (all are listed), or a split has no usable tile.
        """
        if self.skipped is not None:
            return self.skipped
        t0 = time.time()
        need_stats = self.data_config["normalization"] == "standardize" and self.data_config["band_stats"] is None
        stats = BandStats()
        skipped: list[SkippedTile] = []
        tiles = partial = invalid_pixels = pixels = 0
        splits = [split for split in dict.fromkeys((self.train_split, self.val_split)) if split]
        for split in splits:
            reader = open_dataset(self.dataset_kind, self.datadir, split, modality=self.modality,
                                  store=store_for_split(self.store, split))
            self._choose_view(reader)
            usable = 0
            for i in range(len(reader)):
                try:
                    image = reader.read_image(i)  # (C, H, W), NaN = no data
                    if reader.has_masks:
                        reader.read_mask(i)
                except DataError as e:
                    skipped.append(SkippedTile(split, reader.ids[i], str(reader.source_path(i)), str(e)))
                    continue
                usable += 1
                valid = np.isfinite(image).all(axis=0)  # (H, W)
                tiles, pixels = tiles + 1, pixels + valid.size
                if not valid.all():
                    partial, invalid_pixels = partial + 1, invalid_pixels + int(valid.size - valid.sum())
                if need_stats and split == self.train_split:
                    stats.add(image)
            if usable == 0:
                reasons = "\n  ".join(f"{t.id}: {t.reason}" for t in skipped if t.split == split)
                raise DataError(f"no tile of split {split!r} can be used ({len(reader)} skipped):\n  {reasons}")
        self._report_skipped(skipped, time.time() - t0, tiles, partial, invalid_pixels, pixels)
        if need_stats:
            self._screened_stats = stats.result()
        self.skipped = skipped
        return skipped

    def _report_skipped(self, skipped: list[SkippedTile], seconds: float, tiles: int, partial: int,
                        invalid_pixels: int, pixels: int) -> None:
        if skipped and self.strict_data:
            shown, rest = skipped[:MAX_LISTED_FAULTS], len(skipped) - MAX_LISTED_FAULTS
            listed = "\n  ".join(f"tile {t.id} of split {t.split!r}: {t.reason}" for t in shown)
            more = f"\n  ... and {rest} more" if rest > 0 else ""
            raise DataError(f"{len(skipped)} tile(s) cannot be used and --strict_data is set (without it they are "
                            f"skipped):\n  {listed}{more}")
        for t in skipped[:MAX_LOGGED_SKIPS]:
            log.warning("warning: tile %s of split %r is skipped: %s", t.id, t.split, t.reason)
        if len(skipped) > MAX_LOGGED_SKIPS:
            log.warning("warning: ... and %d more skipped tiles (all in %s)", len(skipped) - MAX_LOGGED_SKIPS,
                        SKIPPED_TILES_FILE)
        if partial:
            log.info("%d of %d usable tiles have pixels without data (%.2f%% of their pixels): left out of the "
                     "statistics, ignored in targets", partial, tiles, 100 * invalid_pixels / max(pixels, 1))
        log.info("screened %d tile(s) in %.1fs: %d usable, %d skipped%s", tiles + len(skipped), seconds, tiles,
                 len(skipped), " (--strict_data makes them an error)" if skipped else "")

    def write_skipped_tiles(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/skipped_tiles.csv``: a row per skipped tile (split, id, file, reason), or a header alone."""
        return atomic_write_csv(Path(out_dir) / SKIPPED_TILES_FILE, ["split", "id", "file", "reason"],
                                ([t.split, t.id, t.file, t.reason] for t in self.skipped or ()))

    def skipped_summary(self) -> dict[str, Any]:
        """What ``summary.json`` records: the count per split and the file that lists them."""
        skipped = self.skipped or []
        per_split = {split: sum(t.split == split for t in skipped)
                     for split in dict.fromkeys((self.train_split, self.val_split)) if split}
        return {"count": len(skipped), "per_split": per_split, "file": SKIPPED_TILES_FILE,
                "strict_data": self.strict_data}

    def prepare_stats(self) -> None:
        """Screen the tiles (:meth:`screen_tiles`) and with them compute the band statistics for "standardize" on
        the usable tiles of the train split (once; they travel in the config)."""
        self.screen_tiles()
        if self.data_config["normalization"] == "standardize" and self.data_config["band_stats"] is None:
            self.data_config["band_stats"] = self._screened_stats
            log.info("band statistics computed on the valid pixels of the usable tiles of split %r",
                     self.train_split)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate"):
            self.check_tiles()
        self.prepare_stats()
        if stage in (None, "fit", "validate"):
            self.train_set = self.open(self.train_split, "train")
            first = self.train_set.read_image(0)
            H, W = first.shape[-2:]
            if H < self.img_size[0] or W < self.img_size[1]:
                raise DataError(
                    f"tile {self.train_set.source_path(0)} is {H}x{W}, smaller than the model input "
                    f"{self.img_size[0]}x{self.img_size[1]} (--imgsize)"
                )
            self.val_set = self.open(self.val_split, "val") if self.val_split else None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,  # defect 11 of the original: no shuffling
            num_workers=self.num_workers,
            drop_last=len(self.train_set) > self.batch_size,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, num_workers=self.num_workers)
