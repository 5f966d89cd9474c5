"""ViT-PCM's classifier on the gated ViT: patch-class mapping, softmax per patch, global max pooling.

Rossetti, Zappia, Sanzari, Schaerf and Pirri, "Max Pooling with Vision Transformers Reconciles Class and Shape in
Weakly Supervised Semantic Segmentation", ECCV 2022 (arXiv 2210.17400; code deepplants/ViT-PCM, TensorFlow). All
facts are in ``vit_pcm.md`` sections 1-2. No CAM: every patch is classified, and the image prediction is the
maximum over the patches, so the training signal is itself a segmentation.

Per image, with patch tokens ``z`` (h, w, D) after the final norm (the prefix tokens are dropped):

1. optional **H-V BiLSTM** (``patch_classifier="bilstm"``): dropout 0.2 on the grid; a bidirectional LSTM along
   every row (weights shared across rows) and another along every column, both reading the grid, their outputs
   concatenated: (h, w, 4 * hidden). ViT-B's 768 features -> hidden 192 -> 768; here hidden = D / 4 by default;
2. **patch classifier**: dropout 0.2, then a bias-free ``Linear(F, C)`` with weights drawn from N(0, 0.05^2);
3. **softmax over the C classes per patch** (background included where the dataset has one: VOC's channel 0;
   land cover has no background and every patch is one of the land-cover classes): ``probs`` (C, h, w);
4. **global max pooling** over the patches: ``pooled_c = max_p probs[c, p]`` in [0, 1].

The image-level loss is BCE on ``pooled`` (clipped to [1e-7, 1 - 1e-7]), which is the BCE-with-logits of
``logit(pooled)``: :meth:`PCMViT.forward_head` returns that logit, so the model keeps the backbone contract
(``sigmoid(logits)`` is the image probability) and the task's shared multi-label loss, metrics and checkpoint
selection apply unchanged. The L2 term on the classifier's weights (``0.01 ||W||^2``, added to the loss as the
paper, not AdamW decay) and the equivariance loss are the task's (:mod:`weakseg.tasks.classification`,
:mod:`weakseg.tasks.equivariance`).

**LSTM initialisation.** Keras' LSTM (the original) initialises the input kernel Glorot-uniform, the recurrent
kernel orthogonal and the bias 0 with the forget gate's bias 1; PyTorch's default is uniform(+-1/sqrt(hidden)) for
all. weakseg uses Keras' scheme (per gate block; PyTorch's two biases: ``bias_ih`` holds the forget gate's 1,
``bias_hh`` is 0), and Keras' input dropout (0.2, one mask per sequence for all its time steps) before each LSTM.
The transformer dropout of 0.1 in the original backbone has no counterpart: weakseg's ViT has no dropout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from weakseg.models.vit import BackboneOutput, GatedViT, ViTConfig

#: ``--pcm_head`` choices: the classifier on the patch features alone, or after the H-V BiLSTM.
PATCH_CLASSIFIERS: tuple[str, ...] = ("linear", "bilstm")
#: Probability clip of the BCE on the pooled probabilities (Keras' epsilon), and its bounds as log probabilities.
PROB_EPS = 1e-7
LOG_PROB_MIN, LOG_PROB_MAX = math.log(PROB_EPS), math.log1p(-PROB_EPS)
#: Standard deviation of the classifier's initial weights (``vit_pcm.md`` 1).
CLASSIFIER_INIT_STD = 0.05


def _keras_lstm_init(lstm: nn.LSTM) -> None:
    """Keras' LSTM initialisation (module docstring) for every direction and layer of ``lstm``."""
    H = lstm.hidden_size
    for name, p in lstm.named_parameters():
        with torch.no_grad():
            if name.startswith("weight_ih"):
                for g in range(4):  # the 4 gate blocks (i, f, g, o) as Keras' one (in, 4H) kernel
                    nn.init.xavier_uniform_(p[g * H:(g + 1) * H])
            elif name.startswith("weight_hh"):
                for g in range(4):
                    nn.init.orthogonal_(p[g * H:(g + 1) * H])
            elif name.startswith("bias_ih"):
                p.zero_()
                p[H:2 * H] = 1.0  # forget gate (unit_forget_bias)
            else:
                p.zero_()


