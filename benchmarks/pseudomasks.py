"""Benchmark: batched attention-clustering pseudomasks vs a per-image version of the original algorithm.

Method: Hanna, Mommert and Borth, "Sparse Multimodal Vision Transformer for Weakly Supervised Semantic
Segmentation", CVPRW 2023 (``sparse_vit.md`` section 3). Both implementations run in this process on the same
synthetic attention maps (a few smooth blobs per image, one per label, each kept head attending mostly to one
blob; seeded):

- **ours**: :func:`weakseg.methods.attention_clustering.attention_pseudomasks` in fixed-size batches;
- **reference**: the released algorithm image by image -- scikit-learn ``KMeans`` with k-means++ and
  ``n_init=10`` (set explicitly) and ``random_state`` 24 over the head maps, ``KMeans(2, random_state=21)`` on
  each cluster map's pixels, rank matching, painting, and the brute-force nearest fill over all pairwise
  distances. Where the original dropped an image (no label, fewer heads than labels) the reference uses our
  documented fallback, so that the two outputs can be compared on every image.

Printed: images/s of each (the reference runs on fewer images; its per-image time is extrapolated), the
speed-up, the agreement (mIoU and pixel agreement of ours against the reference, on all compared images and on
those with two or more labels), and peak memory for two dataset sizes (tracemalloc peak of Python/numpy
allocations and the process max RSS), showing that memory does not grow with the number of tiles. Run with
``OMP_NUM_THREADS=1`` for the single-core figures::

    OMP_NUM_THREADS=1 python benchmarks/pseudomasks.py
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from weakseg.methods.attention_clustering import attention_pseudomasks

NUM_CLASSES = 8


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[256, 1024],
                        help="two dataset sizes (images) for ours; memory should not grow with the size")
    parser.add_argument("--reference-images", type=int, default=24,
                        help="images for the slow per-image reference (its time per image is extrapolated); 0 "
                             "skips it, as needed at 224x224 where its brute-force fill needs ~(HW)^2/4 distances")
    parser.add_argument("--out-size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"),
                        help="pseudomask size; the paper uses 224 224 (with --grid 16 16 --heads 16)")
    parser.add_argument("--grid", type=int, nargs=2, default=[8, 8], metavar=("h", "w"), help="patch grid")
    parser.add_argument("--heads", type=int, default=6, help="heads of the last block")
    parser.add_argument("--pruned", type=int, default=1, help="pruned heads (their maps are all zero)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch for ours")
    parser.add_argument("--threads", type=int, default=1, help="torch / BLAS / OpenMP threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic maps")
    return parser


# ---- synthetic attention -----------------------------------------------------------------------------------
def synthetic_batch(
    start: int, count: int, args: argparse.Namespace
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images ``start .. start+count-1``; each image is seeded by its index, so batches can be regenerated.

    Returns head maps (B, heads, h, w) (rows sum to 1 like attention, pruned heads zero), kept (heads,),
    probabilities (B, C) and predicted label sets (B, C).
    """
    h, w = args.grid
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    kept = np.arange(args.heads) < args.heads - args.pruned
    maps = np.zeros((count, args.heads, h, w))
    probs = np.zeros((count, NUM_CLASSES))
    for i in range(count):
        rng = np.random.default_rng([args.seed, start + i])
        n = int(rng.choice([0, 1, 2, 3, 4], p=[0.05, 0.2, 0.35, 0.3, 0.1]))
        classes = rng.choice(NUM_CLASSES, size=n, replace=False)
        probs[i] = rng.uniform(0.02, 0.45, NUM_CLASSES)
        probs[i, classes] = rng.uniform(0.55, 0.99, n)
        blobs = max(n, 1)
        centres = rng.uniform([0, 0], [h - 1, w - 1], size=(blobs, 2))
        sigmas = rng.uniform(0.8, 2.5, blobs) * max(h, w) / 8
        for head in np.flatnonzero(kept):
            blob = head % blobs if head < blobs else rng.integers(blobs)
            d2 = (ys - centres[blob, 0]) ** 2 + (xs - centres[blob, 1]) ** 2
            logits = 3.0 * np.exp(-d2 / (2 * sigmas[blob] ** 2)) + rng.normal(0, 0.3, (h, w))
            att = np.exp(logits)
            maps[i, head] = att / att.sum()
    probs_t = torch.from_numpy(probs).float()
    return torch.from_numpy(maps).float(), torch.from_numpy(kept), probs_t, probs_t > 0.5


