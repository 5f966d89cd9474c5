"""Pseudomasks from clustered attention heads: the method of the sparse ViT paper, batched.

Hanna, Mommert and Borth, "Sparse Multimodal Vision Transformer for Weakly Supervised Semantic Segmentation",
CVPRW 2023 (``sparse_vit.md`` section 3). Per image, the CLS->patch attention maps of the *kept* heads of the
last block are max-normalised and upsampled; the heads are clustered with k-means (k = number of labels); each
cluster's mean map is split into foreground/background by a 1-D 2-means on its pixel intensities; maps are
matched to classes by rank (strongest foreground <-> most probable class) and painted weakest first, so the
strongest map wins overlaps; the remaining pixels take the label of the nearest painted pixel.

How this implementation differs from the released per-image code, and why:

- **Batched.** All images of a batch go through each step at once on the model's device; the only per-image
  Python work is bookkeeping and one C call of the distance transform.
- **k-means on Gram matrices, at patch resolution, exactly.** Bilinear upsampling is linear and separable
  (``X = U_h x U_w^T``), so the inner products of the upsampled maps are ``<x_a, M_h x_b M_w>`` with
  ``M = U^T U``, computable on the (h, w) patch grid. k-means needs only these inner products (a centre is the
  mean of its members, so every distance expands into Gram entries), and cluster means commute with
  upsampling. Hence clustering runs on a (K, K) matrix per image in float64 and gives the same partition as
  k-means on the (K, H*W) upsampled maps -- no downsampling approximation is needed.
- **Variable k.** Images with different numbers of labels are clustered together: centres are padded to the
  largest k of the batch and padded centres are masked out (infinite distance).
- **Reproducible and batch-independent.** The greedy k-means++ initialisation (as scikit-learn) draws its
  uniforms from a CPU :class:`torch.Generator` seeded with ``seed`` (24, as the original's ``random_state``);
  the *same* draws serve every image, so an image's mask does not depend on its batch or its position in it
  (resumed runs reproduce masks). Each of ``n_init`` restarts (10, the pre-1.4 scikit-learn default the
  original relied on) runs Lloyd iterations until no assignment changes (or ``max_iter``); the restart with
  the lowest inertia wins. Empty clusters are re-seeded with the point farthest from its centre, as
  scikit-learn does.
- **Exact 1-D 2-means.** In one dimension the optimal 2-means partition is a threshold split of the sorted
  values, so sorting each cluster map and scanning all split points with prefix sums finds the global optimum
  of the within-cluster sum of squares (the original ran Lloyd iterations, ``random_state`` 21, which can stop
  in a local optimum). Splits are only taken between distinct values; a constant map has no split.
- **Defined failures** (defect 1 of the original: silently dropped images). See :func:`attention_pseudomasks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from weakseg.methods.common import (
    REASON_NO_LABEL,
    REASON_NOTHING_PAINTED,
    REASON_SINGLE_LABEL,
    STATUS_FALLBACK,
    STATUS_OK,
    UNASSIGNED,
    PseudomaskResult,
    check_label_inputs,
    check_out_size,
    constant_masks,
    nearest_fill,
    sort_labels_by_probability,
    top_class,
    upsample_maps,
)
from weakseg.models.vit import GatedViT

REASON_CLUSTERED = "clustered"
REASON_FEWER_HEADS = "fewer_heads_than_labels"
REASON_NO_HEADS = "no_heads_kept"
#: ``:<class id>`` follows: the cluster matched to that class had a constant mean map; it was not painted.
REASON_EMPTY_FOREGROUND = "empty_foreground"

#: Rows x pixels per chunk of the 1-D 2-means (bounds its float64 temporaries to a few tens of MB).
_TWO_MEANS_CHUNK_ELEMENTS = 1 << 22


@torch.no_grad()
def head_maps_from_model(model: GatedViT, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Run the classifier once in eval mode and return what :func:`attention_pseudomasks` needs.

    Eval mode makes the head gates deterministic (a head is kept iff its ``log_alpha > 0``); the previous mode
    is restored afterwards.

    Returns:
        head_maps: (B, heads, h, w) CLS->patch attention of the last block (pruned heads are all zero).
        kept: (heads,) bool, the last block's kept heads.
        probs: (B, C) sigmoid class probabilities.
    """
    was_training = model.training
    model.eval()
    try:
        out = model.forward_features(images, attention_blocks=[-1])
        last = max(out.attentions)
        head_maps = out.cls_to_patch_attention(last)  # (B, heads, h, w)
        probs = model.forward_head(out).sigmoid()  # (B, C)
        kept = model.head_mask()[last].to(images.device)  # (heads,)
    finally:
        model.train(was_training)
    return head_maps, kept, probs


