"""Hard Concrete head gates and their L0 penalty.

Louizos, Welling and Kingma, "Learning Sparse Neural Networks through L0 Regularization", ICLR 2018; applied to
attention heads by Voita et al., "Analyzing Multi-Head Self-Attention", ACL 2019, and to ViT heads for WSSS by
Hanna, Mommert and Borth, "Sparse Multimodal Vision Transformer for Weakly Supervised Semantic Segmentation",
CVPRW 2023. Values follow the sparse ViT reference (``sparse_vit.md`` 1.2-1.3): temperature 0.33, stretch
(-0.1, 1.1), hard straight-through samples in training, and the deterministic gate ``1[log_alpha > 0]`` at
evaluation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class HardConcreteGate(nn.Module):
    """One gate per attention head.

    In training, each forward draws one sample per head (shared by the whole batch, as in the reference) and
    returns its hard value 0/1 with the straight-through gradient of the stretched, clamped relaxation. In eval
    mode the gate is deterministic: a head is open iff ``log_alpha > 0``.

    Args:
        num_heads: number of gates.
        temperature: beta of the concrete distribution.
        stretch: (l, r) interval the relaxed sample is stretched to before clamping to [0, 1].
        eps: keeps the uniform noise away from 0 and 1.
        hard: straight-through hard samples in training (the reference's setting); False gives soft samples.
        init: None draws log alpha Xavier-uniform like the reference (about half the heads start closed);
            a number starts every gate at that log alpha (ours: e.g. 2.0 starts 88 % open, so a short run
            learns with the heads first and the L0 penalty then closes the ones the task does not need).
    """

    def __init__(
        self,
        num_heads: int,
        temperature: float = 0.33,
        stretch: tuple[float, float] = (-0.1, 1.1),
        eps: float = 1e-6,
        hard: bool = True,
        init: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.temperature = temperature
        self.low, self.high = stretch
        self.eps = eps
        self.hard = hard
        self.init = init
        # (1, heads, 1, 1) like the reference, so it broadcasts over (B, heads, N, N) and (B, heads, N, hd).
        self.log_alpha = nn.Parameter(torch.empty(1, num_heads, 1, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init is not None:
            nn.init.constant_(self.log_alpha, self.init)
            return
        # Xavier-uniform on (1, H, 1, 1): fan_in = H, fan_out = 1 -> U(-sqrt(6/(H+1)), +sqrt(6/(H+1))).
        nn.init.xavier_uniform_(self.log_alpha)

    def forward(self) -> Tensor:
        """Gate values, shape (1, heads, 1, 1)."""
        if not self.training:
            # clamp(1.2 * sigmoid(log_alpha) - 0.1, 0, 1) > 0.5  <=>  log_alpha > 0. Computed as the comparison
            # itself: through the sigmoid, rounding disagrees with is_open() for |log_alpha| below ~3e-8.
            return (self.log_alpha > 0).to(self.log_alpha.dtype)
        u = torch.rand_like(self.log_alpha).clamp(self.eps, 1 - self.eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        z = (s * (self.high - self.low) + self.low).clamp(0.0, 1.0)
        if self.hard:
            # Straight-through: forward value is hard (exactly 0/1), gradient is that of z (zero once clamped).
            z = (z - z.detach()) + (z > 0.5).to(z.dtype)
        return z

    def open_probability(self) -> Tensor:
        """P(gate != 0) = sigmoid(log_alpha - beta * log(-l / r)), shape (heads,); the L0 penalty per head."""
        shift = self.temperature * math.log(-self.low / self.high)
        return torch.sigmoid(self.log_alpha.flatten() - shift).clamp(self.eps, 1 - self.eps)

    def is_open(self) -> Tensor:
        """Deterministic (eval) state per head, bool (heads,): True iff log_alpha > 0."""
        return self.log_alpha.detach().flatten() > 0

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, temperature={self.temperature}, stretch=({self.low}, {self.high})"


def l0_penalty(gates: list[HardConcreteGate], normalize: bool = False) -> Tensor:
    """Expected number of open gates.

    Args:
        gates: the gates of every gated attention layer.
        normalize: False gives the paper's sum over all heads of all layers (about 132 for 12 x 16 gates at
            init, which dominates the BCE about 40x at lambda 0.2); True divides by the number of heads, so the
            penalty lies in (0, 1) and lambda means the same for every model size. Normalisation is a weakseg
            addition, not in the paper.
    """
    if not gates:
        raise ValueError("l0_penalty needs at least one gate; the model was built without gates")
    probs = torch.cat([g.open_probability() for g in gates])
    return probs.mean() if normalize else probs.sum()


# ---- target pruned fraction: gradual pruning of the lowest gates ----------------------------------------------------
# The paper's lambda * L0 fixes a price per open head, not a number of heads, so what it prunes depends on the data, the
# model size and the run length, and with the reference's Xavier init the eval rule log_alpha > 0 "prunes" about half
# of the heads before any training. With a target the number is fixed instead, and the gates only decide *which* heads:
# they start open, learn from the task alone (straight-through gradients), and after every optimiser step the
# round(t * N) heads of lowest log alpha are closed, t ramping linearly from 0 to the target (the schedule of gradual
# magnitude pruning, Zhu and Gupta, "To prune, or not to prune", 2017; the rank decides as in the deterministic masks
# of Xia, Zhong and Chen, "Structured Pruning Learns Compact and Accurate Models" (CoFi), ACL 2022). README "Pruning"
# compares it with a Lagrangian controller on the expected pruned fraction (Wang, Wohlwend and Lei, EMNLP 2020; CoFi),
# which oscillated in 100-step runs.


def ramped_target(step: int, total_steps: int, target: float, warmup_fraction: float) -> float:
    """Target pruned fraction after optimiser step ``step``: linear from 0 to ``target`` over the first
    ``warmup_fraction`` of ``total_steps``, then ``target``. Measured in fractions of the run, so a 100-step and a
    10,000-step run follow the same schedule."""
    ramp = warmup_fraction * total_steps
    if ramp <= 0:
        return float(target)
    return float(target) * min(1.0, max(0.0, step / ramp))


def heads_to_close(fraction: float, num_heads: int) -> int:
    """``fraction * num_heads`` rounded to the nearest integer (halves up), within [0, num_heads]."""
    return min(num_heads, max(0, math.floor(fraction * num_heads + 0.5)))


@torch.no_grad()
def close_lowest_heads(
    gates: list[HardConcreteGate],
    num_closed: int,
    closed_log_alpha: float = -3.0,
    open_log_alpha: float = 0.01,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Make exactly ``num_closed`` heads closed: those of lowest log alpha over all gates. In place.

    Closed heads get ``log_alpha <- min(log_alpha, closed_log_alpha)``, the others
    ``log_alpha <- max(log_alpha, open_log_alpha)``; a head already on its side keeps its value, so the task's
    ranking of the open heads is not overwritten. ``closed_log_alpha`` -3 opens a closed head in 5 % of the training
    steps (sigmoid(-3)), close to what the evaluation does (never) while it still gets gradients. Equal log alphas (all
    gates start at the same value) are ordered at random (``generator``, default torch's seeded one), not by layer.

    Returns:
        bool (total heads,), True = closed, in the order of ``gates`` and their heads.
    """
    if not gates:
        raise ValueError("close_lowest_heads needs at least one gate; the model was built without gates")
    alphas = torch.cat([g.log_alpha.flatten() for g in gates])  # (N,)
    n = alphas.numel()
    if not 0 <= num_closed <= n:
        raise ValueError(f"num_closed must be in [0, {n}], got {num_closed}")
    shuffle = torch.randperm(n, generator=generator).to(alphas.device)  # random order among ties
    order = shuffle[torch.argsort(alphas[shuffle], stable=True)]  # ascending log alpha
    closed = torch.zeros(n, dtype=torch.bool, device=alphas.device)
    closed[order[:num_closed]] = True
    new = torch.where(closed, alphas.clamp(max=closed_log_alpha), alphas.clamp(min=open_log_alpha))
    start = 0
    for g in gates:
        size = g.log_alpha.numel()
        g.log_alpha.copy_(new[start : start + size].view_as(g.log_alpha))
        start += size
    return closed
