"""Effective receptive fields (ERF) of a ViT, Segmenter or UNet over depth: what ``weakseg erf`` computes.

Luo, Li, Urtasun and Zemel, "Understanding the Effective Receptive Field in Deep Convolutional Neural Networks",
NeurIPS 2016 (arXiv 1701.04128); procedure of reference ``ssl_vit.md`` section 3. The ERF of a layer is
``E_images |d y_centre / d x|``: for each selected layer,

1. a separate pass in eval mode with frozen weights (never the training graph), the input batch ``x`` requiring
   gradients, forward hooks capturing the layers' outputs;
2. a token output (B, P + N, D) loses its P prefix tokens (the model's count) and becomes (B, D, h, w) on the
   input's patch grid; a feature map (B, C, h, w) is used as it is;
3. ``s = mean_b sum_c y[b, c, h // 2, w // 2]`` (the centre unit);
4. ``g = autograd.grad(s, x)``; the batch's map is ``mean_b sum_c |g|`` (H, W) times B (``s`` is a batch mean, so
   ``g`` holds 1/B of each tile's own gradient: rescaled, the map is ``E_b |d y_b / d x_b|`` and does not depend
   on how the tiles are split into batches), averaged over batches (running mean weighted by batch size).

Display: each map min-max normalised (:func:`normalise_map`), and on a log scale (:func:`log_map`) below. Expected: a ViT's patch embedding gives exactly the
p x p block of the centre patch (it is a stride-p convolution); global attention spreads it from the first block
on; a CNN's ERF grows from a point to a broad Gaussian-like blob.

Layers (:func:`erf_candidates`): GatedViT: the patch embedding (layer 0), then every block. Segmenter: its encoder's
patch embedding and blocks, then the logits. UNet: the stem, every encoder stage, every decoder stage, then the
logits. :func:`pick_evenly` chooses ``count`` of them evenly over depth, the first and the last included.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from weakseg.errors import ConfigError

#: Name of the pseudo-layer that is the model's own output (its logits), not a hooked module.
OUTPUT = "output"


@dataclass
class ERFLayer:
    """A layer whose centre unit the ERF differentiates.

    Attributes:
        name: display name ("patch embedding", "block 3", "decoder 1", "output").
        module: the module whose forward output is hooked; None = the model's output.
        num_prefix_tokens: prefix tokens to drop from a token output (B, P + N, D); None = a (B, C, h, w) map.
        patch_size: the patch size that turns the input size into the token grid (token outputs only).
    """

    name: str
    module: nn.Module | None
    num_prefix_tokens: int | None = None
    patch_size: int | None = None


def erf_candidates(model: nn.Module) -> list[ERFLayer]:
    """Every layer of ``model`` an ERF can be taken at, shallow to deep (module docstring).

    Raises:
        ConfigError: for a network that is neither a GatedViT, a Segmenter nor a UNet.
    """
    from weakseg.models.segmenter import Segmenter
    from weakseg.models.unet import UNet
    from weakseg.models.vit import GatedViT

    def vit_layers(vit: GatedViT, prefix: str = "") -> list[ERFLayer]:
        p = vit.patch_size
        layers = [ERFLayer(f"{prefix}patch embedding", vit.patch_embed, 0, p)]
        layers += [ERFLayer(f"{prefix}block {i}", blk, vit.num_prefix_tokens, p) for i, blk in enumerate(vit.blocks)]
        return layers

    if isinstance(model, GatedViT):
        if getattr(model, "patch_embed_s1", None) is not None:
            raise ConfigError("the ERF of the summed S1 + S2 patch embeddings (fusion 'sum') is not supported")
        return vit_layers(model)
    if isinstance(model, Segmenter):
        return [*vit_layers(model.encoder, "encoder "), ERFLayer(OUTPUT, None)]
    if isinstance(model, UNet):
        layers = [ERFLayer("stem", model.stem)]
        layers += [ERFLayer(f"encoder {i + 1}", m) for i, m in enumerate(model.down)]
        layers += [ERFLayer(f"decoder {i + 1}", m) for i, m in enumerate(model.up)]
        return [*layers, ERFLayer(OUTPUT, None)]
    raise ConfigError(f"no ERF layers known for a {type(model).__name__} (GatedViT, Segmenter or UNet)")


def pick_evenly(items: Sequence[object], count: int) -> list[int]:
    """Indices of ``count`` items spread evenly over ``items``, the first and the last included (all when
    ``count >= len(items)``)."""
    n = len(items)
    if count < 1:
        raise ConfigError(f"--layers must be at least 1, got {count}")
    if count == 1:
        return [n - 1]
    if count >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)})


def _as_map(y: Tensor | tuple, layer: ERFLayer, input_size: tuple[int, int]) -> Tensor:
    """A layer's output as (B, C, h, w)."""
    if isinstance(y, (tuple, list)):  # a ViT block returns (tokens, attention, branch output)
        y = y[0]
    if layer.num_prefix_tokens is None:
        if y.ndim != 4:
            raise ConfigError(f"layer {layer.name!r} gave a {tuple(y.shape)} output, not (B, C, h, w)")
        return y
    tokens = y[:, layer.num_prefix_tokens :]  # (B, N, D)
    B, N, D = tokens.shape
    if layer.patch_size:
        h, w = input_size[0] // layer.patch_size, input_size[1] // layer.patch_size
    else:
        h = w = math.isqrt(N)
    if h * w != N:
        h = w = math.isqrt(N)
        if h * w != N:
            raise ConfigError(f"layer {layer.name!r}: {N} tokens are not a patch grid")
    return tokens.transpose(1, 2).reshape(B, D, h, w)


