"""Atomic file writing: outputs are either complete or absent, never half-written.

Every writer in weakseg (masks, manifests, scores, configs, figures, synthetic tiles) goes through
:func:`atomic_path`: it hands out a hidden temporary name in the target's folder (same file system, so the final
``os.replace`` is atomic; the process id keeps DDP ranks apart) and moves it into place only when the write
succeeded. A crash or kill leaves at most a ``.<name>.<pid>.tmp`` file, which no reader picks up.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np

from weakseg.errors import WeaksegError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed.

    Raises:
        WeaksegError: the folder cannot be created or the file cannot be written (the message names it).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise WeaksegError(f"cannot write {path}: {e}") from e
    finally:
        with suppress(OSError):  # nothing to clean when the folder itself could not be made
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Indented strict JSON: NaN/inf become null, numpy values and paths are converted."""
    return atomic_write_text(path, json.dumps(to_json_compatible(obj), indent=2, allow_nan=False) + "\n")


def to_json_compatible(obj: Any) -> Any:
    """Numpy values -> Python, non-finite floats -> None, paths -> str, tuples -> lists."""
    if isinstance(obj, Mapping):
        return {str(key): to_json_compatible(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_compatible(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return to_json_compatible(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj
