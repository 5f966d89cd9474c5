"""Tests of the batched attention-clustering pseudomasks (sparse ViT paper, section 3) and shared helpers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from weakseg.errors import ConfigError
from weakseg.methods.attention_clustering import (
    attention_pseudomasks,
    bilinear_gram,
    head_maps_from_model,
    kmeans_gram,
    relabel_regions,
    two_means_1d,
)
from weakseg.methods.common import (
    PseudomaskResult,
    nearest_fill,
    oracle_label_sets,
    predicted_label_sets,
    upsample_maps,
)
from weakseg.models.vit import build_vit

C = 8


def probs_with(**class_probs: float) -> torch.Tensor:
    """(1, 8) probabilities: 0.1 everywhere except the given ``c<id>=p`` entries."""
    p = torch.full((1, C), 0.1)
    for name, value in class_probs.items():
        p[0, int(name[1:])] = value
    return p


def strong_weak_maps(h: int = 4, w: int = 4, axis: int = 1) -> torch.Tensor:
    """Two heads splitting the image in halves along ``axis`` (1 = columns, 0 = rows).

    Head 0 covers the first half uniformly (foreground mean 1 after max-normalisation); head 1 covers the
    second half with 0.8 and one peak of 1 (foreground mean 0.825), so head 0 is the stronger map.
    """
    maps = torch.zeros(1, 2, h, w)
    if axis == 1:
        maps[0, 0, :, : w // 2] = 1.0
        maps[0, 1, :, w // 2 :] = 0.8
    else:
        maps[0, 0, : h // 2, :] = 1.0
        maps[0, 1, h // 2 :, :] = 0.8
    maps[0, 1, -1, -1] = 1.0
    return maps


def run(maps: torch.Tensor, probs: torch.Tensor, kept: torch.Tensor | None = None, out_size=None, **kw):
    kept = torch.ones(maps.shape[1], dtype=torch.bool) if kept is None else kept
    out_size = tuple(maps.shape[-2:]) if out_size is None else out_size
    return attention_pseudomasks(maps, kept, probs, predicted_label_sets(probs), out_size, **kw)


# ---- the method on hand-made maps --------------------------------------------------------------------------
def test_left_right_split_gives_the_stronger_map_the_more_probable_class() -> None:
    result = run(strong_weak_maps(), probs_with(c5=0.9, c2=0.7))
    expected = np.array([[5, 5, 2, 2]] * 4, dtype=np.uint8)
    np.testing.assert_array_equal(result.masks[0], expected)
    assert result.masks.dtype == np.uint8 and result.masks.shape == (1, 4, 4)
    assert result.status == ["ok"] and result.reason == ["clustered"]
    np.testing.assert_array_equal(np.flatnonzero(result.used_labels[0]), [2, 5])

    swapped = run(strong_weak_maps(), probs_with(c5=0.7, c2=0.9))
    np.testing.assert_array_equal(swapped.masks[0], np.where(expected == 5, 2, 5))


def test_similar_heads_are_clustered_together() -> None:
    base = strong_weak_maps()  # (1, 2, 4, 4)
    noise = torch.tensor([[[0.0, 0.02, 0.0, 0.01]] * 4])  # (1, 4, 4), small perturbation
    maps = torch.cat([base[:, :1], base[:, 1:], base[:, :1] * 0.9 + noise, base[:, 1:] + noise], dim=1)
    result = run(maps, probs_with(c1=0.6, c6=0.95))
    np.testing.assert_array_equal(result.masks[0], np.array([[6, 6, 1, 1]] * 4))


@pytest.mark.parametrize("strong_is_left", [True, False])
def test_overlap_is_won_by_the_stronger_map(strong_is_left: bool) -> None:
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, :, :3] = 1.0  # columns 0-2, uniform: foreground mean 1.0
    maps[0, 1, :, 1:] = 0.5  # columns 1-3 with one peak: foreground mean about 0.54
    maps[0, 1, 0, 3] = 1.0
    if not strong_is_left:  # mirror: the weak map is now on the left
        maps = maps.flip(-1)
    result = run(maps, probs_with(c1=0.95, c6=0.6))
    row = [1, 1, 1, 6] if strong_is_left else [6, 1, 1, 1]
    np.testing.assert_array_equal(result.masks[0], np.array([row] * 4))


@pytest.mark.parametrize("axis", [0, 1])
def test_non_square_output_keeps_height_and_width(axis: int) -> None:
    maps = strong_weak_maps(h=4, w=2, axis=axis)  # (1, 2, 4, 2): non-square grid
    result = run(maps, probs_with(c3=0.9, c7=0.8), out_size=(8, 20))
    mask = result.masks[0]
    assert mask.shape == (8, 20)
    if axis == 0:  # top rows = strong map = class 3
        assert (mask[:3] == 3).all() and (mask[5:] == 7).all()
    else:  # left columns = strong map
        assert (mask[:, :8] == 3).all() and (mask[:, 12:] == 7).all()


def test_label_set_comes_from_the_caller_oracle_mode() -> None:
    probs = probs_with(c5=0.9, c2=0.7)
    oracle = oracle_label_sets(torch.tensor([[0, 0, 0, 1, 0, 0, 0, 1.0]]))  # ground truth {3, 7}
    result = attention_pseudomasks(strong_weak_maps(), torch.ones(2, dtype=torch.bool), probs, oracle, (4, 4))
    assert set(np.unique(result.masks[0])) == {3, 7}
    np.testing.assert_array_equal(np.flatnonzero(result.used_labels[0]), [3, 7])


# ---- failure cases -----------------------------------------------------------------------------------------
def test_no_label_and_single_label() -> None:
    maps = strong_weak_maps().repeat(3, 1, 1, 1)
    probs = torch.cat([probs_with(c3=0.45), probs_with(c4=0.8), probs_with(c0=0.5, c2=0.6)])
    result = run(maps, probs)
    assert (result.masks[0] == 3).all() and (result.masks[1] == 4).all()
    assert (result.masks[2] == 2).all()  # 0.5 is not above the threshold
    assert result.status == ["fallback", "ok", "ok"]
    assert result.reason == ["no_label_above_threshold", "single_label", "single_label"]
    np.testing.assert_array_equal(np.flatnonzero(result.used_labels[0]), [3])


def test_fewer_kept_heads_than_labels_uses_the_top_k_classes() -> None:
    maps = torch.cat([strong_weak_maps(), strong_weak_maps()[:, :1].flip(-1)], dim=1)  # third head pruned
    kept = torch.tensor([True, True, False])
    result = run(maps, probs_with(c0=0.6, c4=0.95, c6=0.8), kept=kept)
    np.testing.assert_array_equal(result.masks[0], np.array([[4, 4, 6, 6]] * 4))
    assert result.status == ["fallback"] and result.reason == ["fewer_heads_than_labels"]
    np.testing.assert_array_equal(np.flatnonzero(result.used_labels[0]), [4, 6])


@pytest.mark.parametrize(
    ("kept", "reason"), [([False, False], "no_heads_kept"), ([True, False], "fewer_heads_than_labels")]
)
def test_no_or_one_kept_head_gives_the_top_label_everywhere(kept: list[bool], reason: str) -> None:
    result = run(strong_weak_maps(), probs_with(c2=0.7, c5=0.9), kept=torch.tensor(kept))
    assert (result.masks == 5).all()
    assert result.status == ["fallback"] and result.reason == [reason]
    np.testing.assert_array_equal(np.flatnonzero(result.used_labels[0]), [5])


def test_constant_cluster_is_not_painted_and_reported() -> None:
    maps = torch.zeros(1, 3, 4, 4)
    maps[0, 0, :, :2] = 0.9
    maps[0, 0, 0, 0] = 1.0  # foreground mean 0.9125
    maps[0, 1] = 1.0  # constant: no foreground, strength 1.0 -> ranked first, gets the top class
    maps[0, 2] = maps[0, 0]
    result = run(maps, probs_with(c7=0.9, c2=0.7))
    assert (result.masks == 2).all()  # class 2 painted on the left, then filled everywhere
    assert result.status == ["ok"] and result.reason == ["clustered;empty_foreground:7"]


def test_nothing_painted_falls_back_to_the_top_label() -> None:
    maps = torch.stack([torch.ones(4, 4), torch.full((4, 4), 0.5)])[None]  # identical after normalisation
    result = run(maps, probs_with(c2=0.7, c7=0.9))
    assert (result.masks == 7).all()
    assert result.status == ["fallback"]
    assert result.reason == ["clustered;empty_foreground:2;empty_foreground:7;nothing_painted"]


def test_bad_output_size_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="pseudomask size"):
        run(strong_weak_maps(), probs_with(c2=0.7, c5=0.9), out_size=(0, 4))


# ---- determinism and batching ------------------------------------------------------------------------------
def random_batch(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(batch, 6, 5, 7, generator=g) ** 4  # peaky, like attention
    probs = torch.rand(batch, C, generator=g) * 0.4
    for b in range(batch):
        labels = torch.randperm(C, generator=g)[: 2 + b % 4]  # 2..5 labels
        probs[b, labels] = 0.55 + 0.4 * torch.rand(len(labels), generator=g)
    return maps, torch.tensor([True, True, False, True, False, True]), probs  # 4 kept heads


def test_seeded_results_are_reproducible_and_independent_of_the_batch() -> None:
    maps, kept, probs = random_batch(6)
    labels = predicted_label_sets(probs)
    batched = attention_pseudomasks(maps, kept, probs, labels, (10, 14), seed=3)
    again = attention_pseudomasks(maps, kept, probs, labels, (10, 14), seed=3)
    np.testing.assert_array_equal(batched.masks, again.masks)
    for b in range(6):
        one = slice(b, b + 1)
        single = attention_pseudomasks(maps[one], kept, probs[one], labels[one], (10, 14), seed=3)
        np.testing.assert_array_equal(single.masks[0], batched.masks[b])
        assert single.reason[0] == batched.reason[b]
    assert batched.reason[3] == "fewer_heads_than_labels"  # 5 labels, 4 kept heads
    assert batched.reason[:3] == ["clustered"] * 3


def test_kmeans_with_different_k_per_image_equals_per_image_runs() -> None:
    maps, _, _ = random_batch(4, seed=1)
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


# ---- nearest fill, label sets, result ----------------------------------------------------------------------
def test_nearest_fill_matches_brute_force_distances() -> None:
    rng = np.random.default_rng(0)
    labels = np.where(rng.random((3, 9, 13)) < 0.15, rng.integers(0, 5, (3, 9, 13)), -1)
    labels[:, 0, 0] = 2  # at least one assigned pixel per image
    filled = nearest_fill(labels)
    for b in range(3):
        have = np.argwhere(labels[b] >= 0)
        np.testing.assert_array_equal(filled[b][labels[b] >= 0], labels[b][labels[b] >= 0])
        for y, x in np.argwhere(labels[b] < 0):
            d = np.hypot(have[:, 0] - y, have[:, 1] - x)
            nearest = {int(labels[b][tuple(p)]) for p in have[np.isclose(d, d.min())]}
            assert filled[b, y, x] in nearest
    with pytest.raises(ValueError, match="no assigned pixel"):
        nearest_fill(np.full((1, 3, 3), -1))


def test_predicted_labels_are_strictly_above_half() -> None:
    probs = torch.tensor([[0.5, 0.5001, 0.2]])
    np.testing.assert_array_equal(predicted_label_sets(probs).numpy(), [[False, True, False]])


def test_result_concatenates_and_counts_reasons() -> None:
    a = run(strong_weak_maps(), probs_with(c5=0.9, c2=0.7))
    b = run(strong_weak_maps(), probs_with(c1=0.2))
    joined = PseudomaskResult.concatenate([a, b])
    assert joined.masks.shape == (2, 4, 4) and len(joined) == 2
    assert joined.reason_counts() == {"clustered": 1, "no_label_above_threshold": 1}
    assert joined.status_counts() == {"fallback": 1, "ok": 1}


# ---- model glue and re-labelling ---------------------------------------------------------------------------
def test_head_maps_from_model_follow_the_contract() -> None:
    torch.manual_seed(0)
    model = build_vit(img_size=(16, 24), patch_size=8, in_chans=3, embed_dim=16, depth=2, num_heads=2)
    with torch.no_grad():
        model.blocks[-1].attn.gate.log_alpha.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
    model.train()
    head_maps, kept, probs = head_maps_from_model(model, torch.randn(3, 3, 16, 24))
    assert model.training  # mode restored
    assert head_maps.shape == (3, 2, 2, 3) and probs.shape == (3, 8)
    assert kept.tolist() == [True, False]
    assert (head_maps[:, 1] == 0).all() and (head_maps[:, 0] > 0).all()
    assert ((probs > 0) & (probs < 1)).all()


def test_relabel_regions_uses_the_classifier_and_the_label_set() -> None:
    images = torch.zeros(1, 1, 4, 4)
    images[0, 0, :, :2] = 1.0
    masks = np.array([[[2, 2, 5, 5]] * 4], dtype=np.uint8)

    def classify(x: torch.Tensor) -> torch.Tensor:  # class 0 if the region is bright, else class 1
        s = x.sum(dim=(1, 2, 3))
        return torch.stack([s, torch.full_like(s, 0.5), torch.zeros_like(s)], dim=1)

    relabelled = relabel_regions(images, masks, classify)
    np.testing.assert_array_equal(relabelled[0], np.array([[0, 0, 1, 1]] * 4))
    restricted = relabel_regions(images, masks, classify, torch.tensor([[False, True, True]]))
    np.testing.assert_array_equal(restricted[0], np.array([[1, 1, 1, 1]] * 4))
    with pytest.raises(ValueError, match="do not match images"):
        relabel_regions(images, masks[:, :3], classify)