class SequenceDropout(nn.Module):
    """Dropout with one mask per sequence for all its time steps, (N, L, D) (Keras' LSTM ``dropout``)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p <= 0:
            return x
        keep = torch.rand(x.shape[0], 1, x.shape[2], device=x.device, dtype=x.dtype) >= self.p  # (N, 1, D)
        return x * keep / (1 - self.p)


class HVBiLSTM(nn.Module):
    """ViT-PCM's horizontal-vertical BiLSTM over a patch grid: (B, h, w, D) -> (B, h, w, 4 * hidden).

    A bidirectional LSTM reads each row left-right and right-left (B * h sequences of length w, weights shared by
    the rows); a second one reads each column (B * w sequences of length h); both read the (dropped-out) grid and
    their outputs are concatenated per patch, so every patch's feature sees its whole row and column.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.hidden = hidden
        self.grid_dropout = nn.Dropout(dropout)
        self.input_dropout = SequenceDropout(dropout)
        self.horizontal = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        self.vertical = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        _keras_lstm_init(self.horizontal)
        _keras_lstm_init(self.vertical)

    def forward(self, grid: Tensor) -> Tensor:
        B, h, w, D = grid.shape
        x = self.grid_dropout(grid)  # (B, h, w, D)
        rows = x.reshape(B * h, w, D)  # one sequence per row
        rows, _ = self.horizontal(self.input_dropout(rows))  # (B*h, w, 2H)
        cols = x.transpose(1, 2).reshape(B * w, h, D)  # one sequence per column
        cols, _ = self.vertical(self.input_dropout(cols))  # (B*w, h, 2H)
        rows = rows.reshape(B, h, w, 2 * self.hidden)
        cols = cols.reshape(B, w, h, 2 * self.hidden).transpose(1, 2)  # back to (B, h, w, 2H)
        return torch.cat([rows, cols], dim=-1)  # (B, h, w, 4H)


class PCMViT(GatedViT):
    """:class:`GatedViT` with ViT-PCM's patch classifier (module docstring); ``cfg.patch_classifier`` is set."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__(cfg)
        assert cfg.patch_classifier in PATCH_CLASSIFIERS  # build_classifier picks this class only then
        D, C = cfg.embed_dim, cfg.num_classes
        self.head = nn.Identity()  # no CLS head: the logits come from the patches
        self.bilstm: HVBiLSTM | None = None
        features = D
        if cfg.patch_classifier == "bilstm":
            hidden = cfg.pcm_lstm_hidden or max(1, D // 4)
            self.bilstm = HVBiLSTM(D, hidden, cfg.pcm_dropout)
            features = 4 * hidden
        self.pcm_dropout = nn.Dropout(cfg.pcm_dropout)
        self.pcm_head = nn.Linear(features, C, bias=False)
        nn.init.normal_(self.pcm_head.weight, std=CLASSIFIER_INIT_STD)

    @property
    def gradcam_layer(self) -> nn.Module:
        """The final norm: its patch outputs are the features the patch classifier reads (no class token
        between), the counterpart of a CNN's last feature map, so Grad-CAM takes its output."""
        return self.norm

    def patch_logits(self, out: BackboneOutput) -> Tensor:
        """Per-patch class scores before the softmax, (B, C, h, w)."""
        B, _, D = out.patches.shape
        grid = out.patches.reshape(B, *out.grid, D)  # (B, h, w, D), row-major patches
        if self.bilstm is not None:
            grid = self.bilstm(grid)  # (B, h, w, 4H)
        return self.pcm_head(self.pcm_dropout(grid)).permute(0, 3, 1, 2)  # (B, C, h, w)

    def patch_probabilities(self, out: BackboneOutput) -> Tensor:
        """Softmax over the classes of every patch, (B, C, h, w); each patch's classes sum to 1."""
        return self.patch_logits(out).softmax(dim=1)

    def forward_head(
        self, out: BackboneOutput, pre_logits: bool = False, drop_class_tokens: Tensor | None = None
    ) -> Tensor:
        """``logit(max_p softmax_p)`` per class, (B, C): sigmoid of it is the globally max-pooled patch
        probability, clipped to [1e-7, 1 - 1e-7] as the original's BCE. ``pre_logits``: the pooled patch
        probabilities themselves (B, C). Class tokens are not read (``drop_class_tokens`` must be None)."""
        if drop_class_tokens is not None:
            raise ValueError("ViT-PCM reads no class token; class-token masking does not apply")
        log_probs = self.patch_logits(out).log_softmax(dim=1)  # (B, C, h, w)
        log_pooled = log_probs.amax(dim=(2, 3))  # (B, C): log of the global max (log is monotone)
        if pre_logits:
            return log_pooled.exp()
        log_pooled = log_pooled.clamp(min=LOG_PROB_MIN, max=LOG_PROB_MAX)
        return log_pooled - torch.log1p(-log_pooled.exp())  # logit(p) = log p - log(1 - p)

    def l2_penalty(self) -> Tensor:
        """``||W||^2`` of the patch classifier's weights (the paper's L2 kernel regulariser, times its 0.01 in the
        task)."""
        return self.pcm_head.weight.pow(2).sum()

    def no_weight_decay(self) -> set[str]:
        """The classifier's weights get the paper's L2 term instead of AdamW's decay (not equivalent)."""
        return super().no_weight_decay() | {"pcm_head.weight"}


def pcm_patch_probabilities(model: GatedViT, images: Tensor) -> Tensor:
    """(B, C, h, w) per-patch probabilities of a ViT-PCM classifier, in whatever mode ``model`` is in."""
    return model.patch_probabilities(model.forward_features(images))  # type: ignore[attr-defined]


__all__ = ["HVBiLSTM", "PATCH_CLASSIFIERS", "PCMViT", "pcm_patch_probabilities"]
