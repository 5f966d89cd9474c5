"""Bring-your-own data: a folder of images with image-level labels (the point of weak supervision).

Layout (see the README for an example)::

    mydata/
      classes.txt            one class name per line; line order = class id (0, 1, ...)
      colors.txt             optional: one '#rrggbb' display colour per class, in the order of classes.txt
      images/<id>.tif        GeoTIFF with any band count, or <id>.png / <id>.jpg RGB
      labels.csv             optional: header "id,labels", labels separated by ';' (e.g. "tile7,water;forest")
      masks/<id>.tif|.png    optional: uint8 class ids, 255 = ignore; labels then follow the >= 10 % rule and
                             the masks serve evaluation
      splits/<name>.txt      optional: one id per line; split "all" (the default) is every image

Format rules. They are checked when the dataset is opened (file contents: when a tile is first read); every
violation is a :class:`~weakseg.errors.DataError` that names the file, and the line where there is one.

**Text files** (``classes.txt``, ``labels.csv``, ``splits/*.txt``) are UTF-8. A UTF-8 byte-order mark, as
Excel's "CSV UTF-8" writes it, is accepted. Any other encoding (Latin-1, Windows-1252, Excel's "Unicode text"
UTF-16) is an error that names the file, the line of the first undecodable byte and the encoding expected. We
do not fall back to Latin-1: it decodes any bytes, so a wrong guess would silently turn "Forêt" into "ForÃªt"
in one file and not in the other, and the mismatch would surface later as an "unknown class" far from its
cause.

**classes.txt**: one name per line, line order = class id; blank lines and surrounding spaces are ignored.
Names are matched case-insensitively (``labels.csv`` may write ``Urban`` for ``urban``), so two names that
differ only by case are duplicates, an error. At most 254 classes (255 is the ignore index). When
``labels.csv`` exists, a name cannot contain ``,`` or ``;``, the label separators.

**colors.txt** (optional) gives the classes their colours in every figure (masks, legends): one ``#rrggbb`` per
line (blank lines ignored), as many as ``classes.txt`` has classes, in its order. Without it the classes get
:func:`weakseg.viz.palette.class_palette` colours, which stay pairwise distinct for any number of classes.

**labels.csv** is read with Python's :mod:`csv` module, so quoting is respected:

- The first non-blank line is the header. It names the columns ``id`` and ``labels`` (any case); other columns
  are allowed and ignored. A header separated by ``;`` or tabs (``id;labels``, as some spreadsheet locales
  export) is an error that says to use ``,`` between columns and ``;`` between labels.
- Every row has exactly as many fields as the header. Several labels go in the ``labels`` field separated by
  ``;`` (``tile7,water;forest``) or, inside a quoted field, by ``,`` (``tile7,"water,forest"``). An unquoted
  ``tile7,water,forest`` has too many fields and is an error: read leniently it trained with ``water`` only. A
  row without a labels field (``tile7``) is an error too: it used to train with no label.
- An explicitly empty labels field (``tile7,``) is allowed and means the image shows **none** of the classes:
  a negative example for every class. Such images are legitimate (background scenes, and the >= 10 % rule
  gives the same all-zero labels to a crop where no class reaches 10 %), and the pseudomask step has a
  documented rule for them (:func:`weakseg.masks.result.label_set_rules`). Because an empty field can also be
  an export accident, a warning counts these rows, and a file whose every labels field is empty is an error.
- Empty items between separators are skipped (``water;`` is ``water``); a repeated label counts once. Blank
  lines are skipped. Ids are unique, and every image of the split has a row and every row an image.

**Labels**: with ``labels.csv``, the training labels come from it alone and the masks (if any) serve evaluation
only. They are whole-image labels, which a crop can contradict (a class in one corner is not in a crop of the
other), so the classifier is trained and validated on the whole image resized to ``--imgsize``, as prediction
sees it (:attr:`FolderDataset.labels_from_crop` is False; :func:`weakseg.data.datamodule.build_transform`).
Without ``labels.csv``, labels follow the >= 10 % rule on the mask of the sample the model sees, a random crop
in training (:func:`weakseg.data.base.multi_hot_from_mask`), so they always describe the crop. At least one of
the two must exist.

**images/**: ``<id>.tif|.tiff|.png|.jpg|.jpeg`` (one file per id); every image of a dataset has the same band
count. Pixel values: uint8 images are divided by 255; uint16 images by 10000 (the Sentinel-2 reflectance
convention; not clipped, so a reflectance above 10000 stays above 1); every other type (float, int16, int32,
uint32) is used as it is (choose ``--normalization standardize`` for arbitrary ranges); :func:`scale_by_dtype`.
No data (:mod:`weakseg.data.nodata`): a pixel whose value is NaN/inf or equals its band's GeoTIFF nodata tag in
any band has no data; it is left out of the statistics, filled with a neutral value after normalisation and
ignored (255) in targets. NaN/inf get a warning that names the file; an image with no valid pixel is an error
(training skips the tile with that reason).

**masks/**: ``<id>.tif|.tiff|.png`` (lossless; a JPEG mask is an error because compression changes class ids),
a single band of integer class ids ``0..K-1`` or 255 = ignore, the same size as the image. Any other value,
including the negative values of a signed mask, is an error listing the offending values.

**splits/<name>.txt**: one id per line, each at most once; every id has an image; an empty list is an error.

Plain (non-georeferenced) GeoTIFFs are read without rasterio's ``NotGeoreferencedWarning``: the reader never
uses the georeference, so the warning would only be noise.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from weakseg.data.base import TileDataset, Transform
from weakseg.data.classes import IGNORE_INDEX
from weakseg.data.dfc2020 import read_raster_nodata
from weakseg.data.nodata import Nodata, mark_invalid, scale_valid
from weakseg.errors import ConfigError, DataError
from weakseg.viz.palette import class_palette

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
MASK_SUFFIXES = (".tif", ".tiff", ".png")
#: Label separators inside the ``labels`` field of labels.csv (',' only inside a quoted field).
LABEL_SEPARATORS = (";", ",")
_LABEL_SPLIT = re.compile(r"[;,]")
#: How many ids / values an error message lists.
_SHOWN = 5


def read_text(path: Path) -> str:
    """The text of a UTF-8 file, without its byte-order mark; other encodings: a DataError naming the file.

    See the module docstring for why there is no Latin-1 fallback.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(
            f"{path} is UTF-16 text (Excel's 'Unicode text'); save it as UTF-8 (in Excel: 'CSV UTF-8')"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path} line {line} is not UTF-8 (byte 0x{data[e.start]:02x}; Latin-1 or Windows-1252?): "
            "save the file with encoding UTF-8 (in Excel: 'CSV UTF-8')"
        ) from e


