"""Dense CRF post-processing of any method's masks (``weakseg pseudomasks --crf``).

A fully connected CRF (Krähenbühl and Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge
Potentials", NeurIPS 2011) snaps a mask's region borders to the image's colour edges: each pixel's label is pulled
towards the labels of nearby pixels (a Gaussian kernel over position) and of nearby pixels of similar colour (a
bilateral kernel over position and RGB). WSSS methods apply it to their CAM masks; WeakTr (Zhu et al., IEEE TIP,
``weaktr.md`` section 3.8) does so with a unary from the *hard* labels. The settings default to WeakTr's phase-1 VOC
values: Gaussian sxy 4 / compat 3, bilateral sxy 83 / srgb 5 / compat 3, ``gt_prob`` 0.7, 10 mean-field iterations.

**Which labels.** Only the classes present in the mask compete (as WeakTr's n_labels = the present classes), so the
CRF moves borders and never invents a class. Unlabelled pixels (255) are "unsure": they give no unary evidence and
stay 255 in the output (they are unlabelled for a reason: no data, or a method's fallback), so the CRF never
labels a pixel the method left out.

**Which colours.** The bilateral kernel needs an 8-bit RGB image; a multispectral tile is shown to it through the
same composite the figures use (:func:`weakseg.viz.figures.render_image`: Sentinel-2 true colour B04/B03/B02 with a
2-98 % stretch, RGB as is, bands 1-3 of other band counts, band 1 in grey for one or two bands).

The implementation is the ``pydensecrf2`` package (the optional extra ``crf``: ``pip install 'weakseg[crf]'``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from weakseg.data.classes import IGNORE_INDEX
from weakseg.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class CRFSettings:
    """Dense CRF parameters (defaults: WeakTr phase 1 on VOC, ``weaktr.md`` section 3.8)."""

    gaussian_sxy: float = 4.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 83.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 3.0
    gt_prob: float = 0.7
    iterations: int = 10

    def __post_init__(self) -> None:
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"CRF {name} must be positive, got {getattr(self, name)}")
        if not 0 < self.gt_prob < 1:
            raise ConfigError(f"CRF gt_prob must be in (0, 1), got {self.gt_prob}")
        if self.iterations < 1:
            raise ConfigError(f"CRF iterations must be at least 1, got {self.iterations}")


def require_crf() -> Any:
    """The ``pydensecrf`` module, or a :class:`ConfigError` that names the extra to install."""
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError as e:
        raise ConfigError(
            "--crf needs the optional dependency pydensecrf2, which is not installed: "
            "pip install 'weakseg[crf]' (or pip install pydensecrf2)"
        ) from e
    return densecrf


def crf_refine(mask: np.ndarray, rgb: np.ndarray, settings: CRFSettings = CRFSettings(),
               return_confidence: bool = False) -> Any:
    """``mask`` (H, W) of class ids and 255 after a dense CRF on the colours of ``rgb`` (H, W, 3) uint8.

    Returns a new (H, W) uint8 mask: the classes of ``mask`` only, 255 where ``mask`` is 255. A mask with fewer
    than two classes comes back unchanged (there is no border to move). With ``return_confidence``, the pair
    (mask, confidence): the CRF's marginal probability of each pixel's class as (H, W) float32, 0 where
    unlabelled, or None for an unchanged mask.
    """
    densecrf = require_crf()
    from pydensecrf.utils import unary_from_labels

    mask = np.asarray(mask)
    if mask.ndim != 2 or rgb.shape != (*mask.shape, 3):
        raise ValueError(f"mask (H, W) and rgb (H, W, 3) must match, got {mask.shape} and {rgb.shape}")
    unlabelled = mask == IGNORE_INDEX
    present = np.unique(mask[~unlabelled])  # (n,) class ids in the mask
    if len(present) < 2:
        unchanged = mask.astype(np.uint8, copy=True)
        return (unchanged, None) if return_confidence else unchanged
    h, w = mask.shape
    # 1..n for the present classes, 0 = unsure (no unary evidence), as pydensecrf's zero_unsure expects.
    labels = np.zeros((h, w), np.int32)
    labels[~unlabelled] = np.searchsorted(present, mask[~unlabelled]) + 1
    crf = densecrf.DenseCRF2D(w, h, len(present))
    crf.setUnaryEnergy(unary_from_labels(labels, len(present), gt_prob=settings.gt_prob, zero_unsure=True))
    crf.addPairwiseGaussian(sxy=settings.gaussian_sxy, compat=settings.gaussian_compat)
    crf.addPairwiseBilateral(sxy=settings.bilateral_sxy, srgb=settings.bilateral_srgb,
                             rgbim=np.ascontiguousarray(rgb, dtype=np.uint8), compat=settings.bilateral_compat)
    q = np.asarray(crf.inference(settings.iterations)).reshape(len(present), h, w)  # (n, H, W) marginals
    out = present[q.argmax(axis=0)].astype(np.uint8)
    out[unlabelled] = IGNORE_INDEX
    if not return_confidence:
        return out
    confidence = q.max(axis=0).astype(np.float32)
    confidence[unlabelled] = 0.0
    return out, confidence


def crf_image(image: np.ndarray) -> np.ndarray:
    """(C, H, W) tile -> (H, W, 3) uint8 composite the bilateral kernel sees (module docstring)."""
    from weakseg.viz.figures import render_image

    rgb, _ = render_image(np.nan_to_num(np.asarray(image, dtype=np.float32)))
    return np.ascontiguousarray(rgb, dtype=np.uint8)
