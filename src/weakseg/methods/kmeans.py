"""Exact, batched k-means for attention clustering (:mod:`weakseg.methods.attention_clustering`).

The sparse ViT paper (Hanna, Mommert and Borth, CVPRW 2023, ``sparse_vit.md`` section 3) clusters each image's
head maps with scikit-learn's k-means and splits each cluster map with a 1-D 2-means, one image at a time. Here
both run for a whole batch at once, exactly:

- **k-means on Gram matrices, at patch resolution.** Bilinear upsampling is linear and separable
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: Rows x pixels per chunk of the 1-D 2-means (bounds its float64 temporaries to a few tens of MB).
_TWO_MEANS_CHUNK_ELEMENTS = 1 << 22


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
