"""Tests of the batched attention-clustering pseudomasks (sparse ViT paper, section 3).

The shared helpers (nearest fill, label sets, upsampling, PseudomaskResult) are tested in tests/masks.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from weakseg.errors import ConfigError
from weakseg.masks import oracle_label_sets, predicted_label_sets
from weakseg.methods.attention_clustering import (
    AttentionClustering,
    HeadClusters,
    assign_by_rank,
    assign_by_scores,
    attention_pseudomasks,
    head_maps_from_model,
    paint_clusters,
    relabel_regions,
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
    # the values: the CLS row of the last block's attention over the patches (not a column, not a patch's row)
    images = torch.randn(3, 3, 16, 24, generator=torch.Generator().manual_seed(4))
    head_maps, _, probs = head_maps_from_model(model, images)
    model.eval()
    out = model.forward_features(images, attention_blocks=[-1])
    torch.testing.assert_close(head_maps, out.attentions[1][:, :, 0, 1:].reshape(3, 2, 2, 3))
    torch.testing.assert_close(head_maps[:, 0].sum(dim=(-2, -1)), 1 - out.attentions[1][:, 0, 0, 0])
    torch.testing.assert_close(probs, model(images).sigmoid())


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


# ---- cluster -> class assignment and painting --------------------------------------------------------------
def hand_clusters(maps: list[list[float]], threshold: list[float], strength: list[float],
                  found: list[bool] | None = None, real: list[bool] | None = None) -> HeadClusters:
    """One image's clusters with (1, H=1, W) maps given row by row (low = maps; no heads)."""
    m = torch.tensor(maps)[None, :, None, :]  # (1, kmax, 1, W)
    kmax = m.shape[1]
    real_t = torch.tensor([real if real is not None else [True] * kmax])
    return HeadClusters(
        low=m, maps=m, members=torch.zeros(1, 0, kmax), threshold=torch.tensor([threshold]),
        found=torch.tensor([found if found is not None else [True] * kmax]),
        strength=torch.tensor([strength]).masked_fill(~real_t, -torch.inf), real=real_t,
    )


def test_assign_by_scores_maximises_the_summed_score_not_greedily() -> None:
    scores = torch.zeros(1, 3, 5)
    scores[0, 0, [1, 3]] = torch.tensor([10.0, 9.0])  # greedy would give cluster 0 class 1 (total 11)
    scores[0, 1, [1, 3]] = torch.tensor([8.0, 1.0])  # the optimum is 0 -> 3, 1 -> 1 (total 17)
    scores[0, :, 0] = 100.0  # class 0 is not a label: never given
    scores[0, 2] = 50.0  # padded cluster: never given a class
    used = torch.tensor([[False, True, False, True, False]])
    real = torch.tensor([[True, True, False]])
    assert assign_by_scores(scores, used, real).tolist() == [[3, 1, -1]]


def test_assign_by_scores_equals_brute_force_over_permutations() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 4, 6, generator=g)
    used = torch.zeros(4, 6, dtype=torch.bool)
    real = torch.zeros(4, 4, dtype=torch.bool)
    for b, labels in enumerate([[0, 5], [1, 2, 4], [0, 1, 2, 3], [2, 3, 5]]):
        used[b, labels] = True
        real[b, : len(labels)] = True
    out = assign_by_scores(scores, used, real)
    for b in range(4):
        labels = used[b].nonzero().flatten().tolist()
        k = len(labels)
        best = max(itertools.permutations(labels),
                   key=lambda p, b=b: sum(scores[b, j, c] for j, c in enumerate(p)))
        assert out[b, :k].tolist() == list(best)
        assert (out[b, k:] == -1).all()