def _read_any(path: Path, bands: int | None = None) -> np.ndarray:
    """(C, H, W) array from a GeoTIFF or a PNG/JPEG; 1-bit images come as uint8 0/1."""
    return _read_any_nodata(path, bands)[0]


def _read_any_nodata(path: Path, bands: int | None = None) -> tuple[np.ndarray, Nodata]:
    """(C, H, W) array and the per-band nodata tags (a GeoTIFF's ``nodatavals``; none for PNG/JPEG)."""
    nodata: Nodata = ()
    if path.suffix.lower() in (".tif", ".tiff"):
        arr, nodata = read_raster_nodata(path, bands)
    else:
        try:
            with Image.open(path) as im:
                arr = np.asarray(im)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}") from e
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if bands is not None and arr.shape[0] != bands:
            raise DataError(f"{path} has {arr.shape[0]} bands, expected {bands}")
    return (arr.astype(np.uint8) if arr.dtype == np.bool_ else arr), nodata


def scale_by_dtype(arr: np.ndarray) -> np.ndarray:
    """A folder image's fixed scaling by its stored type: uint8 / 255, uint16 / 10000, any other type as it is.

    uint8 is the 8-bit display range (PNG/JPEG photos, 8-bit GeoTIFFs); uint16 is the Sentinel-2 convention of
    reflectance x 10000 (not clipped: a reflectance above 10000 stays above 1); float, int16, int32, uint32 have no
    convention, so their values are kept (``--normalization standardize``, the default, copes with any range).
    """
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 10000.0
    return arr.astype(np.float32)


