"""Settings: layers, type checks and coercion from the dataclass annotations, range checks naming their source."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from weakseg.config import (
    FLAGS,
    at_least,
    between,
    each,
    length,
    load_yaml,
    one_of,
    positive,
    resolve,
    validate,
)
from weakseg.errors import ConfigError


@dataclass
class Settings:
    name: str
    epochs: int = 10
    rate: float = 0.5
    flag: bool = False
    size: list[int] = field(default_factory=lambda: [8, 8])
    words: list[str] = field(default_factory=lambda: ["a"])
    limit: int | None = None
    split: str | None = None
    stats: list[list[float]] | None = None


CHECKS = {"epochs": at_least(1), "rate": between(0, 1), "size": [length(1, 2), each(positive())],
          "words": each(one_of(["a", "b"]))}


def resolved(*layers: dict, names: list[str] | None = None) -> Settings:
    return resolve(Settings, {"name": "x"}, *layers, checks=CHECKS,
                   source_names=["defaults", *(names or [f"layer {i}" for i in range(len(layers))])])


def test_yaml_spellings_are_coerced_when_unambiguous(tmp_path: Path) -> None:
    # PyYAML reads 1e-3 (no dot) and 1e3 as strings, a single size as a scalar.
    path = tmp_path / "s.yaml"
    path.write_text("rate: 1e-3\nepochs: 1e3\nsize: 32\nwords: b\nflag: 'yes'\nlimit: none\nsplit: none\n"
                    "stats: [[1, 2], [3, 4]]\n")
    cfg = resolved(load_yaml(path))
    assert cfg.rate == 0.001 and isinstance(cfg.rate, float)
    assert cfg.epochs == 1000 and isinstance(cfg.epochs, int)
    assert cfg.size == [32] and cfg.words == ["b"] and cfg.flag is True
    assert cfg.limit is None  # 'none' for an optional number is None ...
    assert cfg.split == "none"  # ... but stays text for an optional string (commands give it a meaning)
    assert cfg.stats == [[1.0, 2.0], [3.0, 4.0]] and isinstance(cfg.stats[0][0], float)
    assert resolved({"epochs": 3.0, "name": Path("p")}).epochs == 3
    assert resolved({"name": Path("p")}).name == "p"


@pytest.mark.parametrize("key, value, message", [
    ("epochs", "three", "epochs in layer 0: expected an integer, got 'three' (str)"),
    ("epochs", 2.5, "epochs in layer 0: expected an integer, got 2.5"),
    ("epochs", True, "epochs in layer 0: expected an integer, got True"),
    ("epochs", [3], "epochs in layer 0: expected an integer"),
    ("rate", "fast", "rate in layer 0: expected a number, got 'fast'"),
    ("rate", "nan", "rate in layer 0: expected a finite number"),
    ("rate", False, "rate in layer 0: expected a number, got False"),
    ("flag", "maybe", "flag in layer 0: expected true or false, got 'maybe'"),
    ("flag", 1, "flag in layer 0: expected true or false, got 1"),
    ("size", ["a", 2], "size in layer 0: expected a list of integers, item 1 is 'a'"),
    ("size", {"h": 2}, "size in layer 0: expected a list of integers"),
    ("limit", "many", "limit in layer 0: expected an integer or null, got 'many'"),
    ("split", False, 'split in layer 0: expected a string or null, got False (true/false) (YAML reads yes/no'),
    ("name", ["a"], "name in layer 0: expected a string, got ['a']"),
    ("stats", [[1, "x"]], "stats in layer 0: expected a list of lists of numbers or null"),
])
def test_wrong_types_name_the_setting_and_its_layer(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        resolved({key: value})
    assert message in str(e.value)


@pytest.mark.parametrize("key, value, message", [
    ("epochs", 0, "must be at least 1, got 0"),
    ("rate", 1.5, "must be in [0, 1], got 1.5"),
    ("size", [8, 8, 8], "takes 1 or 2 value(s), got 3"),
    ("size", [8, -8], "item 2: must be positive, got -8"),
    ("words", ["a", "c"], "item 2: unknown value 'c'; choose from ['a', 'b']"),
])
def test_range_checks_name_flags_as_flags(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        resolved({key: value}, names=[FLAGS])
    assert str(e.value).startswith(f"--{key}: {message}")
    with pytest.raises(ConfigError, match=f"^{key} in config file c.yaml: "):
        resolved({key: value}, names=["config file c.yaml"])


def test_later_layers_win_and_every_layer_is_checked() -> None:
    cfg = resolved({"epochs": 3, "rate": 0.2}, {"epochs": 5}, names=["config file c.yaml", FLAGS])
    assert (cfg.epochs, cfg.rate) == (5, 0.2)
    # A wrong value in the file is reported even though a flag overrides it: the file is wrong.
    with pytest.raises(ConfigError, match="epochs in config file c.yaml: must be at least 1"):
        resolved({"epochs": 0}, {"epochs": 5}, names=["config file c.yaml", FLAGS])


def test_flag_names_that_differ_from_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^--learning_rate: must be in \[0, 1\]"):
        resolve(Settings, {"name": "x", "rate": 3.0}, checks=CHECKS, source_names=[FLAGS],
                flag_names={"rate": "learning_rate"})


def test_unknown_and_missing_settings() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['epoch'\] in layer 0; valid: \["):
        resolved({"epoch": 3})
    with pytest.raises(ConfigError, match=r"missing setting\(s\) \['name'\]"):
        resolve(Settings, {"epochs": 3})


def test_validate_checks_settings_built_in_code() -> None:
    cfg = validate(Settings(name="x", rate="0.25", size=16), CHECKS)  # type: ignore[arg-type]
    assert cfg.rate == 0.25 and cfg.size == [16]
    with pytest.raises(ConfigError, match=r"^epochs in Settings: must be at least 1, got -1"):
        validate(Settings(name="x", epochs=-1), CHECKS, source="Settings")