def test_assign_by_rank_gives_the_strongest_cluster_the_most_probable_label() -> None:
    clusters = hand_clusters([[1, 0], [0, 1], [0, 0]], [0.5, 0.5, 0.5], [0.6, 0.9, 5.0],
                             real=[True, True, False])
    probs = probs_with(c2=0.9, c5=0.7, c6=0.99)  # c6 is more probable but not used
    used = torch.zeros(1, C, dtype=torch.bool)
    used[0, [2, 5]] = True
    assert assign_by_rank(clusters, probs, used).tolist() == [[5, 2, -1]]


def test_paint_clusters_strongest_wins_and_reports_regions_and_confidence() -> None:
    clusters = hand_clusters(
        [[1.0, 0.8, 0.0, 0.0, 0.9], [0.0, 0.6, 1.0, 0.2, 0.0], [0.9, 0.9, 0.9, 0.9, 1.0],
         [1.0, 1.0, 1.0, 1.0, 1.0]],
        threshold=[0.5, 0.6, 0.0, float("inf")], strength=[0.9, 0.8, 0.95, 2.0],
        found=[True, True, True, False], real=[True, True, False, True],
    )
    labels, regions, confidence = paint_clusters(clusters, torch.tensor([[4, 1, 7, 3]]))
    # Pixel 1: both real clusters are above threshold, cluster 0 is stronger. Pixel 3: below cluster 1's.
    # The padded cluster 2 and the split-less cluster 3 never paint, however strong.
    np.testing.assert_array_equal(labels, [[[4, 4, 1, -1, 4]]])
    np.testing.assert_array_equal(regions, [[[0, 0, 1, -1, 0]]])
    # (v - threshold) / (max - threshold) of the painting cluster
    np.testing.assert_allclose(confidence, [[[1.0, 0.6, 1.0, 0.0, 0.8]]], atol=1e-6)
    assert labels.dtype == np.int16 and regions.dtype == np.int16 and confidence.dtype == np.float32


