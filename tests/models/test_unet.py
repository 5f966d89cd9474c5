"""Tests of weakseg.models.unet: shapes for several input sizes, gradients, size errors."""

from __future__ import annotations

import pytest
import torch

from weakseg.errors import ConfigError
from weakseg.models.unet import DEFAULT_WIDTHS, UNet, nearest_valid_size

TINY_WIDTHS = (4, 8, 16)  # two poolings: sizes must be multiples of 4


@pytest.mark.parametrize("size", [(16, 16), (8, 24), (20, 12), (4, 4)])
def test_output_shape_square_and_non_square(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = UNet(in_chans=5, num_classes=3, widths=TINY_WIDTHS).eval()
    x = torch.randn(2, 5, *size)
    out = model(x)
    assert out.shape == (2, 3, *size)
    assert torch.isfinite(out).all()


def test_default_widths_are_the_reference_unet() -> None:
    model = UNet(in_chans=13, num_classes=8)
    assert model.widths == DEFAULT_WIDTHS == (64, 128, 256, 512, 512)
    assert model.size_divisor == 16
    # Decoder input channels of the bilinear reference UNet: 1024, 512, 256, 128 -> 256, 128, 64, 64.
    first_convs = [up.conv[0] for up in model.up]
    channels = [(c.in_channels, c.out_channels) for c in first_convs]
    assert channels == [(1024, 256), (512, 128), (256, 64), (128, 64)]
    assert model.head.in_channels == 64 and model.head.out_channels == 8


def test_single_width_has_no_pooling() -> None:
    model = UNet(in_chans=2, num_classes=4, widths=(3,))
    assert model.size_divisor == 1
    assert model(torch.randn(1, 2, 5, 7)).shape == (1, 4, 5, 7)


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    model = UNet(in_chans=3, num_classes=4, widths=(4, 8, 8))
    out = model(torch.randn(2, 3, 8, 12))
    out.square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_skip_connection_carries_full_resolution_detail() -> None:
    """A change in one input pixel changes the output there even though the bottleneck is 1x1."""
    torch.manual_seed(0)
    model = UNet(in_chans=1, num_classes=2, widths=(4, 4, 4)).eval()
    x = torch.zeros(1, 1, 4, 4)
    y0 = model(x)
    x[0, 0, 0, 0] = 5.0
    y1 = model(x)
    assert not torch.allclose(y0[..., 0, 0], y1[..., 0, 0])


def test_pad_input_pads_by_reflection_and_crops_back() -> None:
    torch.manual_seed(0)
    model = UNet(in_chans=3, num_classes=2, widths=(4, 8, 16, 32), pad_input=True).eval()  # divisor 8
    assert model.padding(30, 64) == (0, 0, 1, 1) and model.padding(29, 61) == (1, 2, 1, 2)
    x = torch.randn(2, 3, 30, 61)
    y = model(x)
    assert y.shape == (2, 2, 30, 61)
    # the same as running the unpadded network on the reflected 32 x 64 input and cropping the centre by hand
    padded = torch.nn.functional.pad(x, (1, 2, 1, 1), mode="reflect")
    assert torch.allclose(y, model._forward(padded)[..., 1:31, 1:62], atol=1e-6)
    tiny = model(torch.randn(1, 3, 3, 5))  # smaller than the divisor: replicate padding, still cropped back
    assert tiny.shape == (1, 2, 3, 5)


def test_bad_size_raises_with_suggestion() -> None:
    model = UNet(in_chans=3, num_classes=2, widths=(4, 8, 16, 32))  # divisor 8
    with pytest.raises(ConfigError, match=r"30x64 is not divisible by 8.*32x64"):
        model(torch.randn(1, 3, 30, 64))


def test_wrong_channels_and_rank_raise() -> None:
    model = UNet(in_chans=3, num_classes=2, widths=TINY_WIDTHS)
    with pytest.raises(ConfigError, match="expects 3 input channels"):
        model(torch.randn(1, 4, 8, 8))
    with pytest.raises(ConfigError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"widths": ()}, "widths"),
        ({"widths": (8, 0)}, "widths"),
        ({"in_chans": 0}, "in_chans"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_config_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        UNet(**kwargs)


@pytest.mark.parametrize(
    ("size", "divisor", "expected"), [(30, 8, 32), (27, 8, 24), (28, 8, 32), (3, 16, 16)]
)
def test_nearest_valid_size(size: int, divisor: int, expected: int) -> None:
    assert nearest_valid_size(size, divisor) == expected
