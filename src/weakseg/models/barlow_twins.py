"""Barlow Twins projector (Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
ICML 2021; ``ssl_vit.md`` section 1).

The backbone's pooled feature (the CLS token after the final norm, ``GatedViT.forward_head(pre_logits=True)``:
never the classifier logits, which RecvisProject fed to its projector) goes through
``Linear(D, P, bias=False)`` then twice ``BatchNorm1d -> ReLU -> Linear(P, P, bias=False)``, without a final
BatchNorm: the loss standardises its input itself (:func:`weakseg.tasks.pretraining.barlow_twins_loss`).
The reference uses P = 8192 on a ResNet-50; RecvisProject 512 on ViT-S. weakseg's default is 512 (a small CPU
ViT of width 96), with lambda scaled as :func:`default_lambda`.
"""

from __future__ import annotations

from torch import Tensor, nn

#: Projector width and the off-diagonal weight at that width (RecvisProject's 512 and 5e-3).
DEFAULT_PROJECTOR_DIM = 512
REFERENCE_LAMBDA = 5e-3


def default_lambda(projector_dim: int) -> float:
    """lambda for a projector of width P: 5e-3 x 512 / P.

    The off-diagonal term sums P (P - 1) entries against P diagonal ones, so its weight shrinks as 1 / P to keep
    the balance of the two terms (the reference's 0.0051 at P = 8192 is the same order as 5e-3 at 512 with a
    much larger batch; RecvisProject kept 5e-3 at 512 and 1024). A user who sets ``--lambd`` overrides it.
    """
    return REFERENCE_LAMBDA * DEFAULT_PROJECTOR_DIM / int(projector_dim)


class Projector(nn.Module):
    """(B, D) backbone features -> (B, P) embeddings: Linear, then ``layers - 1`` x [BN, ReLU, Linear]."""

    def __init__(self, in_dim: int, dim: int = DEFAULT_PROJECTOR_DIM, layers: int = 3) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"projector needs at least one layer, got {layers}")
        blocks: list[nn.Module] = [nn.Linear(in_dim, dim, bias=False)]
        for _ in range(layers - 1):
            blocks += [nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim, bias=False)]
        self.net = nn.Sequential(*blocks)
        self.out_dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, D) -> (B, P)
