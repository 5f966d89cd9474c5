"""Datasets, the synthetic generator, transforms and the data module.

:func:`open_dataset` is the one factory every command uses, so DFC2020 and bring-your-own folders are
interchangeable in the whole pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weakseg.data.splits import parse_split, part_indices
from weakseg.errors import DataError

DATASET_KINDS = ("dfc2020", "folder")


def open_dataset(kind: str, root: str | Path, split: str, **kwargs: Any) -> Any:
    """Open a reader by kind.

    Args:
        kind: "dfc2020" (official DFC2020 layout; also the built-in synthetic data) or "folder" (images plus
            a class-names file and image labels or masks; see the README).
        root: dataset folder.
        split: split name ("validation" / "test" for DFC2020; a split list name or "all" for folders), or one
            part of it: ``"<split>:train"`` / ``"<split>:holdout"`` (:mod:`weakseg.data.splits`).
        kwargs: reader options (``modality``, ``transform``, ``label_threshold``, ``cache``).
    """
    base, part = parse_split(split)
    if kind == "dfc2020":
        from weakseg.data.dfc2020 import DFC2020Dataset

        reader = DFC2020Dataset(root, base, **kwargs)
    elif kind == "folder":
        from weakseg.data.folder import FolderDataset

        reader = FolderDataset(root, base, **kwargs)
    else:
        raise DataError(f"unknown dataset kind {kind!r}; choose from {list(DATASET_KINDS)}")
    if part is not None:
        reader.restrict(part_indices(reader.ids, part))
        reader.split = split
    return reader


__all__ = ["DATASET_KINDS", "open_dataset"]
