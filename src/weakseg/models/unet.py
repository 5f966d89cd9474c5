"""The standard UNet used to refine pseudomasks (stage 3 of the sparse ViT pipeline).

Architecture: Ronneberger, Fischer and Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015, in the common "bilinear" variant: every stage is a double convolution (3x3 conv,
BatchNorm, ReLU, twice), the encoder halves the resolution with 2x2 max pooling, the decoder doubles it with
bilinear interpolation (no transposed convolutions) and concatenates the encoder feature map of the same
resolution (skip connection), and a 1x1 convolution maps the last decoder features to class logits.

Use in weakseg: Hanna, Mommert and Borth, "Sparse Multimodal Vision Transformer for Weakly Supervised Semantic
Segmentation", CVPRW 2023, refine their attention pseudomasks by training "a standard UNet" on them for a few
epochs, twice. The channel widths 64-128-256-512-512 follow the UNet of the authors' follow-up repository and
of the DFC2020 baseline (reference ``sparse_vit.md`` section 5). With widths ``(w0, ..., wL)`` the decoder
stage at resolution level ``i`` maps ``concat(skip_i, up(x))`` to ``w(i-1)`` channels (``w0`` at the top), so
the default reproduces the familiar 1024->256, 512->128, 256->64, 128->64 decoder.

Input sizes: ``L = len(widths) - 1`` poolings need height and width divisible by ``2**L``. By default other
sizes raise a :class:`~weakseg.errors.ConfigError` that suggests the nearest valid size. With ``pad_input`` (what
``weakseg refine`` uses, so a user's 250 x 375 tiles are refined instead of refused) the input is padded by
reflection to the next multiple, the same amount on both sides (so a flipped tile is padded the same way), and the
logits are cropped back to the input size: training and prediction see the same padding, and no pixel outside the
tile reaches the loss or the masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weakseg.errors import ConfigError

DEFAULT_WIDTHS: tuple[int, ...] = (64, 128, 256, 512, 512)


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BatchNorm -> ReLU) x 2; convolutions have no bias because BatchNorm adds one."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """Bilinear x2 upsampling, concatenation with the skip feature map, then a :class:`DoubleConv`."""

    def __init__(self, deep_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = DoubleConv(deep_channels + skip_channels, out_channels)

    def forward(self, deep: Tensor, skip: Tensor) -> Tensor:
        # Interpolating to the skip's exact size (not scale_factor=2) keeps the shapes tied together.
        up = F.interpolate(deep, size=skip.shape[-2:], mode="bilinear", align_corners=False)  # (B, Cd, H, W)
        return self.conv(torch.cat([skip, up], dim=1))  # (B, Cout, H, W)


class UNet(nn.Module):
    """UNet with configurable depth and widths; returns per-pixel class logits.

    Args:
        in_chans: input channels (13 for S2, 15 for S2 followed by S1, 3 for RGB).
        num_classes: output classes (8 DFC classes).
        widths: channels of the encoder stages from full resolution down to the bottleneck.
            ``len(widths) - 1`` max-pool steps are taken, so inputs must be divisible by
            ``2 ** (len(widths) - 1)``. The reference default is ``(64, 128, 256, 512, 512)`` (about 13 M
            parameters); ``(16, 32, 64, 128)`` is enough for a CPU demonstration.
        pad_input: pad inputs of other sizes by reflection to the next multiple and crop the logits back
            (module docstring) instead of raising.

    Raises:
        ConfigError: on non-positive channel counts or an empty ``widths``.
    """

    def __init__(
        self, in_chans: int = 13, num_classes: int = 8, widths: Sequence[int] = DEFAULT_WIDTHS,
        pad_input: bool = False,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or any(w <= 0 for w in widths):
            raise ConfigError(
                f"UNet widths must be a non-empty list of positive integers, got {list(widths)}"
            )
        if in_chans <= 0:
            raise ConfigError(f"UNet in_chans must be positive, got {in_chans}")
        if num_classes <= 0:
            raise ConfigError(f"UNet num_classes must be positive, got {num_classes}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.widths = widths

        self.stem = DoubleConv(in_chans, widths[0])
        self.down = nn.ModuleList(DoubleConv(widths[i - 1], widths[i]) for i in range(1, len(widths)))
        # Decoder stages, deepest first: level i (resolution 2**-i) outputs widths[i-1] channels,
        # level 0 outputs widths[0].
        up_blocks = []
        deep_channels = widths[-1]
        for level in range(len(widths) - 2, -1, -1):
            out_channels = widths[level - 1] if level > 0 else widths[0]
            up_blocks.append(UpBlock(deep_channels, widths[level], out_channels))
            deep_channels = out_channels
        self.up = nn.ModuleList(up_blocks)
        self.head = nn.Conv2d(deep_channels, num_classes, kernel_size=1)
        self.pad_input = bool(pad_input)

    @property
    def size_divisor(self) -> int:
        """Height and width of an input must be multiples of this (``2 ** number of poolings``)."""
        return 2 ** (len(self.widths) - 1)

    def padding(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) reflection padding that makes (height, width) multiples of the divisor."""
        d = self.size_divisor
        ph, pw = -height % d, -width % d
        return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2

    def check_input_shape(self, x: Tensor) -> None:
        """Raise :class:`ConfigError` unless ``x`` is (B, in_chans, H, W) with H and W divisible."""
        if x.ndim != 4:
            raise ConfigError(f"UNet expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ConfigError(f"UNet expects {self.in_chans} input channels (in_chans), got {x.shape[1]}")
        h, w = x.shape[-2:]
        d = self.size_divisor
        if (h % d or w % d) and not self.pad_input:
            raise ConfigError(
                f"UNet input size {h}x{w} is not divisible by {d} (2**{len(self.widths) - 1} for "
                f"{len(self.widths)} widths); crop or pad to "
                f"{nearest_valid_size(h, d)}x{nearest_valid_size(w, d)}, "
                f"or use fewer widths"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Image (B, in_chans, H, W) -> logits (B, num_classes, H, W)."""
        self.check_input_shape(x)
        h, w = x.shape[-2:]
        left, right, top, bottom = self.padding(h, w)
        if left or right or top or bottom:
            # Reflection needs a pad smaller than the side; replicate covers tiles smaller than the divisor.
            mode = "reflect" if max(left, right) < w and max(top, bottom) < h else "replicate"
            logits = self._forward(F.pad(x, (left, right, top, bottom), mode=mode))  # (B, K, H + ph, W + pw)
            return logits[..., top : top + h, left : left + w]
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) with H, W multiples of the divisor -> logits (B, num_classes, H, W)."""
        skips = [self.stem(x)]  # [(B, w0, H, W)]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], kernel_size=2)))  # (B, wi, H / 2**i, W / 2**i)
        deep = skips.pop()  # (B, wL, H / 2**L, W / 2**L)
        for up in self.up:
            deep = up(deep, skips.pop())
        return self.head(deep)  # (B, num_classes, H, W)


def nearest_valid_size(size: int, divisor: int) -> int:
    """The multiple of ``divisor`` closest to ``size`` (ties round up), at least ``divisor``."""
    return max(divisor, (size + divisor // 2) // divisor * divisor)
