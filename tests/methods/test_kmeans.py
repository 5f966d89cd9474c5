"""Tests of the exact batched k-means on Gram matrices and the exact 1-D 2-means (weakseg.methods.kmeans)."""

from __future__ import annotations

import itertools

import pytest
import torch

from weakseg.masks import upsample_maps
from weakseg.methods.kmeans import bilinear_gram, kmeans_gram, two_means_1d


def random_maps(batch: int, seed: int = 0) -> torch.Tensor:
    """(batch, 6, 5, 7) peaky maps, like attention of six heads on a 5 x 7 grid."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 6, 5, 7, generator=g) ** 4


def test_kmeans_with_different_k_per_image_equals_per_image_runs() -> None:
    maps = random_maps(4, seed=1)
    gram = bilinear_gram(maps, (9, 11))  # (4, 6, 6)
    k = torch.tensor([2, 5, 3, 6])  # up to all six points
    assign, inertia = kmeans_gram(gram, k, seed=5)
    for b in range(4):
        a, i = kmeans_gram(gram[b : b + 1], k[b : b + 1], seed=5)
        torch.testing.assert_close(a[0], assign[b], rtol=0, atol=0)
        torch.testing.assert_close(i[0], inertia[b])
        assert set(assign[b].tolist()) == set(range(int(k[b])))  # every cluster non-empty


def test_kmeans_finds_the_optimal_partition_and_reports_its_inertia() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [6.0, 0.0, 1.0], [0.0, 5.0, -4.0]], dtype=torch.float64)
    points = centres[[0, 1, 2, 0, 1, 2, 0]] + 0.8 * torch.randn(7, 3, generator=g, dtype=torch.float64)
    gram = (points @ points.T)[None]

    def sse(labels: torch.Tensor, k: int) -> torch.Tensor:
        return sum(((points[labels == j] - points[labels == j].mean(0)) ** 2).sum() for j in range(k))

    for k in (2, 3):
        assign, inertia = kmeans_gram(gram, torch.tensor([k]))
        explicit = sse(assign[0], k)
        best = min(sse(torch.tensor(p), k) for p in itertools.product(range(k), repeat=7) if len(set(p)) == k)
        torch.testing.assert_close(inertia[0], explicit)
        torch.testing.assert_close(inertia[0], best)


def test_kmeans_reseeds_empty_clusters_and_rejects_bad_k() -> None:
    gram = torch.ones(1, 3, 3, dtype=torch.float64)  # three identical points
    assign, inertia = kmeans_gram(gram, torch.tensor([3]))
    assert sorted(assign[0].tolist()) == [0, 1, 2] and inertia.item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"every k must be in \[1, 3\]"):
        kmeans_gram(gram, torch.tensor([4]))


def test_gram_at_patch_resolution_equals_gram_of_upsampled_maps() -> None:
    maps = torch.rand(2, 4, 3, 5)
    up = upsample_maps(maps.double(), (7, 16)).flatten(2)  # (2, 4, 112)
    torch.testing.assert_close(bilinear_gram(maps, (7, 16)), up @ up.transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_two_means_is_the_exact_optimum() -> None:
    g = torch.Generator().manual_seed(2)
    values = torch.rand(5, 30, generator=g)
    values[1, :12] = 0.25  # ties
    values[4] = 0.3  # constant
    split = two_means_1d(values)
    for r in range(4):
        v = values[r].double()
        candidates = sorted(set(v.tolist()))[1:]
        sse = [((v[v < t] - v[v < t].mean()) ** 2).sum() + ((v[v >= t] - v[v >= t].mean()) ** 2).sum()
               for t in candidates]
        t_best = candidates[int(torch.stack(sse).argmin())]
        assert split.threshold[r].item() == pytest.approx(t_best)
        assert split.foreground_mean[r].item() == pytest.approx(v[v >= t_best].mean().item())
    assert not split.split_found[4] and split.threshold[4] == torch.inf
    assert split.foreground_mean[4].item() == pytest.approx(0.3)


# ---- model glue and re-labelling ---------------------------------------------------------------------------