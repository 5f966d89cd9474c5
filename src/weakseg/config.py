"""Run configuration: defaults < preset < YAML file < command-line flags, saved beside the outputs.

Each command describes its settings as a dataclass; :func:`resolve` merges the layers and rejects unknown keys
with the list of valid ones, and :func:`save_resolved` writes ``config.yaml`` (with the weakseg version and git
commit when available) next to checkpoints and masks, so every result says how it was made.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml

import weakseg
from weakseg.errors import ConfigError
from weakseg.io import atomic_write_text

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (--config)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def resolve(cls: type[T], *layers: dict[str, Any], source_names: list[str] | None = None) -> T:
    """Merge setting layers (later wins) into dataclass ``cls``; unknown keys raise :class:`ConfigError`."""
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    merged: dict[str, Any] = {}
    for i, layer in enumerate(layers):
        unknown = sorted(set(layer) - fields)
        if unknown:
            where = source_names[i] if source_names else "settings"
            raise ConfigError(f"unknown setting(s) {unknown} in {where}; valid: {sorted(fields)}")
        merged.update(layer)
    return cls(**merged)


def explicit_args(args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Flags the user actually gave (parsers use ``argument_default=SUPPRESS``)."""
    return {k: v for k, v in vars(args).items() if k not in exclude and not k.startswith("_") and k not in ("run", "quiet")}


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_plain(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def save_resolved(config: Any, out_dir: str | Path, name: str = "config.yaml", **extra: Any) -> Path:
    """Write the resolved configuration (plus version, commit and ``extra``) atomically."""
    data = {"weakseg_version": weakseg.__version__, "git_commit": git_commit(), **to_plain(extra),
            "config": to_plain(config)}
    return atomic_write_text(Path(out_dir) / name, yaml.safe_dump(data, sort_keys=False))