def upsample_matrix(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in) float64 matrix of 1-D linear resizing, half-pixel centres (``align_corners=False``)."""
    eye = torch.eye(n_in, dtype=torch.float64)[:, None, :, None]  # (n_in, 1, n_in, 1): one impulse per row
    resized = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)  # (n_in, 1, n_out, 1)
    return resized[:, 0, :, 0].T.contiguous()


def bilinear_gram(maps: Tensor, out_size: tuple[int, int]) -> Tensor:
    """Inner products of the maps *after* bilinear upsampling to ``out_size``, computed on the patch grid.

    Args:
        maps: (B, K, h, w) maps.
        out_size: (H, W).

    Returns:
        (B, K, K) float64 Gram matrices on the CPU, equal to those of ``upsample_maps(maps, out_size)``
        flattened.
    """
    x = maps.detach().to("cpu", torch.float64)  # (B, K, h, w)
    h, w = x.shape[-2:]
    up_h = upsample_matrix(h, out_size[0])  # (H, h)
    up_w = upsample_matrix(w, out_size[1])  # (W, w)
    metric_h = up_h.T @ up_h  # (h, h)
    metric_w = up_w.T @ up_w  # (w, w)
    y = metric_h @ x @ metric_w  # (B, K, h, w)
    return torch.einsum("bihw,bjhw->bij", x, y)


def _distances_to_points(gram: Tensor, sq_norms: Tensor, idx: Tensor) -> Tensor:
    """Squared distances of all points to point ``idx``: gram (B, R, K, K), sq_norms (B, R, K), idx (B, R)."""
    B, R, K, _ = gram.shape
    cross = gram.gather(-1, idx[:, :, None, None].expand(B, R, K, 1)).squeeze(-1)  # (B, R, K)
    return (sq_norms + sq_norms.gather(-1, idx[..., None]) - 2 * cross).clamp_min(0)


def _distances_to_means(gram: Tensor, sq_norms: Tensor, assign: Tensor, kmax: int, valid: Tensor) -> Tensor:
    """Squared distances (B, R, K, kmax) to the member means of ``assign``; padded/empty clusters are inf."""
    members = F.one_hot(assign, kmax).to(gram.dtype)  # (B, R, K, kmax)
    counts = members.sum(dim=-2)  # (B, R, kmax)
    sums = gram @ members  # (B, R, K, kmax): sum over members m of <x_i, x_m>
    within = (members * sums).sum(dim=-2)  # (B, R, kmax): sum over member pairs of <x_m, x_l>
    safe = counts.clamp_min(1)
    dist = sq_norms[..., None] - 2 * sums / safe[:, :, None, :] + (within / safe**2)[:, :, None, :]
    unusable = ~valid[:, :, None, :] | (counts == 0)[:, :, None, :]
    return dist.masked_fill(unusable, torch.inf)


def _reseed_empty(assign: Tensor, dist: Tensor, valid: Tensor, kmax: int) -> Tensor:
    """Give each empty real cluster the point farthest from its own centre among clusters of two or more."""
    own = dist.gather(-1, assign[..., None]).squeeze(-1)  # (B, R, K)
    point_ids = torch.arange(assign.shape[-1], device=assign.device)
    for j in range(kmax):
        counts = F.one_hot(assign, kmax).sum(dim=-2)  # (B, R, kmax)
        empty = (counts[..., j] == 0) & valid[..., j]  # (B, R)
        if not empty.any():
            continue
        movable = counts.gather(-1, assign) > 1  # (B, R, K)
        farthest = torch.where(movable, own, -torch.inf).argmax(dim=-1)  # (B, R)
        moved = empty[..., None] & (point_ids == farthest[..., None])  # (B, R, K)
        assign = torch.where(moved, j, assign)
        own = torch.where(moved, -1.0, own)
    return assign


def kmeans_gram(
    gram: Tensor, k: Tensor, *, n_init: int = 10, max_iter: int = 100, seed: int = 24
) -> tuple[Tensor, Tensor]:
    """k-means of K points per image given only their Gram matrix, with a different k per image.

    Greedy k-means++ initialisation (each next centre is the best, by resulting potential, of ``2 + ln k``
    candidates drawn with probability proportional to the squared distance to the nearest chosen centre, as in
    scikit-learn), then Lloyd iterations until no assignment changes; the best of ``n_init`` restarts by
    inertia. The uniforms come from ``torch.Generator().manual_seed(seed)`` and are shared by all images, laid
    out by centre index, restart and trial, so they do not depend on the batch, its largest k or an image's
    position.

    Args:
        gram: (B, K, K) inner products of the points.
        k: (B,) clusters per image, each in [1, K].
        n_init: restarts; the one with the lowest inertia is returned.
        max_iter: most Lloyd iterations per restart.
        seed: seed of the initialisation.

    Returns:
        assign: (B, K) long cluster of each point, in [0, k_b); every cluster is non-empty.
        inertia: (B,) float64 within-cluster sum of squared distances.
    """
    B, K, _ = gram.shape
    gram = gram.to(torch.float64)
    device = gram.device
    k = torch.as_tensor(k, device=device).to(torch.long).reshape(B)
    if B == 0:
        return torch.zeros(0, K, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.float64)
    if bool((k < 1).any()) or bool((k > K).any()):
        raise ValueError(f"every k must be in [1, {K}] (the number of points), got {k.tolist()}")
    kmax = int(k.max())
    R = n_init
    # Greedy k-means++ (as scikit-learn): 2 + floor(ln k) candidates per new centre, keep the one that lowers
    # the potential most. Draws are laid out by (centre index, restart, trial) with the trial count capped by
    # K, so they depend only on K, n_init and the seed.
    max_trials = 2 + int(math.log(K))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    uniforms = torch.rand(K, R, 1 + max_trials, generator=generator, dtype=torch.float64).to(device)
    trials = 2 + torch.floor(torch.log(k.to(torch.float64))).long()  # (B,)
    trial_ok = torch.arange(max_trials, device=device) < trials[:, None]  # (B, max_trials)

    grams = gram[:, None].expand(B, R, K, K)  # (B, R, K, K)
    sq_norms = torch.diagonal(gram, dim1=-2, dim2=-1)[:, None, :].expand(B, R, K)  # (B, R, K)
    valid = (torch.arange(kmax, device=device) < k[:, None])[:, None, :].expand(B, R, kmax)  # (B, R, kmax)

    centres = torch.empty(B, R, kmax, dtype=torch.long, device=device)
    uniform_pick = (uniforms[..., 0] * K).long().clamp(max=K - 1)  # (K, R): first centre, and ties at 0
    centres[..., 0] = uniform_pick[0]
    nearest_sq = _distances_to_points(grams, sq_norms, centres[..., 0])  # (B, R, K)
    for j in range(1, kmax):
        cdf = nearest_sq.cumsum(dim=-1).contiguous()  # (B, R, K)
        total = cdf[..., -1]  # (B, R)
        targets = uniforms[j, :, 1:] * total[..., None]  # (B, R, T): inverse-CDF sampling
        candidates = torch.searchsorted(cdf, targets.contiguous(), right=True).clamp(max=K - 1)  # (B, R, T)
        cand_cross = grams.gather(2, candidates[..., None].expand(B, R, max_trials, K))  # (B, R, T, K)
        cand_sq = (sq_norms[:, :, None, :] + sq_norms.gather(-1, candidates)[..., None] - 2 * cand_cross)
        new_nearest = torch.minimum(nearest_sq[:, :, None, :], cand_sq.clamp_min(0))  # (B, R, T, K)
        potential = new_nearest.sum(dim=-1).masked_fill(~trial_ok[:, None, :], torch.inf)  # (B, R, T)
        best_trial = potential.argmin(dim=-1, keepdim=True)  # (B, R, 1)
        chosen = candidates.gather(-1, best_trial).squeeze(-1)  # (B, R)
        centres[..., j] = torch.where(total > 0, chosen, uniform_pick[j])
        nearest_sq = torch.minimum(nearest_sq, _distances_to_points(grams, sq_norms, centres[..., j]))

    cross = grams.gather(-1, centres[:, :, None, :].expand(B, R, K, kmax))  # (B, R, K, kmax)
    dist = sq_norms[..., None] + sq_norms.gather(-1, centres)[:, :, None, :] - 2 * cross
    dist = dist.masked_fill(~valid[:, :, None, :], torch.inf)
    assign = _reseed_empty(dist.argmin(dim=-1), dist, valid, kmax)  # (B, R, K)

    for _ in range(max_iter):
        dist = _distances_to_means(grams, sq_norms, assign, kmax, valid)
        new_assign = _reseed_empty(dist.argmin(dim=-1), dist, valid, kmax)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign

    dist = _distances_to_means(grams, sq_norms, assign, kmax, valid)
    inertia = dist.gather(-1, assign[..., None]).squeeze(-1).clamp_min(0).sum(dim=-1)  # (B, R)
    best = inertia.argmin(dim=1)  # (B,)
    batch_ids = torch.arange(B, device=device)
    return assign[batch_ids, best], inertia[batch_ids, best]


@dataclass
class TwoMeans:
    """Result of :func:`two_means_1d` per row.

    Attributes:
        threshold: (N,) foreground = ``value >= threshold``; +inf where no split exists.
        foreground_mean: (N,) mean of the foreground values (the higher centre); the row mean where no split
            exists.
        split_found: (N,) bool, False for constant rows.
    """

    threshold: Tensor
    foreground_mean: Tensor
    split_found: Tensor


def _sort_rows(values: Tensor) -> Tensor:
    """Sort each row ascending; on the CPU through numpy, whose SIMD sort is ~4x faster than torch's here."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.sort(values.detach().contiguous().numpy(), axis=-1))
    return values.sort(dim=-1).values


