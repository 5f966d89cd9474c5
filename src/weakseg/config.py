"""Run configuration: defaults < preset < YAML file < command-line flags, saved beside the outputs.

Each command describes its settings as a dataclass; :func:`resolve` merges the layers and rejects unknown keys
with the list of valid ones, and :func:`save_resolved` writes ``config.yaml`` (with the weakseg version and git
commit when available) next to checkpoints and masks, so every result says how it was made.

**Validation.** Every value of every layer is checked once, here, before any data is read or model built: its
type from the dataclass field's annotation (``int``, ``float``, ``bool``, ``str``, ``X | None``, ``list[X]``,
nested lists) and its range from the command's *checks* (``{field: check}``, built from :func:`at_least`,
:func:`between`, :func:`one_of`, ...). A YAML file is not typed the way argparse types flags (PyYAML reads
``1e-3`` as a string and ``no`` as False), and without this a wrong value surfaced as a traceback deep in
Lightning or torch, minutes into a run. Values whose meaning is unambiguous are coerced (``"1e-3"`` -> 0.001,
``3.0`` -> 3 for an integer, a scalar -> a one-element list); anything else raises :class:`ConfigError` naming the
setting and where it came from: ``--num_epochs`` for a flag, ``num_epochs in config file run.yaml`` for YAML.
:func:`validate` applies the same rules to a dataclass built in code (the demo, the benchmarks).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, Union

import numpy as np
import yaml

import weakseg
from weakseg.errors import ConfigError
from weakseg.io import atomic_write_text

T = TypeVar("T")

#: A range check: the problem with a (type-checked, not None) value as text, or None when it is fine.
Check = Callable[[Any], "str | None"]
#: Source name of the command-line layer: its settings are named as flags (``--name``).
FLAGS = "flags"
#: Strings an optional non-text setting reads as None (YAML ``none``; ``null`` already is None).
_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "yes", "on")
_FALSE_WORDS = ("false", "no", "off")


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


def resolve(cls: type[T], *layers: dict[str, Any], source_names: list[str] | None = None,
            checks: dict[str, Check | Iterable[Check]] | None = None,
            flag_names: dict[str, str] | None = None) -> T:
    """Merge setting layers (later wins) into dataclass ``cls``, validating every value.

    Args:
        layers: ``{field: value}`` mappings, lowest priority first.
        source_names: one name per layer for messages ("config file run.yaml"); :data:`FLAGS` names a layer
            of command-line flags, whose settings are then called ``--name``.
        checks: range checks per field (see :func:`check_layer`), applied to each layer's values and to the
            defaults no layer overrides.
        flag_names: flag spelling of fields whose flag has another name (``{"lr": "learning_rate"}``).

    Raises:
        ConfigError: an unknown key, a value of the wrong type or out of range (naming the setting and its
            layer), a required setting that no layer gives.
    """
    names = list(source_names) if source_names else ["settings"] * len(layers)
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if len(names) != len(layers):
        raise ValueError(f"{len(layers)} layers but {len(names)} source names")
    for layer, source in zip(layers, names, strict=True):
        merged.update(check_layer(cls, layer, source, checks, flag_names))
        origin.update(dict.fromkeys(layer, source))
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in merged  # type: ignore[arg-type]
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing setting(s) {missing}")
    obj = cls(**merged)
    defaults = {f.name for f in dataclasses.fields(cls) if f.name not in origin}  # type: ignore[arg-type]
    return validate(obj, checks, source="defaults", only=defaults)


def check_layer(cls: type, layer: dict[str, Any], source: str,
                checks: dict[str, Check | Iterable[Check]] | None = None,
                flag_names: dict[str, str] | None = None) -> dict[str, Any]:
    """One layer's values, type-checked against ``cls``'s field annotations, coerced, and range-checked.

    A range check sees the coerced value and is skipped for None (an optional setting left to its default).
    A layer's value is checked even when a later layer overrides it: a config file with a wrong value is a
    wrong file.

    Raises:
        ConfigError: unknown keys (listing the valid ones), or the first wrong value, named with ``source``.
    """
    hints = _field_types(cls)
    unknown = sorted(set(layer) - set(hints))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown} in {source}; valid: {sorted(hints)}")
    out: dict[str, Any] = {}
    for name, value in layer.items():
        try:
            value = _coerce(value, hints[name])
            problem = _run_checks(value, (checks or {}).get(name))
        except _Mismatch as e:
            problem = str(e)
        if problem:
            raise ConfigError(f"{setting_label(name, source, flag_names)}: {problem}")
        out[name] = value
    return out


def validate(obj: T, checks: dict[str, Check | Iterable[Check]] | None = None, source: str = "settings",
             only: Iterable[str] | None = None, flag_names: dict[str, str] | None = None) -> T:
    """``obj`` (a settings dataclass built in code) with every field type-checked, coerced and range-checked.

    Raises:
        ConfigError: the first wrong field, named as ``<field> in <source>``.
    """
    fields = [f.name for f in dataclasses.fields(obj)]  # type: ignore[arg-type]
    keep = set(fields if only is None else only)
    values = {name: getattr(obj, name) for name in fields if name in keep}
    checked = check_layer(type(obj), values, source, checks, flag_names)
    return dataclasses.replace(obj, **checked)  # type: ignore[type-var]


def setting_label(name: str, source: str, flag_names: dict[str, str] | None = None) -> str:
    """How messages name a setting: ``--flag`` for a command-line value, ``name in <source>`` otherwise."""
    if source == FLAGS:
        return f"--{(flag_names or {}).get(name, name)}"
    return f"{name} in {source}"


# ---- types ------------------------------------------------------------------------------------------------------
class _Mismatch(Exception):
    """A value that does not fit its field's type (the message says what was expected)."""


