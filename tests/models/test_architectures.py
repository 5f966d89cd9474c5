"""Tests of the classifier architectures (``weakseg train --arch``)."""

from __future__ import annotations

import pytest

from weakseg.errors import ConfigError
from weakseg.models.architectures import ARCHITECTURES, architecture_of, get_architecture
from weakseg.models.vit import ViTConfig


def test_get_architecture_by_name_and_unknown_names_list_the_choices() -> None:
    assert get_architecture("vit") is ARCHITECTURES["vit"]
    assert get_architecture("class_tokens").name == "class_tokens"
    with pytest.raises(ConfigError,
                       match=r"unknown architecture 'tokens' \(--arch\); "
                             r"choose from \['class_tokens', 'pcm', 'vit', 'weaktr'\]"):
        get_architecture("tokens")


def test_vit_fields_one_cls_token_pooled_head() -> None:
    fields = get_architecture("vit").model_fields(num_classes=8)
    assert fields == {"num_cls_tokens": 1, "head_type": "pooled", "num_register_tokens": 0}
    cfg = ViTConfig(**fields, num_classes=8)
    assert not cfg.has_class_tokens and architecture_of(cfg) == "vit"
    assert get_architecture("vit").model_fields(8, num_register_tokens=2)["num_register_tokens"] == 2


def test_class_token_fields_one_token_per_class_a_register_and_the_per_class_head() -> None:
    arch = get_architecture("class_tokens")
    assert arch.class_tokens
    # Masking is the released head's way to tie token c to class c; the per-class head has the tie built in.
    assert arch.default_token_mask_rate() == 0.0 and arch.default_token_mask_rate("per_class") == 0.0
    assert arch.default_token_mask_rate("flatten") == 0.5
    assert get_architecture("vit").default_token_mask_rate() == 0.0
    fields = arch.model_fields(num_classes=5)
    assert fields == {"num_cls_tokens": 5, "head_type": "per_class", "num_register_tokens": 1}
    cfg = ViTConfig(**fields, num_classes=5)
    assert cfg.has_class_tokens and cfg.num_prefix_tokens == 6 and architecture_of(cfg) == "class_tokens"
    flatten = arch.model_fields(num_classes=5, head_type="flatten", num_register_tokens=0)
    assert flatten == {"num_cls_tokens": 5, "head_type": "flatten", "num_register_tokens": 0}  # 0 counts
    assert architecture_of(ViTConfig(**flatten, num_classes=5)) == "class_tokens"


@pytest.mark.parametrize("head", ["per_class", "flatten"])
def test_a_class_token_head_on_the_vit_architecture_is_refused(head: str) -> None:
    message = f"--class_token_head {head} needs --arch class_tokens \\(--arch vit has one CLS"
    with pytest.raises(ConfigError, match=message):
        get_architecture("vit").model_fields(num_classes=8, head_type=head)


def test_architecture_of_a_multi_token_pooled_model_is_vit() -> None:
    assert architecture_of(ViTConfig(num_classes=8, num_cls_tokens=8)) == "vit"  # no per-class head
