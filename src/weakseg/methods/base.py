"""The plug-in contract of pseudomask methods.

A method is a class with a ``name``, the classifier architectures it can read (``architectures``; the one to
train for it is ``trains``, i.e. ``weakseg train --arch <trains>``), an ``Options`` dataclass (its settings, which
become ``weakseg pseudomasks`` flags) and one call:

    method.pseudomasks(model, images, probs, label_sets, out_size) -> PseudomaskResult

The pipeline (:mod:`weakseg.pipeline.pseudomasks`) loads the classifier, computes probabilities and label sets,
calls the method per batch, and writes masks, confidence and the manifest; it does not know any method. Adding a
method is one module plus one line in :data:`weakseg.methods.METHODS`.

Methods whose evidence is one map per class derive from :class:`ClassMapMethod` and only implement
:meth:`ClassMapMethod.class_maps`; the masks then come from the shared rules of :mod:`weakseg.masks.rules`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from weakseg.errors import ConfigError
from weakseg.masks.result import PseudomaskResult
from weakseg.masks.rules import DEFAULT_BACKGROUND_THRESHOLD, MASK_RULES, NORMALIZATIONS, class_maps_to_masks
from weakseg.models.architectures import ARCHITECTURES, architecture_of
from weakseg.models.vit import GatedViT


@contextlib.contextmanager
def evaluation_mode(model: GatedViT) -> Iterator[GatedViT]:
    """``model`` in eval mode and without gradient inside the block, its train/eval mode restored afterwards
    (also on an error): how a method reads maps from a classifier that may be in the middle of training."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def option(default: Any, help: str, choices: Iterable[Any] | None = None) -> Any:
    """A method option: a dataclass field whose metadata becomes a ``weakseg pseudomasks`` flag."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None})


@dataclasses.dataclass
class NoOptions:
    """A method without settings."""


class PseudomaskMethod(ABC):
    """Base of every pseudomask method (module docstring).

    Class attributes:
        name: the ``--method`` value.
        summary: one line for ``--help``.
        architectures: classifier architectures (:mod:`weakseg.models.architectures`) the method can read.
        trains: the architecture to train for this method.
        needs_grad: the method differentiates the classifier (the pipeline then runs with autograd enabled).
        Options: dataclass of the method's settings (fields made with :func:`option`).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]] = tuple(ARCHITECTURES)
    trains: ClassVar[str] = "vit"
    needs_grad: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("pass either an Options instance or keyword options, not both")
        self.options = options if options is not None else self.Options(**kwargs)
        #: The dataset's background class (VOC: 0), None for land cover; set by :meth:`bind_dataset`.
        self.background_index: int | None = None
        self.validate_options()

    def bind_dataset(self, class_names: list[str], background_index: int | None) -> None:
        """Tell the method the classes of the data it will label (the pipeline calls this before the first batch).

        Raises:
            ConfigError: an option needs a background class the data does not have.
        """
        self.background_index = background_index

    def validate_options(self) -> None:
        """Raise :class:`ConfigError` for an option value outside its choices."""
        for f in dataclasses.fields(self.options):
            choices = f.metadata.get("choices")
            value = getattr(self.options, f.name)
            if choices and value not in choices:
                raise ConfigError(f"--{f.name} {value!r} is not valid for --method {self.name}; choose from {list(choices)}")

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    def attention_blocks(self, depth: int) -> list[int]:
        """Blocks whose *kept* heads this method reads, for a model of ``depth`` blocks (none by default).

        Used to warn when pruning closed every head of such a block (:mod:`weakseg.pipeline.sanity`).
        """
        return []

    def head_weights(self, model: GatedViT, images: Tensor) -> Tensor | None:
        """(depth, heads) per-head weights the method gives the heads of ``images`` (averaged), drawn as
        ``figures/head_weights.png``; None (the default) when the method weighs no heads."""
        return None

    def check_model(self, model: GatedViT, checkpoint: str | Path) -> None:
        """Refuse a classifier this method cannot read, naming the checkpoint and the ``--arch`` to train."""
        arch = architecture_of(model.cfg)
        if arch not in self.architectures:
            raise ConfigError(
                f"--method {self.name} needs a classifier with architecture {' or '.join(self.architectures)}, "
                f"but checkpoint {checkpoint} is a {arch!r} classifier ({model.num_class_tokens} class token(s) "
                f"for {model.cfg.num_classes} classes); train one with `weakseg train --arch {self.trains}`"
            )

    @abstractmethod
    def pseudomasks(
        self, model: GatedViT, images: Tensor, probs: Tensor, label_sets: Tensor, out_size: tuple[int, int]
    ) -> PseudomaskResult:
        """Masks of a batch.

        Args:
            model: the classifier, in eval mode.
            images: (B, C_in, H_in, W_in) model inputs.
            probs: (B, C) class probabilities of the same images.
            label_sets: (B, C) bool, the classes each mask may contain (predicted or oracle).
            out_size: (H, W) of the masks (the tiles' size).
        """