def left_right_scorer(prefer: dict[str, int], calls: list | None = None):
    """Cluster j scores its left-half mass for class ``prefer['left']``, its right half for ``'right'``."""

    def score(clusters: HeadClusters, index: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(index.tolist())
        low = clusters.low  # (Bc, kmax, h, w)
        w = low.shape[-1]
        scores = torch.zeros(*low.shape[:2], C)
        scores[..., prefer["left"]] = low[..., : w // 2].sum(dim=(-2, -1))
        scores[..., prefer["right"]] = low[..., w // 2 :].sum(dim=(-2, -1))
        return scores

    return score


def test_a_scorer_overrides_the_rank_assignment_and_regions_are_returned() -> None:
    probs = probs_with(c5=0.9, c2=0.7)
    ranked = run(strong_weak_maps(), probs)
    np.testing.assert_array_equal(ranked.masks[0], [[5, 5, 2, 2]] * 4)  # rank: strong (left) map -> c5
    prefer_flipped = left_right_scorer({"left": 2, "right": 5})
    flipped = run(strong_weak_maps(), probs, assign="gradcam", score_clusters=prefer_flipped)
    np.testing.assert_array_equal(flipped.masks[0], [[2, 2, 5, 5]] * 4)
    assert flipped.status == ["ok"] and flipped.reason == ["clustered"]
    # regions: the painted clusters; region_class: their classes; the mask agrees wherever a region is.
    assert flipped.regions.shape == (1, 4, 4) and flipped.region_class.shape == (1, 2)
    assert sorted(flipped.region_class[0].tolist()) == [2, 5]
    painted = flipped.regions[0] >= 0
    assert painted.any()
    region_of_pixel = flipped.regions[0][painted]
    np.testing.assert_array_equal(flipped.masks[0][painted], flipped.region_class[0][region_of_pixel])
    left_region = flipped.regions[0, 0, 0]
    assert flipped.region_class[0, left_region] == 2
    same = run(strong_weak_maps(), probs, assign="head_gradient",
               score_clusters=left_right_scorer({"left": 5, "right": 2}))
    np.testing.assert_array_equal(same.masks[0], ranked.masks[0])


def test_the_scorer_sees_only_clustered_images_and_score_rules_need_one() -> None:
    maps = strong_weak_maps().repeat(3, 1, 1, 1)
    probs = torch.cat([probs_with(c4=0.8), probs_with(c5=0.9, c2=0.7), probs_with(c1=0.9, c3=0.6)])
    calls: list = []
    res = run(maps, probs, assign="gradcam", score_clusters=left_right_scorer({"left": 2, "right": 5}, calls))
    assert calls == [[1, 2]]  # image 0 has a single label: nothing to assign
    np.testing.assert_array_equal(res.region_class[0], [-1, -1])
    assert (res.regions[0] == -1).all()
    np.testing.assert_array_equal(res.masks[1], [[2, 2, 5, 5]] * 4)
    with pytest.raises(ValueError, match="assign='gradcam' needs score_clusters"):
        run(maps, probs, assign="gradcam")


@pytest.mark.parametrize(
    ("assign", "blocks", "expected"),
    [("rank", "auto", "last"), ("head_gradient", "auto", "all"), ("gradcam", "auto", "all"),
     ("relabel", "auto", "all"), ("rank", "0,-1", "0,-1"), ("gradcam", "last", "last")],
)
def test_blocks_spec_resolves_auto(assign: str, blocks: str, expected: str) -> None:
    assert AttentionClustering(assign=assign, blocks=blocks).blocks_spec() == expected


def test_head_maps_from_model_concatenate_the_requested_blocks() -> None:
    torch.manual_seed(0)
    model = build_vit(img_size=(16, 24), patch_size=8, in_chans=3, embed_dim=12, depth=2, num_heads=2,
                      num_classes=3, num_cls_tokens=3, head_type="per_class", num_register_tokens=1).eval()
    with torch.no_grad():
        model.blocks[0].attn.gate.log_alpha.copy_(torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1))
        model.blocks[1].attn.gate.log_alpha.copy_(torch.tensor([1.0, 1.0]).view(1, 2, 1, 1))
    images = torch.randn(2, 3, 16, 24)
    head_maps, kept, probs = head_maps_from_model(model, images, blocks=[0, 1])
    assert head_maps.shape == (2, 4, 2, 3)
    assert kept.tolist() == [False, True, True, True]
    out = model.forward_features(images, attention_blocks=[0, 1])
    for j, b in enumerate([0, 1]):
        expected = out.attentions[b][:, :, :3, 4:].mean(dim=2).reshape(2, 2, 2, 3)  # mean of the 3 class rows
        torch.testing.assert_close(head_maps[:, 2 * j : 2 * j + 2], expected)
    torch.testing.assert_close(probs, model(images).sigmoid())
    last, kept_last, _ = head_maps_from_model(model, images)  # default: the last block only
    torch.testing.assert_close(last, head_maps[:, 2:])
    assert kept_last.tolist() == [True, True]


@pytest.mark.parametrize("assign", ["rank", "head_gradient", "gradcam", "relabel"])
def test_attention_method_on_a_model_places_distinct_used_labels(assign: str) -> None:
    torch.manual_seed(0)
    model = build_vit(img_size=(16, 16), patch_size=8, in_chans=3, embed_dim=12, depth=2, num_heads=2,
                      num_classes=3, gate_init=1.0).eval()
    images = torch.randn(2, 3, 16, 16)
    probs = torch.tensor([[0.9, 0.2, 0.7], [0.6, 0.8, 0.1]])
    method = AttentionClustering(assign=assign)
    res = method.pseudomasks(model, images, probs, probs > 0.5, (16, 16))
    assert res.masks.shape == (2, 16, 16) and res.reason == ["clustered"] * 2
    for b, labels in enumerate([[0, 2], [0, 1]]):
        assert sorted(res.region_class[b].tolist()) == labels  # two clusters, a distinct label each
        assert set(np.unique(res.masks[b])) <= set(labels)
