"""Datasets, the synthetic generator, transforms and the data module.

:func:`open_dataset` is the one factory every command uses, so DFC2020 and bring-your-own folders are
interchangeable in the whole pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weakseg.data.splits import parse_split, part_indices
from weakseg.errors import DataError

DATASET_KINDS = ("dfc2020", "folder", "voc")


def open_dataset(kind: str, root: str | Path, split: str, **kwargs: Any) -> Any:
    """Open a reader by kind.

    Args:
        kind: "dfc2020" (official DFC2020 layout; also the built-in synthetic data) or "folder" (images plus
            a class-names file and image labels or masks; see the README) or "voc" (PASCAL VOC 2012 layout).
        root: dataset folder.
        split: split name ("validation" / "test" for DFC2020; a split list name or "all" for folders), or one
            part of it: ``"<split>:train"`` / ``"<split>:holdout"`` (:mod:`weakseg.data.splits`).
        kwargs: reader options (``modality``, ``transform``, ``label_threshold``, ``cache``), and ``store``: the
            tile store to read the split from (:mod:`weakseg.data.tile_store`, written by ``weakseg prepare``);
            None (default): the one at the default location ``<root>/.weakseg_store/...`` if it is complete and
            fresh (a stale one is not used: a warning names the changed file); a folder: that store; False: none.
    """
    store = kwargs.pop("store", None)
    base, part = parse_split(split)
    if kind == "dfc2020":
        from weakseg.data.dfc2020 import DFC2020Dataset

        try:
            reader = DFC2020Dataset(root, base, **kwargs)
        except DataError as e:
            if (Path(root) / "classes.txt").is_file():
                raise DataError(f"{e}. {root} holds a classes.txt: it looks like a folder dataset; pass "
                                "--dataset folder") from e
            raise
    elif kind == "folder":
        from weakseg.data.folder import FolderDataset

        reader = FolderDataset(root, base, **kwargs)
    elif kind == "voc":
        from weakseg.data.voc import VOCDataset

        reader = VOCDataset(root, base, **kwargs)
    else:
        raise DataError(f"unknown dataset kind {kind!r}; choose from {list(DATASET_KINDS)}")
    if store is not False:
        from weakseg.data.tile_store import attach_store

        attach_store(reader, kind, root, store)  # on the whole split; a part below reads it by tile id
    if part is not None:
        reader.restrict(part_indices(reader.ids, part))
        reader.split = split
    return reader


def guess_dataset_kind(root: Path, predictions: Path | None = None) -> tuple[str, str]:
    """(dataset kind, why) for a command not told ``--dataset``: the kind recorded in the ``run.json`` of a
    ``weakseg pseudomasks`` folder, else ``folder`` when ``root`` holds a ``classes.txt``, ``voc`` when it holds
    ``JPEGImages/`` (or ``VOCdevkit/VOC2012/JPEGImages/``), else ``dfc2020``."""
    import json

    if predictions is not None:
        try:
            kind = json.loads((Path(predictions) / "run.json").read_text()).get("dataset")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind in DATASET_KINDS:
            return kind, f"recorded in {Path(predictions) / 'run.json'}"
    if (Path(root) / "classes.txt").is_file():
        return "folder", f"{Path(root) / 'classes.txt'} exists"
    for sub in ("JPEGImages", "VOC2012/JPEGImages", "VOCdevkit/VOC2012/JPEGImages"):
        if (Path(root) / sub).is_dir():
            return "voc", f"{Path(root) / sub} exists"
    return "dfc2020", "no classes.txt in the data folder"


__all__ = ["DATASET_KINDS", "guess_dataset_kind", "open_dataset"]