def batches(total: int, args: argparse.Namespace) -> Iterator[tuple[torch.Tensor, ...]]:
    for start in range(0, total, args.batch_size):
        yield synthetic_batch(start, min(args.batch_size, total - start), args)


# ---- the per-image reference -------------------------------------------------------------------------------
def reference_pseudomask(
    head_maps: np.ndarray, probs: np.ndarray, labels: np.ndarray, out_size: tuple[int, int]
) -> np.ndarray:
    """The original algorithm on one image's (heads, h, w) maps; our fallbacks where it dropped images."""
    H, W = out_size
    order_classes = np.argsort(-probs, kind="stable")
    ranked_labels = [c for c in order_classes if labels[c]]
    if len(ranked_labels) == 0:
        return np.full(out_size, order_classes[0], dtype=np.uint8)
    if len(ranked_labels) == 1:
        return np.full(out_size, ranked_labels[0], dtype=np.uint8)
    kept = [m for m in head_maps if np.any(m != 0)]  # "keep heads whose map is not all zero"
    k = min(len(ranked_labels), len(kept))
    if k < 2:
        return np.full(out_size, ranked_labels[0], dtype=np.uint8)
    ranked_labels = ranked_labels[:k]
    rows = []
    for m in kept:
        m = torch.from_numpy(m / m.max())[None, None].float()
        up = F.interpolate(m, size=out_size, mode="bilinear", align_corners=False)  # cv2 INTER_LINEAR
        rows.append(up.flatten().double().numpy())
    X = np.stack(rows)  # (K, H*W)
    assign = KMeans(n_clusters=k, init="k-means++", n_init=10, random_state=24).fit(X).labels_
    cluster_maps, strengths, foregrounds = [], [], []
    for j in range(k):
        cm = X[assign == j].mean(axis=0)
        km = KMeans(n_clusters=2, init="k-means++", n_init=10, random_state=21).fit(cm.reshape(-1, 1))
        fg_label = int(np.argmax(km.cluster_centers_[:, 0]))
        fg = km.labels_ == fg_label
        cluster_maps.append(cm)
        foregrounds.append(fg)
        strengths.append(cm[fg].mean())
    by_strength = np.argsort(-np.asarray(strengths), kind="stable")  # maps, strongest first
    painted = np.full(H * W, -1, dtype=np.int64)
    for rank in range(k - 1, -1, -1):  # weakest first, so the strongest map wins overlaps
        painted[foregrounds[by_strength[rank]]] = ranked_labels[rank]
    missing = np.flatnonzero(painted < 0)
    if len(missing):
        have = np.flatnonzero(painted >= 0)
        my, mx = np.divmod(missing, W)
        hy, hx = np.divmod(have, W)
        dist = (my[:, None] - hy[None]) ** 2 + (mx[:, None] - hx[None]) ** 2  # (missing, have): O((HW)^2)
        painted[missing] = painted[have[dist.argmin(axis=1)]]
    return painted.reshape(H, W).astype(np.uint8)