def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> evaluated annotation (the modules use ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


def _optional_args(annotation: Any) -> tuple[list[Any], bool] | None:
    """(non-None members, allows None) of a union annotation; None when ``annotation`` is not a union."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = typing.get_args(annotation)
        return [a for a in args if a is not type(None)], type(None) in args
    return None


def describe_type(annotation: Any) -> str:
    """'an integer', 'a list of numbers or null', ... for messages."""
    union = _optional_args(annotation)
    if union is not None:
        members, optional = union
        text = " or ".join(describe_type(a) for a in members)
        return f"{text} or null" if optional else text
    if typing.get_origin(annotation) is list:
        (inner,) = typing.get_args(annotation) or (Any,)
        inner_text = describe_type(inner)
        plural = {"an integer": "integers", "a number": "numbers", "true or false": "booleans",
                  "a string": "strings"}.get(inner_text, inner_text.replace("a list of", "lists of", 1))
        return f"a list of {plural}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(annotation, "a value")


def _coerce(value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation``, converting only what is unambiguous; raises :class:`_Mismatch`."""
    union = _optional_args(annotation)
    if union is not None:
        members, optional = union
        if value is None and optional:
            return None
        if (optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS
                and str not in members):
            return None
        if len(members) == 1:  # keep the member's own message (and hint), naming the None option too
            try:
                return _coerce(value, members[0])
            except _Mismatch as e:
                message = str(e).replace(f"expected {describe_type(members[0])}",
                                         f"expected {describe_type(annotation)}", 1)
                raise _Mismatch(message) from e
        for member in members:
            try:
                return _coerce(value, member)
            except _Mismatch:
                continue
        raise _Mismatch(f"expected {describe_type(annotation)}, got {_show(value)}")
    if typing.get_origin(annotation) is list:
        (inner,) = typing.get_args(annotation) or (Any,)
        if isinstance(value, dict):
            raise _Mismatch(f"expected {describe_type(annotation)}, got {_show(value)}")
        items = list(value) if isinstance(value, (list, tuple)) else [value]  # a scalar is a list of one
        out = []
        for i, item in enumerate(items):
            try:
                out.append(_coerce(item, inner))
            except _Mismatch as e:
                raise _Mismatch(f"expected {describe_type(annotation)}, item {i + 1} is {_show(item)}") from e
        return out
    if annotation is bool:
        return _to_bool(value)
    if annotation is int:
        return _to_int(value)
    if annotation is float:
        return _to_float(value)
    if annotation is str:
        return _to_str(value)
    return value  # Any, dicts, ...: not checked


def _show(value: Any) -> str:
    if value is None:
        return "null"
    kind = "true/false" if isinstance(value, bool) else type(value).__name__
    return f"{value!r} ({kind})"


def _to_bool(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise _Mismatch(f"expected true or false, got {_show(value)}")


def _to_int(value: Any) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise _Mismatch(f"expected an integer, got {_show(value)}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    number: float | None = None
    if isinstance(value, (float, np.floating)):
        number = float(value)
    elif isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                number = float(value.strip())  # "1e3"
            except ValueError:
                number = None
    if number is not None and math.isfinite(number) and number == int(number):
        return int(number)
    raise _Mismatch(f"expected an integer, got {_show(value)}")


def _to_float(value: Any) -> float:
    number: float | None = None
    if isinstance(value, (bool, np.bool_)):
        number = None
    elif isinstance(value, (int, float, np.integer, np.floating)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())  # PyYAML reads 1e-3 (no dot) as the string "1e-3"
        except ValueError:
            number = None
    if number is None:
        raise _Mismatch(f"expected a number, got {_show(value)}")
    if not math.isfinite(number):
        raise _Mismatch(f"expected a finite number, got {value!r}")
    return number


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)  # type: ignore[return-value]
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(int(value))  # precision: 32
    hint = ' (YAML reads yes/no/on/off as true/false: quote the word, e.g. "no")' if isinstance(value, bool) else ""
    raise _Mismatch(f"expected a string, got {_show(value)}{hint}")


# ---- range checks -----------------------------------------------------------------------------------------------
def _run_checks(value: Any, checks: Check | Iterable[Check] | None) -> str | None:
    if value is None or checks is None:
        return None
    for check in [checks] if callable(checks) else checks:
        problem = check(value)
        if problem:
            return problem
    return None


def at_least(minimum: float, why: str = "") -> Check:
    """value >= minimum (``why`` is appended to the message)."""
    return lambda v: None if v >= minimum else f"must be at least {minimum}, got {v!r}{_why(why)}"


def positive(why: str = "") -> Check:
    """value > 0."""
    return lambda v: None if v > 0 else f"must be positive, got {v!r}{_why(why)}"


def between(low: float, high: float, low_open: bool = False) -> Check:
    """low <= value <= high (low < value with ``low_open``)."""
    def check(v: Any) -> str | None:
        ok = (low < v if low_open else low <= v) and v <= high
        return None if ok else f"must be in {'(' if low_open else '['}{low}, {high}], got {v!r}"
    return check


def one_of(choices: Iterable[Any] | Callable[[], Iterable[Any]]) -> Check:
    """value in ``choices`` (a callable is evaluated at check time, so heavy imports stay lazy)."""
    def check(v: Any) -> str | None:
        allowed = list(dict.fromkeys(choices() if callable(choices) else choices))
        return None if v in allowed else f"unknown value {v!r}; choose from {allowed}"
    return check


def each(*checks: Check) -> Check:
    """Every item of a list passes ``checks``."""
    def check(values: list[Any]) -> str | None:
        for i, v in enumerate(values):
            problem = _run_checks(v, checks)
            if problem:
                return f"item {i + 1}: {problem}"
        return None
    return check


def length(*allowed: int) -> Check:
    """A list of one of the ``allowed`` lengths."""
    def check(values: list[Any]) -> str | None:
        if len(values) in allowed:
            return None
        counts = " or ".join(str(n) for n in allowed)
        return f"takes {counts} value(s), got {len(values)}: {values!r}"
    return check


def non_empty(v: Any) -> str | None:
    return None if str(v).strip() else "must not be empty"


def _why(why: str) -> str:
    return f" ({why})" if why else ""


# ---- the rest ---------------------------------------------------------------------------------------------------
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