#: ``--rule`` values of class-map methods: the mask rules plus ``auto`` (background if the data has one).
RULE_CHOICES: tuple[str, ...] = (*MASK_RULES, "auto")


@dataclasses.dataclass
class ClassMapOptions:
    """Settings shared by methods that produce one map per class."""

    rule: str = option("argmax", "maps -> mask: argmax among the image's labels, or each label's map above its "
                                 "own mean painted in ascending probability (TokenMasking-WSSS), or background: "
                                 "the labels' maps against a constant background plane --background_threshold "
                                 "(datasets with a background class, WeakTr), or auto: background where the "
                                 "data has a background class, else argmax", RULE_CHOICES)
    normalize: str = option("max", "per-class normalisation before the argmax: max, or minmax", NORMALIZATIONS)
    background_threshold: float = option(DEFAULT_BACKGROUND_THRESHOLD,
                                         "value t of the background plane of --rule background (WeakTr VOC: 0.43; "
                                         "choose it on a holdout with --sweep_background)")
    scales: str = option("1", "multi-scale inference: comma list of input scales whose maps are summed, e.g. "
                              "1,1.5 (WeakTr: 1,1.2); each scale's input side is rounded to whole patches")
    flip: str = option("off", "add each scale's horizontally flipped view (its maps flipped back) to the sum",
                       ("off", "on"))


