import math

import pytest
import torch

from weakseg.models.hard_concrete import (
    HardConcreteGate,
    close_lowest_heads,
    heads_to_close,
    l0_penalty,
    ramped_target,
)


def test_init_range_is_xavier_uniform():
    gate = HardConcreteGate(16)
    bound = math.sqrt(6 / 17)  # fan_in 16, fan_out 1
    assert gate.log_alpha.shape == (1, 16, 1, 1)
    assert gate.log_alpha.abs().max() <= bound + 1e-6


def test_eval_gate_is_indicator_of_positive_log_alpha():
    gate = HardConcreteGate(4).eval()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-1.0, -1e-3, 1e-3, 2.0]).view(1, 4, 1, 1))
    assert gate().flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    assert gate.is_open().tolist() == [False, False, True, True]


def test_training_samples_are_hard_with_open_rate_sigmoid_log_alpha():
    torch.manual_seed(0)
    gate = HardConcreteGate(3).train()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-1.0, 0.0, 1.5]).view(1, 3, 1, 1))
    samples = torch.stack([gate().detach().flatten() for _ in range(4000)])
    assert set(samples.unique().tolist()) <= {0.0, 1.0}
    # P(z > 0.5) = P(s > 0.5) = sigmoid(log_alpha), independent of the temperature.
    expected = torch.sigmoid(torch.tensor([-1.0, 0.0, 1.5]))
    assert torch.allclose(samples.mean(0), expected, atol=0.03)


def test_straight_through_gradient_reaches_log_alpha():
    torch.manual_seed(1)
    gate = HardConcreteGate(8).train()
    grads = torch.zeros(8)
    for _ in range(50):
        gate.zero_grad()
        gate().sum().backward()
        grads += gate.log_alpha.grad.flatten().abs()
    assert (grads > 0).all()


def test_open_probability_matches_formula_and_penalty_sums_or_averages():
    gates = [HardConcreteGate(4), HardConcreteGate(4)]
    for g in gates:
        torch.nn.init.zeros_(g.log_alpha)
    # sigmoid(0 - 0.33 * log(0.1 / 1.1)) = sigmoid(0.7913) = 0.6881
    p = torch.sigmoid(torch.tensor(-0.33 * math.log(0.1 / 1.1)))
    assert abs(p.item() - 0.6881) < 1e-3
    assert torch.allclose(l0_penalty(gates), 8 * p)
    assert torch.allclose(l0_penalty(gates, normalize=True), p)
    with pytest.raises(ValueError, match="without gates"):
        l0_penalty([])


# ---- numeric properties a plausible mutation breaks (issue 7) ---------------------------------------------
LOG_ALPHA = torch.tensor([-1.5, -0.2, 0.4, 2.0])


def gate_with(log_alpha: torch.Tensor, **kwargs) -> HardConcreteGate:
    gate = HardConcreteGate(len(log_alpha), **kwargs)
    with torch.no_grad():
        gate.log_alpha.copy_(log_alpha.view(1, -1, 1, 1))
    return gate


def test_open_probability_per_head_is_sigmoid_of_log_alpha_plus_0_7913() -> None:
    """Non-zero log alphas: a sign error on log alpha or on the shift cannot hide behind sigmoid(0)."""
    gate = gate_with(LOG_ALPHA)
    expected = [1 / (1 + math.exp(-(a + 0.7913))) for a in LOG_ALPHA.tolist()]
    assert gate.open_probability().tolist() == pytest.approx(expected, abs=1e-4)
    other = gate_with(torch.tensor([0.5, -3.0]))
    both = l0_penalty([gate, other])
    extra = [1 / (1 + math.exp(-(a + 0.7913))) for a in (0.5, -3.0)]
    assert both.item() == pytest.approx(sum(expected) + sum(extra), abs=1e-4)
    assert l0_penalty([gate, other], normalize=True).item() == pytest.approx((sum(expected) + sum(extra)) / 6,
                                                                               abs=1e-5)


def test_open_probability_is_the_rate_of_non_zero_soft_training_samples() -> None:
    """The L0 term must be P(z != 0) of the very sampler the gates use (temperature and stretch included)."""
    torch.manual_seed(0)
    gate = gate_with(LOG_ALPHA, hard=False).train()
    samples = torch.stack([gate().detach().flatten() for _ in range(6000)])  # (6000, heads)
    assert ((samples >= 0) & (samples <= 1)).all()
    assert (samples == 0).any() and (samples == 1).any()  # the stretch lets samples reach exactly 0 and 1
    torch.testing.assert_close(((samples > 0).double().mean(0)).float(), gate.open_probability().detach(),
                               rtol=0, atol=0.02)
    # the other end: z == 1 iff s >= (1 - l) / (r - l), so P(z == 1) = sigmoid(log_alpha - beta log(11))
    at_one = torch.sigmoid(LOG_ALPHA - 0.33 * math.log((1 - (-0.1)) / (1.1 - 1)))
    torch.testing.assert_close((samples == 1).float().mean(0), at_one, rtol=0, atol=0.02)