# ---- measurements ------------------------------------------------------------------------------------------
def confusion(a: np.ndarray, b: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Confusion matrix with rows = reference ``a``, columns = ours ``b``."""
    idx = a.astype(np.int64).ravel() * num_classes + b.astype(np.int64).ravel()
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def miou(cm: np.ndarray) -> float:
    """Mean IoU over classes present in either output."""
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean())


def max_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def run_ours(total: int, args: argparse.Namespace, keep_first: int = 0) -> tuple[float, Counter, np.ndarray]:
    """Generate ``total`` masks batch by batch, keeping only reason counts (and the first masks for
    agreement).

    Returns seconds spent in the method (synthesis excluded), reason counts and the first ``keep_first``
    masks.
    """
    seconds, reasons, kept_masks = 0.0, Counter(), []
    for head_maps, kept, probs, labels in batches(total, args):
        t0 = time.perf_counter()
        result = attention_pseudomasks(head_maps, kept, probs, labels, tuple(args.out_size))
        seconds += time.perf_counter() - t0
        reasons.update(result.reason_counts())
        if sum(len(m) for m in kept_masks) < keep_first:
            kept_masks.append(result.masks)
    first = np.concatenate(kept_masks)[:keep_first] if kept_masks else np.zeros((0, *args.out_size), np.uint8)
    return seconds, reasons, first


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out_size = tuple(args.out_size)
    print(f"maps: {args.heads} heads ({args.pruned} pruned), grid {args.grid[0]}x{args.grid[1]}, "
          f"masks {out_size[0]}x{out_size[1]}, batch {args.batch_size}, {args.threads} thread(s), "
          f"torch {torch.__version__}")

    with threadpool_limits(args.threads):
        # Warm-up (first calls allocate thread pools and kernels).
        run_ours(min(args.batch_size, 16), args)

        # Speed and memory for two dataset sizes.
        speeds = {}
        for total in args.sizes:
            seconds, reasons, _ = run_ours(total, args)
            speeds[total] = total / seconds
            tracemalloc.start()
            run_ours(total, args)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            print(f"ours      {total:6d} images: {seconds:7.2f} s  {total / seconds:8.1f} images/s  "
                  f"tracemalloc peak {peak / 2**20:6.1f} MiB  max RSS so far {max_rss_mib():7.1f} MiB")
        print(f"ours reasons ({args.sizes[-1]} images): {dict(sorted(reasons.items()))}")

        if args.reference_images > 0:
            compare_with_reference(args, speeds[args.sizes[-1]])
    return 0


def compare_with_reference(args: argparse.Namespace, ours_speed: float) -> None:
    """Run the per-image reference on the first images of the same stream; print speed-up and agreement."""
    m, out_size = args.reference_images, tuple(args.out_size)
    _, _, ours_masks = run_ours(m, args, keep_first=m)
    ref_masks, ref_seconds = [], 0.0
    for head_maps, _, probs, labels in batches(m, args):
        for i in range(len(probs)):
            t0 = time.perf_counter()
            ref_masks.append(
                reference_pseudomask(head_maps[i].numpy(), probs[i].numpy(), labels[i].numpy(), out_size)
            )
            ref_seconds += time.perf_counter() - t0
    ref_masks = np.stack(ref_masks)
    ref_speed = m / ref_seconds
    print(f"reference {m:6d} images: {ref_seconds:7.2f} s  {ref_speed:8.2f} images/s  "
          f"({1000 * ref_seconds / m:.0f} ms/image; {args.sizes[-1]} images would take "
          f"{args.sizes[-1] * ref_seconds / m / 60:.1f} min)  max RSS so far {max_rss_mib():7.1f} MiB")
    print(f"speed-up: {ours_speed / ref_speed:.1f}x (ours on {args.sizes[-1]} images; target >= 20x)")

    n_labels = np.concatenate([lab.sum(1).numpy() for _, _, _, lab in batches(m, args)])
    multi = n_labels >= 2
    cm_all = confusion(ref_masks, ours_masks)
    cm_multi = confusion(ref_masks[multi], ours_masks[multi])
    print(f"agreement on {m} images: mIoU {miou(cm_all):.4f}, pixels {np.trace(cm_all) / cm_all.sum():.4f} "
          f"(target mIoU > 0.95)")
    print(f"agreement on the {int(multi.sum())} images with >= 2 labels: mIoU {miou(cm_multi):.4f}, "
          f"pixels {np.trace(cm_multi) / cm_multi.sum():.4f}; identical masks: "
          f"{int((ref_masks[multi] == ours_masks[multi]).all(axis=(1, 2)).sum())}/{int(multi.sum())}")


if __name__ == "__main__":
    raise SystemExit(main())