def _index_folder(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Map id -> file for the files of ``folder`` ending in ``suffixes``; two files for one id: an error."""
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        suffix = p.suffix.lower()
        if suffix in IMAGE_SUFFIXES and suffix not in suffixes:
            raise DataError(
                f"{p}: masks must be lossless ({', '.join(suffixes)}); JPEG compression changes class ids"
            )
        if suffix in suffixes:
            if p.stem in files:
                raise DataError(
                    f"{folder} holds two files for id {p.stem!r}: {files[p.stem].name} and {p.name}"
                )
            files[p.stem] = p
    return files


def unique_lines(path: Path, noun: str, key: Callable[[str], str] = str, note: str = "") -> list[tuple[int, str]]:
    """(line number, stripped text) of each non-blank line of ``path``; an entry listed twice (compared by
    ``key``) is a :class:`DataError` naming both lines (classes.txt, split lists)."""
    entries: list[tuple[int, str]] = []
    first_line: dict[str, int] = {}
    for line_no, line in enumerate(read_text(path).splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        k = key(text)
        if k in first_line:
            raise DataError(f"{path} line {line_no}: {noun} {text!r} is listed twice (first on line "
                            f"{first_line[k]}{note})")
        first_line[k] = line_no
        entries.append((line_no, text))
    return entries


def _some(items: list[Any]) -> str:
    shown = ", ".join(repr(i) for i in items[:_SHOWN])
    return shown if len(items) <= _SHOWN else f"{shown}, ... ({len(items)} in total)"


class FolderDataset(TileDataset):
    """Images with image-level labels (CSV) and/or masks, as dict samples like :class:`DFC2020Dataset`.

    Args:
        root: the dataset folder (layout and format rules in the module docstring).
        split: "all" or the name of a list in ``splits/``.
        modality: accepted for the common reader interface; only "s2" (meaning: the images as they are) is
            valid, because a folder's images already carry all their bands.
        transform, label_threshold, cache: see :class:`~weakseg.data.base.TileDataset`.
    """

    has_masks: bool

    def __init__(
        self,
        root: str | Path,
        split: str = "all",
        transform: Transform | None = None,
        label_threshold: float = 0.10,
        modality: str = "s2",
        cache: bool = False,
    ) -> None:
        if modality != "s2":
            raise ConfigError(
                f"modality {modality!r} (--multimodal) applies to DFC2020; a folder dataset's images are "
                "used with all their bands: stack S1 and S2 into one GeoTIFF per tile instead"
            )
        super().__init__(transform, label_threshold, cache)
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise DataError(f"data folder {self.root} " + ("is a file, not a folder" if self.root.exists() else "does not exist") + " (--datadir)")
        self._class_lines: dict[str, int] = {}
        self.class_names = self._read_classes()
        self.class_colors = class_palette(self.num_classes, self._read_colors())
        images_dir = self.root / "images"
        if not images_dir.is_dir():
            raise DataError(f"{images_dir} does not exist: put the images in an images/ folder")
        images = _index_folder(images_dir)
        masks_dir = self.root / "masks"
        self.has_masks = masks_dir.is_dir()
        masks = _index_folder(masks_dir, MASK_SUFFIXES) if self.has_masks else {}
        labels_csv = self.root / "labels.csv"
        self._csv_labels = self._read_labels(labels_csv) if labels_csv.is_file() else None
        if self._csv_labels is None and not self.has_masks:
            raise DataError(f"{self.root} has neither labels.csv nor masks/: image-level labels are needed")
        ids = self._split_ids(images)
        if not ids:
            raise DataError(
                f"split 'all' of {self.root} is empty: {images_dir} holds no image "
                f"({', '.join(IMAGE_SUFFIXES)})"
            )
        if self._csv_labels is not None:
            unlabelled = [i for i in ids if i not in self._csv_labels]
            if unlabelled:
                raise DataError(
                    f"{len(unlabelled)} image(s) have no row in {labels_csv}: {_some(unlabelled)}"
                )
            orphan = sorted(set(self._csv_labels) - set(images))
            if orphan:
                raise DataError(
                    f"{labels_csv} has rows for {len(orphan)} id(s) with no image in {images_dir}: "
                    f"{_some(orphan)}"
                )
        if self.has_masks:
            no_mask = [i for i in ids if i not in masks]
            if no_mask:
                raise DataError(f"{len(no_mask)} image(s) have no mask in {masks_dir}: {_some(no_mask)}")
        self.ids = ids
        self._images = [images[i] for i in ids]
        self._masks = [masks[i] for i in ids] if self.has_masks else None
        self._bands: tuple[int, Path] | None = None  # band count of the first image read, and that image

    # ---- metadata files ---------------------------------------------------------------------------------
    def _read_classes(self) -> tuple[str, ...]:
        path = self.root / "classes.txt"
        if not path.is_file():
            raise DataError(f"{path} does not exist: list one class name per line")
        entries = unique_lines(path, "class", key=str.lower, note="; names are matched case-insensitively")
        self._class_lines.update({name: line_no for line_no, name in entries})
        names = [name for _, name in entries]
        if not names:
            raise DataError(f"{path} lists no class")
        if len(names) >= IGNORE_INDEX:
            raise DataError(f"{path} lists {len(names)} classes; at most {IGNORE_INDEX - 1} are supported")
        return tuple(names)

    def _read_colors(self) -> list[str] | None:
        """colors.txt -> one '#rrggbb' per class (module docstring); None when the file does not exist."""
        path = self.root / "colors.txt"
        if not path.is_file():
            return None
        colors: list[str] = []
        for line_no, line in enumerate(read_text(path).splitlines(), start=1):
            value = line.strip()
            if not value:
                continue
            if not re.fullmatch(r"#[0-9a-fA-F]{6}", value):
                raise DataError(f"{path} line {line_no}: {value!r} is not a colour; write one '#rrggbb' per line "
                                "(e.g. #1f77b4), in the order of classes.txt")
            colors.append(value.lower())
        if len(colors) != self.num_classes:
            raise DataError(f"{path} lists {len(colors)} colour(s) but classes.txt lists {self.num_classes} "
                            "classes: give one '#rrggbb' per class, in the same order (or delete colors.txt)")
        return colors

    def _read_labels(self, path: Path) -> dict[str, np.ndarray]:
        """labels.csv -> {id: multi-hot}, strictly (the rules are in the module docstring)."""
        for name in self.class_names:
            if any(sep in name for sep in LABEL_SEPARATORS):
                raise DataError(
                    f"{self.root / 'classes.txt'} line {self._class_lines[name]}: class {name!r} contains "
                    f"',' or ';', which separate labels in {path}; rename the class"
                )
        index = {n.lower(): i for i, n in enumerate(self.class_names)}
        reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True, skipinitialspace=True)
        out: dict[str, np.ndarray] = {}
        first_line: dict[str, int] = {}
        empty: list[str] = []
        try:
            header = next((row for row in reader if any(field.strip() for field in row)), None)
            if header is None:
                raise DataError(f"{path} is empty: it needs a header line 'id,labels' and one row per image")
            id_col, labels_col = self._header_columns(path, reader.line_num, header)
            example = "tile_003,Grassland;Wetlands;Water or tile_003,\"Grassland,Wetlands,Water\""
            for row in reader:
                line_no = reader.line_num
                if len(row) <= 1 and not "".join(row).strip():
                    continue  # blank line
                if len(row) != len(header):
                    raise DataError(self._field_count_message(path, line_no, row, header, example))
                tile = row[id_col].strip()
                if not tile:
                    raise DataError(f"{path} line {line_no}: empty id")
                if tile in out:
                    raise DataError(
                        f"{path} line {line_no}: id {tile!r} appears twice (first on line {first_line[tile]})"
                    )
                vec = np.zeros(len(self.class_names), dtype=np.float32)
                for name in filter(None, (s.strip() for s in _LABEL_SPLIT.split(row[labels_col]))):
                    if name.lower() not in index:
                        raise DataError(
                            f"{path} line {line_no}: unknown class {name!r} for {tile!r}; classes.txt has "
                            f"{list(self.class_names)}"
                        )
                    vec[index[name.lower()]] = 1.0
                if not vec.any():
                    empty.append(tile)
                out[tile] = vec
                first_line[tile] = line_no
        except csv.Error as e:
            raise DataError(
                f"{path} line {reader.line_num}: {e}; quote a field with '\"' at both ends (\"water,forest\")"
            ) from e
        if out and len(empty) == len(out):
            raise DataError(
                f"every labels field in {path} is empty: no image has a label to learn from (write the "
                "labels after the id, separated by ';', e.g. tile7,water;forest)"
            )
        if empty:
            log.warning(
                "%s: %d image(s) have an empty labels field and are trained as showing none of the "
                "classes: %s",
                path, len(empty), _some(empty),
            )
        return out

    @staticmethod
    def _header_columns(path: Path, line_no: int, header: list[str]) -> tuple[int, int]:
        """Positions of the 'id' and 'labels' columns; a ';'- or tab-separated header gets a hint."""
        names = [h.strip().lower() for h in header]
        if "id" not in names or "labels" not in names:
            separator = next((s for s in (";", "\t", "|") if any(s in h for h in header)), None)
            if separator is not None:
                shown = "tab" if separator == "\t" else repr(separator)
                raise DataError(
                    f"{path} line {line_no}: the header {','.join(header)!r} separates columns with {shown}; "
                    "use ',' between columns and ';' between labels (header id,labels; rows like "
                    "tile7,water;forest)"
                )
            raise DataError(
                f"{path} must have a header with columns 'id' and 'labels' (line {line_no} is "
                f"{','.join(header)!r})"
            )
        if "" in names:
            raise DataError(f"{path} line {line_no}: the header has an empty column name (a stray ',')")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DataError(f"{path} line {line_no}: the header names column(s) {dup} twice")
        return names.index("id"), names.index("labels")

    @staticmethod
    def _field_count_message(
        path: Path, line_no: int, row: list[str], header: list[str], example: str
    ) -> str:
        where = (
            f"{path} line {line_no}: {len(row)} field(s) {row!r} but the header has {len(header)} "
            f"({','.join(header)})"
        )
        if len(row) > len(header):
            return (
                f"{where}. Several labels go in one field: separate them with ';' or quote the field "
                f"({example})"
            )
        if len(row) == 1 and any(s in row[0] for s in (";", "\t")):
            return f"{where}. Use ',' between columns and ';' between labels ({example})"
        return (
            f"{where}. Every row needs all the columns; write 'tile_004,' (an empty labels field) for an "
            "image that shows none of the classes"
        )

    def _split_ids(self, images: dict[str, Path]) -> list[str]:
        if self.split == "all":
            return sorted(images)
        path = self.root / "splits" / f"{self.split}.txt"
        if not path.is_file():
            splits_dir = self.root / "splits"
            have = sorted(p.stem for p in splits_dir.glob("*.txt")) if splits_dir.is_dir() else []
            raise DataError(f"split {self.split!r} not found: no {path}; available: {['all', *have]}")
        first_line = {tile: line_no for line_no, tile in unique_lines(path, "id")}  # dicts keep the file's order
        ids = list(first_line)
        if not ids:
            raise DataError(f"split {self.split!r} is empty: {path} lists no id")
        missing = [i for i in ids if i not in images]
        if missing:
            raise DataError(
                f"split {self.split!r} lists {len(missing)} id(s) with no image in {self.root / 'images'}: "
                f"{_some(missing)} ({path} line {first_line[missing[0]]})"
            )
        return ids

    def _restrict_files(self, indices: list[int]) -> None:
        self._images = [self._images[i] for i in indices]
        if self._masks is not None:
            self._masks = [self._masks[i] for i in indices]

    # ---- reading ----------------------------------------------------------------------------------------
    def source_path(self, i: int) -> Path:
        return self._images[i]

    def mask_path(self, i: int) -> Path:
        assert self._masks is not None
        return self._masks[i]

    def _read_image(self, i: int) -> np.ndarray:
        """Scaled image (:func:`scale_by_dtype`), NaN in every band of a pixel with no data (module docstring)."""
        path = self._images[i]
        arr, nodata = _read_any_nodata(path)
        if self._bands is None:
            self._bands = (arr.shape[0], path)
        elif arr.shape[0] != self._bands[0]:
            raise DataError(
                f"{path} has {arr.shape[0]} bands, expected {self._bands[0]} like {self._bands[1].name}: "
                "every image of a folder dataset needs the same bands"
            )
        img, valid = scale_valid(arr, nodata, scale_by_dtype, path)  # (C, H, W), (H, W)
        return mark_invalid(img, valid)

    def _read_mask(self, i: int) -> np.ndarray:
        path = self.mask_path(i)
        mask = _read_any(path, 1)[0]
        if not np.issubdtype(mask.dtype, np.integer):
            raise DataError(f"{path} holds {mask.dtype} values; a mask holds integer class ids (uint8)")
        bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= self.num_classes))
        if bad.any():
            values = np.unique(mask[bad]).tolist()
            noun = "class id" if len(values) == 1 else "class ids"
            raise DataError(
                f"{path} holds {noun} {', '.join(map(str, values[:10]))} but classes.txt lists "
                f"{self.num_classes} classes (ids 0..{self.num_classes - 1}, 255 = ignore); "
                f"{int(bad.sum())} pixel(s) affected"
            )
        return mask.astype(np.uint8)

    @property
    def labels_from_crop(self) -> bool:
        """False with labels.csv: its labels describe the whole image, so training must not crop it."""
        return self._csv_labels is None

    def image_labels(self, i: int, sample: dict[str, Any]) -> torch.Tensor:
        """labels.csv when present (whole-image labels, crops do not change them); else the >= 10 % rule."""
        if self._csv_labels is not None:
            return torch.from_numpy(self._csv_labels[self.ids[i]].copy())
        return super().image_labels(i, sample)
