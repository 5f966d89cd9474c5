"""A tiny generated dataset in the PASCAL VOC layout, for tests and for trying ``--dataset voc`` without VOC.

Each image is a textured background (class 0) with one to three objects (ellipses and rectangles) of a few VOC
classes, each class with its own colour and stripe texture, so a small classifier learns the image labels from
colour and a CAM can find the objects. Masks are palette PNGs as in ``SegmentationClass``, with a 255 band of
``boundary`` pixels around every object as VOC's void outline. Deterministic from the seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from weakseg.data.voc import VOC_CLASSES, voc_palette

#: Object classes the generator draws (VOC ids) and their base colours (RGB in [0, 1]).
FIXTURE_CLASSES: dict[int, tuple[float, float, float]] = {
    1: (0.85, 0.15, 0.15),  # aeroplane: red
    8: (0.15, 0.25, 0.90),  # cat: blue
    12: (0.95, 0.85, 0.10),  # dog: yellow
    15: (0.90, 0.20, 0.85),  # person: magenta
}


def _object_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    ry, rx = rng.uniform(0.12, 0.28, 2) * size
    if rng.random() < 0.5:
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)


def make_voc_fixture(root: str | Path, num_images: int = 32, size: int = 48, seed: int = 0,
                     val_fraction: float = 0.25, boundary: int = 1, cls_labels: bool = False) -> Path:
    """Write ``root/VOC2012`` with JPEGImages, SegmentationClass, ImageSets/Segmentation/{train,val}.txt (and
    ``cls_labels.npy`` when asked); returns the VOC2012 folder."""
    rng = np.random.default_rng(seed)
    voc = Path(root) / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    palette = voc_palette(256).reshape(-1).tolist()
    ids, labels = [], {}
    classes = sorted(FIXTURE_CLASSES)
    for n in range(num_images):
        tile = f"2007_{n:06d}"
        k = int(rng.integers(1, 4))
        chosen = rng.choice(classes, size=min(k, len(classes)), replace=False)
        base = np.array([0.35, 0.55, 0.30]) + rng.normal(0, 0.05, 3)
        image = base[:, None, None] + rng.normal(0, 0.06, (3, size, size))  # grass-like background
        mask = np.zeros((size, size), dtype=np.uint8)
        for c in chosen:
            obj = _object_mask(rng, size)
            colour = np.array(FIXTURE_CLASSES[int(c)]) + rng.normal(0, 0.04, 3)
            stripes = 0.08 * np.sin(np.arange(size) * (0.6 + 0.3 * classes.index(int(c))))  # (W,) per class
            texture = np.broadcast_to(stripes[None, :], (size, size))[obj]  # (n,)
            image[:, obj] = colour[:, None] + texture[None] + rng.normal(0, 0.04, (3, int(obj.sum())))
            mask[obj] = int(c)
        if boundary > 0:  # VOC's void outline around each object
            edges = np.zeros_like(mask, dtype=bool)
            for c in np.unique(mask):
                region = mask == c
                edges |= region & ~ndimage.binary_erosion(region, iterations=boundary, border_value=1)
            edges &= ndimage.binary_dilation(mask > 0, iterations=boundary)
            mask = np.where(edges & (mask > 0), 255, mask).astype(np.uint8)
        rgb = (np.clip(image, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(rgb).save(voc / "JPEGImages" / f"{tile}.jpg", quality=95)
        png = Image.fromarray(mask, mode="P")
        png.putpalette(palette)
        png.save(voc / "SegmentationClass" / f"{tile}.png")
        ids.append(tile)
        labels[tile] = np.isin(np.arange(1, len(VOC_CLASSES)), chosen).astype(np.float32)
    n_val = max(1, int(round(val_fraction * num_images)))
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[n_val:]) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids[:n_val]) + "\n")
    if cls_labels:
        np.save(voc / "cls_labels.npy", labels)
    return voc