def two_means_1d(values: Tensor) -> TwoMeans:
    """Exact 2-means of each row's values (the global optimum of the within-cluster sum of squares).

    The optimal partition of values on a line is a threshold split of the sorted values. Splitting the ``s``
    smallest from the other ``P - s`` leaves a within-cluster sum of squares of ``sum((v - mean)^2)`` minus
    the between-cluster term ``P / (s (P - s)) * Lc^2``, where ``Lc`` is the sum of the ``s`` smallest
    *centred* values; one prefix sum gives ``Lc`` for every ``s``, so the best split is an arg-max. Only
    splits between distinct values are allowed (equal values cannot be told apart by a threshold). Centring
    keeps the float64 prefix sums well conditioned; rows are processed in chunks to bound the temporaries.

    Args:
        values: (N, P) values.
    """
    N, P = values.shape
    if P < 2:
        mean = values.to(torch.float64).mean(dim=-1) if P else torch.zeros(N, dtype=torch.float64)
        inf = torch.full((N,), torch.inf, dtype=values.dtype, device=values.device)
        return TwoMeans(inf, mean, torch.zeros(N, dtype=torch.bool, device=values.device))
    left_n = torch.arange(1, P, dtype=torch.float64, device=values.device)  # (P-1,): s
    weight = 1.0 / (left_n * (P - left_n))  # (P-1,): the constant factor P is dropped
    thresholds, means, found = [], [], []
    rows_per_chunk = max(1, _TWO_MEANS_CHUNK_ELEMENTS // P)
    for chunk in values.split(rows_per_chunk):
        v = _sort_rows(chunk).to(values.device)  # (n, P)
        v64 = v.to(torch.float64)
        mean = v64.mean(dim=-1)  # (n,)
        left_centred = (v64 - mean[:, None]).cumsum_(dim=-1)[:, :-1]  # (n, P-1): Lc for s = 1..P-1
        between = left_centred.square().mul_(weight)  # (n, P-1)
        distinct = v[:, 1:] > v[:, :-1]  # (n, P-1)
        best = between.masked_fill_(~distinct, -torch.inf).argmax(dim=-1)  # (n,): last index of the low side
        has_split = distinct.any(dim=-1)
        # The high side's centred sum is -Lc (centred values sum to 0).
        fg_mean = mean - left_centred.gather(1, best[:, None]).squeeze(1) / (P - 1 - best).to(torch.float64)
        threshold = v.gather(1, (best + 1)[:, None]).squeeze(1)
        thresholds.append(torch.where(has_split, threshold, torch.full_like(threshold, torch.inf)))
        means.append(torch.where(has_split, fg_mean, mean))
        found.append(has_split)
    return TwoMeans(torch.cat(thresholds), torch.cat(means), torch.cat(found))


def attention_pseudomasks(
    head_maps: Tensor,
    kept: Tensor,
    probs: Tensor,
    label_sets: Tensor,
    out_size: tuple[int, int],
    *,
    seed: int = 24,
    n_init: int = 10,
    max_iter: int = 100,
) -> PseudomaskResult:
    """Pseudomasks of a batch by clustering the kept heads' attention (the sparse ViT paper, section 3).

    Rules per image, with n = size of its label set and K = number of kept heads:

    - n = 0: whole image = the most probable class; ``fallback``, ``no_label_above_threshold``.
    - n = 1: whole image = that class; ``ok``, ``single_label``.
    - K = 0 (n >= 2): whole image = the most probable label; ``fallback``, ``no_heads_kept``.
    - 2 <= K < n: k = K and only the K most probable labels are used; ``fallback``,
      ``fewer_heads_than_labels`` (K = 1 degenerates to the top label everywhere, with the same reason).
    - otherwise k = n; ``ok``, ``clustered``.
    - a cluster whose mean map is constant has no foreground: its class is not painted and
      ``empty_foreground:<class>`` is appended (it still takes part in the rank matching with its constant
      value as strength). If no cluster paints anything: the most probable label everywhere, ``fallback``,
      ``nothing_painted`` appended.

    Args:
        head_maps: (B, heads, h, w) CLS->patch attention of the last block.
        kept: (heads,) bool, heads that survived pruning.
        probs: (B, C) class probabilities (rank matching and fallbacks).
        label_sets: (B, C) bool labels to place: predicted (``probs > 0.5``) or oracle (ground truth).
        out_size: (H, W) of the masks; any aspect ratio.
        seed: k-means++ seed.
        n_init: k-means restarts.
        max_iter: most Lloyd iterations per restart.

    Returns:
        A :class:`PseudomaskResult` with (B, H, W) uint8 masks.
    """
    if head_maps.ndim != 4:
        raise ValueError(f"head_maps must be (B, heads, h, w), got {tuple(head_maps.shape)}")
    B, num_heads = head_maps.shape[:2]
    if kept.shape != (num_heads,):
        raise ValueError(f"kept must be ({num_heads},) for {num_heads} heads, got {tuple(kept.shape)}")
    check_label_inputs(probs, label_sets, B)
    H, W = check_out_size(out_size)
    device = head_maps.device
    probs = probs.detach().to(device, torch.float32)
    label_sets = label_sets.to(device)
    kept = kept.to(device, torch.bool)
    num_kept = int(kept.sum())

    n_labels = label_sets.sum(dim=1)  # (B,)
    k = n_labels.clamp(max=num_kept)  # (B,)
    # With fewer heads than labels only the k most probable labels can be placed.
    ranked = sort_labels_by_probability(probs, label_sets)  # (B, C)
    keep_rank = torch.arange(probs.shape[1], device=device) < k[:, None]  # (B, C)
    used = torch.zeros_like(label_sets).scatter(1, ranked, keep_rank) & label_sets  # (B, C)
    first = top_class(probs, label_sets)  # (B,): most probable label, or class when there is none
    used[n_labels == 0] = F.one_hot(first[n_labels == 0], probs.shape[1]).bool()
    masks = constant_masks(first, (H, W))  # (B, H, W); overwritten for clustered images

    status, reason, clustered = [], [], []
    for b, (n, kb) in enumerate(zip(n_labels.tolist(), k.tolist(), strict=True)):
        if n == 0:
            rule = (STATUS_FALLBACK, REASON_NO_LABEL)
        elif n == 1:
            rule = (STATUS_OK, REASON_SINGLE_LABEL)
        elif num_kept == 0:
            rule = (STATUS_FALLBACK, REASON_NO_HEADS)
        elif kb < n:
            rule = (STATUS_FALLBACK, REASON_FEWER_HEADS)
        else:
            rule = (STATUS_OK, REASON_CLUSTERED)
        status.append(rule[0])
        reason.append(rule[1])
        if kb >= 2:
            clustered.append(b)
        elif n >= 2:
            used[b] = F.one_hot(first[b], probs.shape[1]).bool()  # one head or none: top label everywhere

    if clustered:
        index = torch.tensor(clustered, device=device)
        painted, empty_classes = _cluster_and_paint(
            head_maps[index][:, kept], probs[index], used[index], k[index], (H, W), seed, n_init, max_iter
        )
        has_paint = (painted >= 0).reshape(len(clustered), -1).any(axis=1)  # (Bc,)
        filled = nearest_fill(painted[has_paint])
        masks[np.asarray(clustered)[has_paint]] = filled.astype(np.uint8)
        for i, b in enumerate(clustered):
            tokens = [f"{REASON_EMPTY_FOREGROUND}:{c}" for c in empty_classes[i]]
            if not has_paint[i]:
                tokens.append(REASON_NOTHING_PAINTED)
                status[b] = STATUS_FALLBACK
            reason[b] = ";".join([reason[b], *tokens])

    return PseudomaskResult(masks, status, reason, used.cpu().numpy())


def _cluster_and_paint(
    maps: Tensor,
    probs: Tensor,
    used: Tensor,
    k: Tensor,
    out_size: tuple[int, int],
    seed: int,
    n_init: int,
    max_iter: int,
) -> tuple[np.ndarray, list[list[int]]]:
    """Steps 3-6 for images with k >= 2: returns painted labels (Bc, H, W) int16 (-1 = unpainted) on the CPU
    and, per image, the classes whose cluster had no foreground."""
    Bc, K = maps.shape[:2]
    maps = maps.float()
    peak = maps.amax(dim=(-2, -1), keepdim=True)  # (Bc, K, 1, 1)
    maps = maps / peak.clamp_min(torch.finfo(maps.dtype).tiny)  # max-normalised; an all-zero map stays zero

    gram = bilinear_gram(maps, out_size)  # (Bc, K, K) on the CPU
    assign, _ = kmeans_gram(gram, k.cpu(), n_init=n_init, max_iter=max_iter, seed=seed)  # (Bc, K)
    kmax = int(k.max())
    members = F.one_hot(assign, kmax).to(maps.device, maps.dtype)  # (Bc, K, kmax)
    members = members / members.sum(dim=1, keepdim=True).clamp_min(1)
    cluster_low = torch.einsum("bkj,bkhw->bjhw", members, maps)  # (Bc, kmax, h, w); commutes with resizing
    cluster_maps = upsample_maps(cluster_low, out_size)  # (Bc, kmax, H, W)

    split = two_means_1d(cluster_maps.flatten(2).flatten(0, 1))
    threshold = split.threshold.view(Bc, kmax).to(cluster_maps.dtype)  # (Bc, kmax)
    found = split.split_found.view(Bc, kmax)  # (Bc, kmax)
    real = torch.arange(kmax, device=maps.device) < k.to(maps.device)[:, None]  # (Bc, kmax)
    strength = split.foreground_mean.view(Bc, kmax).masked_fill(~real, -torch.inf)  # (Bc, kmax)

    # Rank matching: the i-th strongest map gets the i-th most probable label.
    order = torch.sort(strength, dim=1, descending=True, stable=True).indices  # (Bc, kmax) cluster ids
    classes = sort_labels_by_probability(probs, used)[:, :kmax]  # (Bc, kmax)
    cluster_class = torch.empty_like(order).scatter_(1, order, classes)  # (Bc, kmax)
    ranks = torch.arange(kmax, device=maps.device).expand(Bc, kmax)
    cluster_rank = torch.empty_like(order).scatter_(1, order, ranks)  # (Bc, kmax), 0 = strongest

    # Painting weakest first == every pixel takes the covering map of best rank.
    paintable = real & found
    priority = torch.where(paintable, kmax - cluster_rank, 0).to(torch.uint8)  # (Bc, kmax)
    foreground = cluster_maps >= threshold[..., None, None]  # (Bc, kmax, H, W)
    score = foreground.to(torch.uint8) * priority[..., None, None]  # (Bc, kmax, H, W)
    best_score, best_cluster = score.max(dim=1)  # (Bc, H, W)
    labels = cluster_class.gather(1, best_cluster.flatten(1)).view_as(best_cluster)  # (Bc, H, W)
    labels = torch.where(best_score > 0, labels, UNASSIGNED)

    empty = (real & ~found).cpu()
    cluster_class = cluster_class.cpu()
    empty_classes = [sorted(cluster_class[i][empty[i]].tolist()) for i in range(Bc)]
    return labels.to("cpu", torch.int16).numpy(), empty_classes


@torch.no_grad()
def relabel_regions(
    images: Tensor,
    masks: np.ndarray | Tensor,
    classify: Callable[[Tensor], Tensor],
    label_sets: Tensor | None = None,
    *,
    fill_value: float = 0.0,
    chunk_size: int = 32,
) -> np.ndarray:
    """Optional step 8 of the paper: give each label region the class the classifier sees in it alone.

    For every (image, class present in its mask) pair the image is kept inside the region and set to
    ``fill_value`` outside (the original zeroes it; with normalised inputs 0 is the channel mean, still an
    out-of-distribution image -- defect 13), ``classify`` scores it, and the region becomes the arg-max class.
    Unlike the original, the arg-max is restricted to the image's label set when ``label_sets`` is given (and
    non-empty for that image), so re-labelling cannot invent a class the image-level prediction rejected.

    Args:
        images: (B, C_in, H, W) classifier inputs, same H, W as the masks.
        masks: (B, H, W) class ids (no ignore value).
        classify: maps a (N, C_in, H, W) batch to (N, C) scores (logits or probabilities; only the arg-max is
            used).
        label_sets: optional (B, C) bool classes allowed per image.
        fill_value: input value outside the region.
        chunk_size: regions per ``classify`` call.

    Returns:
        (B, H, W) uint8 re-labelled masks; regions that take the same class merge.
    """
    mask_t = torch.as_tensor(np.asarray(masks)).to(images.device, torch.long)  # (B, H, W)
    if mask_t.ndim != 3 or mask_t.shape[0] != images.shape[0] or mask_t.shape[1:] != images.shape[2:]:
        raise ValueError(f"masks {tuple(mask_t.shape)} do not match images {tuple(images.shape)}")
    B = mask_t.shape[0]
    num_ids = int(mask_t.max()) + 1 if mask_t.numel() else 1
    present = torch.zeros(B, num_ids, dtype=torch.bool, device=images.device)
    present.scatter_(1, mask_t.flatten(1), True)  # (B, num_ids)
    new_class = torch.arange(num_ids, device=images.device).repeat(B, 1)  # (B, num_ids) lookup table
    for pairs in present.nonzero().split(chunk_size):  # (n, 2): image, class
        image_ids, class_ids = pairs.unbind(1)
        region = mask_t[image_ids] == class_ids[:, None, None]  # (n, H, W)
        selected = images[image_ids]  # (n, C_in, H, W)
        inputs = torch.where(region[:, None], selected, torch.full_like(selected, fill_value))
        scores = classify(inputs).float()  # (n, C)
        if label_sets is not None:
            allowed = label_sets.to(images.device)[image_ids]  # (n, C)
            allowed = allowed | ~allowed.any(dim=1, keepdim=True)
            scores = scores.masked_fill(~allowed, -torch.inf)
        new_class[image_ids, class_ids] = scores.argmax(dim=1)
    relabelled = new_class.gather(1, mask_t.flatten(1)).view_as(mask_t)
    return relabelled.to("cpu", torch.uint8).numpy()