def parse_scales(spec: str) -> list[float]:
    """``"1,1.5"`` -> [1.0, 1.5]: positive, distinct scales (``--scales``)."""
    try:
        scales = [float(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--scales must be comma-separated numbers such as 1,1.5, got {spec!r}") from None
    if not scales or any(not s > 0 for s in scales) or len(set(scales)) != len(scales):
        raise ConfigError(f"--scales {spec!r}: give distinct positive scales such as 1,1.5")
    return scales


def multiscale_class_maps(class_maps: Any, model: GatedViT, images: Tensor, label_sets: Tensor,
                          scales: list[float], flip: bool, out_size: tuple[int, int]) -> Tensor:
    """Sum over scales (and flips) of ``class_maps`` upsampled to ``out_size``: (B, C, H, W).

    Multi-scale + flip inference as WeakTr's CAM inference (``weaktr.md`` section 3: resize the input to each
    scale, add the horizontally flipped view with its maps flipped back, upsample every view's maps bilinearly to
    one size and sum them). The model sees each scale through interpolated patch positions
    (:meth:`weakseg.models.vit.GatedViT.embed`); a scale's input side is the nearest whole number of patches.
    Summing before the per-class normalisation of :mod:`weakseg.masks.rules` weights the views equally.
    """
    p = model.cfg.patch_size
    H, W = images.shape[-2:]
    total: Tensor | None = None
    for scale in scales:
        size = (max(p, round(H * scale / p) * p), max(p, round(W * scale / p) * p))
        x = images if size == (H, W) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            maps = class_maps(model, x.flip(-1) if flipped else x, label_sets)  # (B, C, h_s, w_s)
            maps = maps.flip(-1) if flipped else maps
            up = F.interpolate(maps.float(), size=out_size, mode="bilinear", align_corners=False)  # (B, C, H, W)
            total = up if total is None else total + up
    assert total is not None  # at least one scale (parse_scales)
    return total


class ClassMapMethod(PseudomaskMethod):
    """A method whose evidence is one non-negative map per class, turned into masks by :mod:`weakseg.masks.rules`."""

    Options: ClassVar[type] = ClassMapOptions
    #: Reason token of images with two or more labels, and prefix of a label whose map is flat.
    multi_reason: ClassVar[str] = "map_argmax"
    empty_reason: ClassVar[str] = "empty_map"

    @abstractmethod
    def class_maps(self, model: GatedViT, images: Tensor, label_sets: Tensor) -> Tensor:
        """(B, C, h, w) non-negative maps; only the classes in ``label_sets`` need to be meaningful."""

    def validate_options(self) -> None:
        super().validate_options()
        parse_scales(self.options.scales)
        t = self.options.background_threshold
        if not 0.0 < t < 1.0:
            raise ConfigError(f"--background_threshold must be in (0, 1) (the normalised maps lie in [0, 1]), got {t}")

    def bind_dataset(self, class_names: list[str], background_index: int | None) -> None:
        super().bind_dataset(class_names, background_index)
        if self.options.rule == "background" and background_index is None:
            raise ConfigError(f"--rule background needs a dataset with a background class (such as --dataset voc); "
                              f"the classes {class_names} have none: use --rule argmax")

    def resolved_rule(self) -> str:
        """The mask rule in effect: ``auto`` is ``background`` when the data has a background class, else argmax."""
        rule = self.options.rule
        if rule == "auto":
            return "background" if self.background_index is not None else "argmax"
        return rule

    def merged_maps(self, model: GatedViT, images: Tensor, label_sets: Tensor, out_size: tuple[int, int]) -> Tensor:
        """The maps the mask rule reads: one view's (B, C, h, w), or with ``--scales``/``--flip`` the sum of every
        view's maps upsampled to ``out_size``, (B, C, H, W)."""
        scales, flip = parse_scales(self.options.scales), self.options.flip == "on"
        if scales == [1.0] and not flip:
            return self.class_maps(model, images, label_sets)  # (B, C, h, w): one view, as before
        return multiscale_class_maps(self.class_maps, model, images, label_sets, scales, flip, out_size)

    def masks_from_maps(self, maps: Tensor, probs: Tensor, label_sets: Tensor, out_size: tuple[int, int],
                        background_threshold: float | None = None) -> PseudomaskResult:
        """:func:`~weakseg.masks.rules.class_maps_to_masks` with this method's rule (``background_threshold``
        overrides the option: the threshold sweep)."""
        rule = self.resolved_rule()
        reason = {"argmax": self.multi_reason, "threshold": "map_threshold", "background": "map_background"}[rule]
        t = self.options.background_threshold if background_threshold is None else background_threshold
        return class_maps_to_masks(
            maps, probs, label_sets, out_size, rule=rule, normalize=self.options.normalize, multi_reason=reason,
            empty_reason=self.empty_reason, background_index=self.background_index, background_threshold=t,
        )

    def pseudomasks(
        self, model: GatedViT, images: Tensor, probs: Tensor, label_sets: Tensor, out_size: tuple[int, int]
    ) -> PseudomaskResult:
        maps = self.merged_maps(model, images, label_sets, out_size)
        return self.masks_from_maps(maps, probs, label_sets, out_size)


def parse_blocks(spec: str, depth: int) -> list[int]:
    """Block indices from ``"all"``, ``"last"`` or a comma list such as ``"0,-1"`` (negative = from the end)."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(depth))
    if spec == "last":
        return [depth - 1]
    try:
        blocks = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--blocks must be 'all', 'last' or comma-separated block indices, got {spec!r}") from None
    bad = [b for b in blocks if not -depth <= b < depth]
    if not blocks or bad:
        raise ConfigError(f"--blocks {spec!r}: the model has blocks 0..{depth - 1} (or -1..-{depth})")
    return sorted({b % depth for b in blocks})
