"""Maps -> masks, shared by every pseudomask method (one copy of each rule).

- :mod:`~weakseg.masks.result`: :class:`PseudomaskResult` (masks, per-pixel confidence, status and reason per
  image), the label-set rules for images with no or one label, the exact nearest-pixel fill.
- :mod:`~weakseg.masks.labels`: predicted and oracle label sets, the top class, ordering labels by probability.
- :mod:`~weakseg.masks.rules`: per-class maps -> masks: arg-max among the image's labels, or the own-mean threshold
  painted in ascending probability (TokenMasking-WSSS); per-class normalisation; upsampling.
"""

from weakseg.masks.labels import (
    check_label_inputs,
    oracle_label_sets,
    predicted_label_sets,
    sort_labels_by_probability,
    top_class,
)
from weakseg.masks.result import (
    STATUS_FALLBACK,
    STATUS_OK,
    UNASSIGNED,
    PseudomaskResult,
    check_out_size,
    constant_masks,
    label_set_rules,
    nearest_fill,
)
from weakseg.masks.rules import MASK_RULES, class_maps_to_masks, normalize_maps, upsample_maps

__all__ = [
    "MASK_RULES",
    "STATUS_FALLBACK",
    "STATUS_OK",
    "UNASSIGNED",
    "PseudomaskResult",
    "check_label_inputs",
    "check_out_size",
    "class_maps_to_masks",
    "constant_masks",
    "label_set_rules",
    "nearest_fill",
    "normalize_maps",
    "oracle_label_sets",
    "predicted_label_sets",
    "sort_labels_by_probability",
    "top_class",
    "upsample_maps",
]
