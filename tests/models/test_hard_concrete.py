import math

import pytest
import torch

from weakseg.models.hard_concrete import HardConcreteGate, l0_penalty


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
