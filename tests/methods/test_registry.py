"""Tests of the method registry and of the plug-in contract's shared parts (options, --blocks)."""

from __future__ import annotations

import pytest

from weakseg.errors import ConfigError
from weakseg.methods import METHODS, AttentionClustering, ClassAttention, GradCAM, TopClass, WeakTrCAM, get_method
from weakseg.methods.base import parse_blocks
from weakseg.models.vit import build_vit

NAMES = ["attention", "class_attention", "gradcam", "pcm", "top_class", "weaktr"]


def test_every_method_is_registered_under_its_own_name() -> None:
    assert sorted(METHODS) == NAMES
    assert all(cls.name == name for name, cls in METHODS.items())
    assert METHODS["attention"] is AttentionClustering and METHODS["class_attention"] is ClassAttention
    assert METHODS["gradcam"] is GradCAM and METHODS["top_class"] is TopClass and METHODS["weaktr"] is WeakTrCAM
    assert all(cls.summary for cls in METHODS.values())


def test_get_method_builds_an_instance_with_its_options() -> None:
    method = get_method("attention", assign="rank", blocks="last", seed=3)
    assert isinstance(method, AttentionClustering)
    assert method.options_dict() == {"assign": "rank", "blocks": "last", "seed": 3}
    assert get_method("gradcam").options_dict() == {"rule": "argmax", "normalize": "max",
                                                      "background_threshold": 0.43, "scales": "1", "flip": "off"}
    assert isinstance(get_method("class_attention", heads="all").options, ClassAttention.Options)


def test_unknown_method_lists_the_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown method 'cam' \(--method\); choose from "
                                          r"\['attention', 'class_attention', 'gradcam', 'pcm', 'top_class', 'weaktr'\]"):
        get_method("cam")


@pytest.mark.parametrize(
    ("name", "option", "value", "choices"),
    [("gradcam", "rule", "vote", "['argmax', 'threshold', 'background', 'auto']"),
     ("class_attention", "heads", "pruned", "['kept', 'all']"),
     ("attention", "assign", "random", "['rank', 'head_gradient', 'gradcam', 'relabel']"),
     ("class_attention", "normalize", "sum", "['max', 'minmax']")],
)
def test_a_bad_option_value_names_the_flag_the_method_and_the_choices(name, option, value, choices) -> None:
    with pytest.raises(ConfigError) as info:
        get_method(name, **{option: value})
    assert str(info.value) == f"--{option} {value!r} is not valid for --method {name}; choose from {choices}"


def test_an_option_the_method_does_not_have_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--method top_class: .*unexpected keyword argument 'rule'"):
        get_method("top_class", rule="argmax")
    with pytest.raises(TypeError, match="either an Options instance or keyword options"):
        GradCAM(GradCAM.Options(), rule="argmax")


def test_architectures_each_method_reads() -> None:
    small = dict(img_size=(16, 16), patch_size=8, in_chans=3, embed_dim=12, depth=2, num_heads=2,
                 num_classes=3)
    one_cls = build_vit(**small)
    tokens = build_vit(**small, num_cls_tokens=3, head_type="per_class")
    for name in ("attention", "gradcam", "top_class"):
        get_method(name).check_model(one_cls, "a.ckpt")
        get_method(name).check_model(tokens, "b.ckpt")
    assert ClassAttention.trains == "class_tokens"
    with pytest.raises(ConfigError, match="--method class_attention needs a classifier with architecture "
                                          "class_tokens"):
        get_method("class_attention").check_model(one_cls, "a.ckpt")


# ---- --blocks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "depth", "expected"),
    [("all", 3, [0, 1, 2]), ("last", 3, [2]), ("last", 1, [0]), ("0,-1", 4, [0, 3]), ("-1,0", 4, [0, 3]),
     (" 2 , 0 ", 4, [0, 2]), ("1,-3", 4, [1]), ("-4", 4, [0]), ("3", 4, [3])],
)
def test_parse_blocks(spec: str, depth: int, expected: list[int]) -> None:
    assert parse_blocks(spec, depth) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [("first", r"--blocks must be 'all', 'last' or comma-separated block indices, got 'first'"),
     ("0;1", r"--blocks must be 'all', 'last' or comma-separated block indices, got '0;1'"),
     ("4", r"--blocks '4': the model has blocks 0\.\.3 \(or -1\.\.-4\)"),
     ("0,-5", r"--blocks '0,-5': the model has blocks 0\.\.3"),
     ("", r"--blocks '': the model has blocks"),
     (",", r"--blocks ',': the model has blocks")],
)
def test_bad_blocks_are_config_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_blocks(spec, 4)