def effective_receptive_fields(model: nn.Module, batches: Iterable[Tensor], layers: Sequence[ERFLayer]
                               ) -> dict[str, np.ndarray]:
    """ERF maps (H, W) of the centre unit of each layer, averaged over ``batches`` (module docstring).

    Args:
        model: the network; put in eval mode, its parameters frozen for the pass (restored afterwards).
        batches: input batches (B, C, H, W), all of one size.
        layers: from :func:`erf_candidates`.

    Returns:
        layer name -> float64 (H, W) raw map (not normalised), in the order of ``layers``.
    """
    was_training = model.training
    model.eval()
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    sums: dict[str, Tensor] = {}
    seen = 0
    try:
        for x in batches:
            x = x.detach().float().clone().requires_grad_(True)
            captured: dict[str, object] = {}
            handles = [layer.module.register_forward_hook(
                lambda _m, _i, out, name=layer.name, into=captured: into.__setitem__(name, out))
                for layer in layers if layer.module is not None]
            try:
                with torch.enable_grad():
                    output = model(x)
            finally:
                for h in handles:
                    h.remove()
            size = (x.shape[-2], x.shape[-1])
            for k, layer in enumerate(layers):
                y = _as_map(output if layer.module is None else captured[layer.name], layer, size)  # (B, C, h, w)
                h, w = y.shape[-2:]
                s = y[:, :, h // 2, w // 2].sum(dim=1).mean()
                (g,) = torch.autograd.grad(s, x, retain_graph=k < len(layers) - 1, allow_unused=True)
                # times B: s is a batch mean, so g holds 1/B of each tile's own gradient (tiles do not interact in
                # eval mode); rescaled, the map is E_b |d y_b / d x_b| whatever the batch size, and batches of
                # different sizes average without bias
                m = g.abs().sum(dim=1).mean(dim=0) * x.shape[0] if g is not None else torch.zeros(size)  # (H, W)
                sums[layer.name] = sums.get(layer.name, 0) + m.double() * x.shape[0]
            seen += x.shape[0]
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    if not seen:
        raise ConfigError("no input batches for the effective receptive field")
    return {layer.name: (sums[layer.name] / seen).numpy() for layer in layers}


def normalise_map(m: np.ndarray) -> np.ndarray:
    """(m - min) / (max - min); a constant map gives zeros."""
    m = np.asarray(m, dtype=np.float64)
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def mass_radius(m: np.ndarray, fraction: float = 0.9) -> float:
    """Radius (pixels) around the map's centre ``(H // 2, W // 2)`` holding ``fraction`` of its total; 0 for an
    all-zero map. A one-number summary of how far the ERF reaches."""
    m = np.abs(np.asarray(m, dtype=np.float64))
    total = m.sum()
    if total <= 0:
        return 0.0
    H, W = m.shape
    yy, xx = np.mgrid[:H, :W]
    r = np.hypot(yy - H // 2, xx - W // 2).ravel()
    order = np.argsort(r, kind="stable")
    cum = np.cumsum(m.ravel()[order])
    return float(r[order][np.searchsorted(cum, fraction * total * (1 - 1e-12))])


def log_map(m: np.ndarray, decades: float = 4.0) -> np.ndarray:
    """log10 of the map relative to its maximum, the last ``decades`` decades mapped to [0, 1] (zeros to 0): shows
    the faint spread that a linear scale hides behind a dominant centre (a ViT's residual path)."""
    m = np.abs(np.asarray(m, dtype=np.float64))
    peak = float(m.max())
    if peak <= 0:
        return np.zeros_like(m)
    with np.errstate(divide="ignore"):
        rel = np.log10(m / peak)  # (-inf, 0]
    return np.clip(1.0 + rel / decades, 0.0, 1.0)


def plot_erf(maps: dict[str, np.ndarray], path: str | os.PathLike, title: str | None = None,
             panel_size: float = 2.2, dpi: int = 100, log_row: bool = True) -> Path:
    """One heatmap per layer, in the order of ``maps``: min-max normalised (top row) and, with ``log_row``, on a
    log scale of 4 decades below the maximum (:func:`log_map`, bottom row); the radius holding 90 % of each map's
    mass in its title, the centre pixel marked."""
    from weakseg.viz.figures import _new_figure, _save

    if not maps:
        raise ConfigError("no ERF maps to draw")
    n = len(maps)
    rows = 2 if log_row else 1
    fig = _new_figure(n * panel_size + 0.8, rows * panel_size + (0.55 if title else 0.3), dpi)
    axes = fig.subplots(rows, n, squeeze=False)
    for c, (name, m) in enumerate(maps.items()):
        H, W = m.shape
        shown = [(normalise_map(m), "linear, min-max")] + ([(log_map(m), "log10, 4 decades")] if log_row else [])
        for r, (img, how) in enumerate(shown):
            ax = axes[r, c]
            image = ax.imshow(img, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            ax.plot([W // 2], [H // 2], marker="+", color="cyan", markersize=6, linewidth=0)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{name}\nr90 = {mass_radius(m):.1f} px", fontsize=8)
            if c == 0:
                ax.set_ylabel(how, fontsize=7)
            if c == n - 1:
                bar = fig.colorbar(image, ax=list(axes[r]), shrink=0.8, fraction=0.04)
                bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


@dataclass
class LoadedNetwork:
    """A network read from a checkpoint, with how its inputs are prepared.

    Attributes:
        model: GatedViT (classifier), UNet or Segmenter (refine), in eval mode.
        kind: "classifier" or "refine".
        in_chans: input channels.
        img_size: the input size it was trained on (H, W).
        data_config: normalisation settings (``normalization``, ``band_stats``, ``dataset``, ``modality``).
        description: one line for titles and progress ("classifier (vit)", "refine unet").
    """

    model: nn.Module
    kind: str
    in_chans: int
    img_size: tuple[int, int]
    data_config: dict
    description: str


def _refine_data_config(path: Path) -> dict:
    """Normalisation of a refine run from its ``config.yaml`` beside ``iter<i>/`` (or ``supervised/``); {} if none."""
    import yaml

    for folder in (path.parent.parent, path.parent):
        for name in ("config.yaml", "config_supervised.yaml"):
            f = folder / name
            if not f.is_file():
                continue
            try:
                cfg = (yaml.safe_load(f.read_text()) or {}).get("config") or {}
            except (OSError, yaml.YAMLError, AttributeError):
                continue
            return {k: cfg[k] for k in ("normalization", "band_stats", "dataset", "modality") if k in cfg}
    return {}


def load_network(path: str | Path, flag: str = "--checkpoint") -> LoadedNetwork:
    """A weakseg classifier checkpoint (``weakseg train``) or refine checkpoint (``weakseg refine``'s
    ``iter<i>/unet.ckpt``, a UNet or Segmenter) as a :class:`LoadedNetwork`.

    Raises:
        ConfigError: naming the file, for a missing or unreadable file or one that is neither.
    """
    from weakseg.tasks.classification import load_classifier, read_checkpoint

    path = Path(path)
    ckpt = read_checkpoint(path, flag)
    hp = ckpt.get("hyper_parameters") or {}
    if isinstance(hp.get("model"), dict):
        from weakseg.models.architectures import architecture_of

        task = load_classifier(path)
        cfg = task.model_config
        data_cfg = dict(task.hparams.get("data_config") or {})
        return LoadedNetwork(task.model.eval(), "classifier", cfg.in_chans, tuple(cfg.img_size), data_cfg,
                             f"classifier ({architecture_of(cfg)})")
    if "widths" in hp and "state_dict" in ckpt:
        from weakseg.tasks.segmentation import SegmentationTask

        try:
            task = SegmentationTask.load_from_checkpoint(path, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - a foreign or mismatched file is a user error
            raise ConfigError(f"cannot load refine checkpoint {path} ({flag}): {e}") from e
        data_cfg = _refine_data_config(path)
        size = tuple(int(v) for v in hp.get("tile_size", (64, 64)))
        return LoadedNetwork(task.model.eval(), "refine", int(hp.get("in_chans", 13)), size, data_cfg,
                             f"refine {hp.get('model', 'unet')}")
    raise ConfigError(f"{path} is neither a weakseg classifier checkpoint (weakseg train) nor a refine checkpoint "
                      f"(weakseg refine's iter<i>/unet.ckpt) ({flag})")