def test_straight_through_gradient_is_that_of_the_stretched_relaxation() -> None:
    gate = gate_with(LOG_ALPHA).train()
    torch.manual_seed(3)
    z = gate()
    z.sum().backward()
    torch.manual_seed(3)  # the same uniform draw, by hand
    u = torch.rand_like(gate.log_alpha).clamp(1e-6, 1 - 1e-6)
    la = gate.log_alpha.detach().clone().requires_grad_()
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / 0.33)
    soft = (s * 1.2 - 0.1).clamp(0, 1)
    soft.sum().backward()
    assert torch.equal(z.detach(), (soft.detach() > 0.5).float())  # forward: the hard value
    torch.testing.assert_close(gate.log_alpha.grad, la.grad)  # backward: the relaxation's gradient


def test_a_gate_at_exactly_zero_is_closed() -> None:
    """``log_alpha > 0`` keeps a head, so 0 itself is pruned: in is_open() and in the float32 eval gate."""
    gate = gate_with(torch.tensor([0.0, 0.0])).eval()
    assert gate.is_open().tolist() == [False, False]
    assert gate().flatten().tolist() == [0.0, 0.0]
    assert gate_with(torch.tensor([0.0]), init=0.0).is_open().tolist() == [False]  # --gate_init 0


# ---- target pruned fraction (issue 8): the ramp, the count and the rank rule, by hand ---------------------------
def test_target_ramps_linearly_over_its_fraction_of_the_run_then_stays() -> None:
    # 100 steps, target 0.5 reached at half of the run: +0.01 per step, then flat.
    assert [ramped_target(s, 100, 0.5, 0.5) for s in (0, 1, 25, 49, 50, 80, 100)] == pytest.approx(
        [0.0, 0.01, 0.25, 0.49, 0.5, 0.5, 0.5])
    # the same schedule in fractions of a 1,000-step run
    assert [ramped_target(s, 1000, 0.5, 0.5) for s in (10, 250, 500)] == pytest.approx([0.01, 0.25, 0.5])
    assert ramped_target(0, 100, 0.3, 0.0) == 0.3  # no warm-up: the target from the start


def test_heads_to_close_rounds_to_the_nearest_count_halves_up() -> None:
    assert [heads_to_close(f, 24) for f in (0.0, 0.02, 1 / 48, 0.25, 0.5, 0.99)] == [0, 0, 1, 6, 12, 24]
    assert heads_to_close(0.35, 20) == 7  # 0.35 * 20 = 7.000000000000001


def _gates(*values: list[float]) -> list[HardConcreteGate]:
    return [gate_with(torch.tensor(v)) for v in values]


def test_close_lowest_heads_closes_exactly_the_lowest_and_keeps_the_rest_where_they_are() -> None:
    gates = _gates([2.0, -0.5, 0.3], [1.0, 0.05, -4.0])
    closed = close_lowest_heads(gates, 3)
    # lowest three: -4.0 (gate 1), -0.5 (gate 0), 0.05 (gate 1); closed heads go to min(a, -3), open ones stay.
    assert closed.tolist() == [False, True, False, False, True, True]
    assert gates[0].log_alpha.flatten().tolist() == pytest.approx([2.0, -3.0, 0.3])
    assert gates[1].log_alpha.flatten().tolist() == pytest.approx([1.0, -3.0, -4.0])
    assert sum(int((~g.is_open()).sum()) for g in gates) == 3  # the eval rule counts the same heads


def test_close_lowest_heads_reopens_heads_beyond_the_count() -> None:
    gates = _gates([2.0, -0.5, 0.3], [1.0, 0.05, -2.0])
    closed = close_lowest_heads(gates, 1, closed_log_alpha=-1.0, open_log_alpha=0.01)
    assert closed.tolist() == [False, False, False, False, False, True]
    assert gates[0].log_alpha.flatten().tolist() == pytest.approx([2.0, 0.01, 0.3])  # -0.5 is reopened just above 0
    assert gates[1].log_alpha.flatten().tolist() == pytest.approx([1.0, 0.05, -2.0])  # already below -1: kept
    assert [g.is_open().tolist() for g in gates] == [[True, True, True], [True, True, False]]


def test_equal_gates_are_closed_in_a_random_order_not_by_layer() -> None:
    """All gates start at the same log alpha: the first heads to close must not be those of the first layers."""
    picks = []
    for seed in range(8):
        gates = _gates(*[[3.0] * 6 for _ in range(4)])
        closed = close_lowest_heads(gates, 6, generator=torch.Generator().manual_seed(seed))
        assert int(closed.sum()) == 6
        picks.append(tuple(closed.nonzero().flatten().tolist()))
    assert len(set(picks)) > 1  # the draw decides
    assert picks.count(tuple(range(6))) < len(picks)  # not always layer 0
    again = close_lowest_heads(_gates(*[[3.0] * 6 for _ in range(4)]), 6, generator=torch.Generator().manual_seed(0))
    assert tuple(again.nonzero().flatten().tolist()) == picks[0]  # reproducible with the seed


def test_close_lowest_heads_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match="num_closed"):
        close_lowest_heads(_gates([1.0, 2.0]), 3)
    with pytest.raises(ValueError, match="without gates"):
        close_lowest_heads([], 0)
