"""Benchmark: training-step throughput of the gated ViT vs the plain ViT and the explicit-softmax attention.

Method: Hanna, Mommert and Borth, "Sparse Multimodal Vision Transformer for Weakly Supervised Semantic
Segmentation", CVPRW 2023 -- a Hard Concrete gate on every attention head (Louizos et al., ICLR 2018) with the
L0 penalty added to the multi-label BCE loss. Head pruning is only worth having if it costs little at training
time, so this script measures what the gates cost and what the fused attention saves. Three variants run in
ONE process on the same seeded inputs, with the same configuration and identical initial weights:

- **gated**: the default path -- gates on every head, L0 penalty in the loss, fused
  ``scaled_dot_product_attention`` (:class:`weakseg.models.vit.GatedViT`);
- **ungated**: the same ViT with ``gated=False`` (the paper's "w/o pruning" baseline), no L0 term;
- **explicit**: the gated ViT with ``model.set_attention_impl("explicit")``, which materialises every
  (B, heads, N, N) softmax as the original implementation did.

Each timed step is a full optimisation step: forward, BCE-with-logits on random multi-hot targets (+ lambda *
L0 for the gated variants), backward, AdamW step with the parameter groups of
:class:`weakseg.tasks.classification.ClassificationTask`. After a warm-up, the variants are interleaved within
every repeat (the order rotates: A B C, B C A, C A B, ...) so that drift and contention from other processes
fall on all of them alike; the reported figure is the median over repeats with its min/max and IQR, and the
headline ratios are medians of the per-repeat paired ratios. Printed: a table (variant, images/s, time ratio
against the ungated ViT, peak memory) and the two headline ratios with their targets. On CPU the ratios are
also given in process CPU time, which time given to other processes does not inflate. Run on a quiet machine,
e.g.::

    python benchmarks/train_step.py --config cpu --threads 1
    python benchmarks/train_step.py --config small --steps 1 --repeats 3 --threads 1
    python benchmarks/train_step.py --config paper --device cuda --bf16 --json train_step.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from weakseg.models.vit import GatedViT
from weakseg.tasks.classification import ClassificationTask

#: Model sizes. "cpu" is the project's CPU default; "small" is ViT-S/16; "paper" is the sparse ViT paper's
#: ViT-L-width backbone at depth 12 with 14-pixel patches.
CONFIGS: dict[str, dict[str, Any]] = {
    "cpu": dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=6, mlp_ratio=2.0,
                batch_size=16),
    "small": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                  batch_size=8),
    "paper": dict(img_size=224, patch_size=14, embed_dim=1024, depth=12, num_heads=16, mlp_ratio=2.0,
                  batch_size=2),
}
#: Variant names in table order; "ungated" is the reference of every ratio.
VARIANTS = ("gated", "ungated", "explicit")
DESCRIPTIONS = {
    "gated": "gates + L0, fused SDPA (default)",
    "ungated": "no gates, fused SDPA",
    "explicit": "gates + L0, explicit softmax",
}
GATED_TIME_TARGET = 1.10
#: Architectures whose training step is timed against the matmul peak (``weakseg train --arch``).
ARCHS = ("vit", "class_tokens", "weaktr", "pcm")
#: The issue's floor for every architecture's achieved fraction of the fp32 (CPU) matmul peak.
PEAK_FRACTION_TARGET = 0.60
#: Square matmul sides tried for the peak; the best median rate is the peak.
PEAK_SIDES = (512, 1024, 2048)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu",
                        help="model size: cpu (64 px, dim 96, depth 4), small (ViT-S/16), "
                             "paper (224 px, /14, dim 1024)")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=None,
                        help="images per step (default: the config's: cpu 16, small 8, paper 2)")
    parser.add_argument("--in_chans", "--in-chans", type=int, default=13,
                        help="input channels (13 = Sentinel-2; 15 = S2 + S1)")
    parser.add_argument("--num_classes", "--num-classes", type=int, default=8,
                        help="multi-label outputs (DFC: 8)")
    parser.add_argument("--steps", type=int, default=5,
                        help="training steps per variant in each timed repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (variants interleaved in each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU intra-op threads)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the models train")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast for forward and loss "
                             "(on CPU, torch's bf16 SDPA backward is slow)")
    parser.add_argument("--pr_rate", "--pr-rate", type=float, default=0.2,
                        help="lambda of the L0 penalty (paper: 0.2)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of weights, inputs, targets and gate samples")
    parser.add_argument("--parts", nargs="+", choices=("variants", "peak"), default=["variants", "peak"],
                        help="variants: gated vs ungated vs explicit attention; peak: every --archs step's "
                             "FLOP/s against the measured matmul peak")
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS),
                        help="architectures of the peak part (weakseg train --arch)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also save the numbers as JSON")
    return parser


# ---- variants ----------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One model under test with its optimiser and its measurements."""

    name: str
    model: GatedViT
    optimizer: torch.optim.Optimizer
    gated: bool
    seconds: list[float] = field(default_factory=list)  # wall clock per timed repeat, for ``steps`` steps
    cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time per timed repeat
    memory: dict[str, float] = field(default_factory=dict)


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = {k: v for k, v in CONFIGS[args.config].items() if k != "batch_size"}
    return {**cfg, "in_chans": args.in_chans, "num_classes": args.num_classes}


def build_variants(args: argparse.Namespace, device: torch.device) -> dict[str, Variant]:
    """Three models with identical weights (the ungated one takes the gated one's weights, minus the gates).

    The optimiser comes from :meth:`ClassificationTask.configure_optimizers` (AdamW, betas (0.9, 0.95), no
    weight decay on gates, norms, biases and embeddings), so the benchmark times the optimiser the project
    trains with.
    """
    variants: dict[str, Variant] = {}
    for name in VARIANTS:
        gated = name != "ungated"
        torch.manual_seed(args.seed)
        task = ClassificationTask(model_config(args), prune=gated, pr_rate=args.pr_rate, lr=args.lr,
                                  lr_scheduler=False)
        model = task.model
        if name == "ungated":
            missing, unexpected = model.load_state_dict(variants["gated"].model.state_dict(), strict=False)
            if missing or any(not k.endswith("attn.gate.log_alpha") for k in unexpected):
                raise RuntimeError(f"ungated weights differ from gated ones: {missing} {unexpected}")
        if name == "explicit":
            model.set_attention_impl("explicit")
        model.to(device).train()
        optimizer = task.configure_optimizers()  # built after .to(device) so states live on the device
        variants[name] = Variant(name, model, optimizer, gated)
    return variants


def make_batch(args: argparse.Namespace, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Seeded random images (B, C, H, W) and multi-hot targets (B, classes), at least one label per image."""
    gen = torch.Generator().manual_seed(args.seed)
    size = CONFIGS[args.config]["img_size"]
    images = torch.randn(batch_size, args.in_chans, size, size, generator=gen)  # (B, C, H, W)
    targets = (torch.rand(batch_size, args.num_classes, generator=gen) < 0.3).float()  # (B, classes)
    targets[torch.arange(batch_size), torch.randint(args.num_classes, (batch_size,), generator=gen)] = 1.0
    return images.to(device), targets.to(device)


def train_step(
    v: Variant, images: Tensor, targets: Tensor, autocast: Callable[[], Any], pr_rate: float
) -> Tensor:
    """Forward, BCE (+ lambda * L0 when gated), backward, AdamW step; returns the detached loss (no sync)."""
    v.optimizer.zero_grad(set_to_none=True)
    with autocast():
        logits = v.model(images)  # (B, classes)
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
        if v.gated:
            loss = loss + pr_rate * v.model.l0_penalty()
    loss.backward()
    v.optimizer.step()
    return loss.detach()


# ---- measurement helpers -----------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock time covers the work (CUDA launches are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def spread(values: list[float]) -> dict[str, float]:
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(med), "min": float(min(values)), "max": float(max(values)),
            "q1": float(q1), "q3": float(q3)}


def time_ratio(variants: dict[str, Variant], num: str, den: str, cpu: bool = False) -> dict[str, Any]:
    """Per-repeat paired time ratios num/den (same repeat = same machine state), summarised.

    ``cpu=True`` uses process CPU time instead of wall clock: on a shared machine, time the scheduler gives
    to other processes inflates wall clock but not CPU time (cache and memory-bandwidth contention still
    count).
    """
    times = {n: variants[n].cpu_seconds if cpu else variants[n].seconds for n in (num, den)}
    pairs = [a / b for a, b in zip(times[num], times[den])]
    return {**spread(pairs), "per_repeat": pairs}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic write: a half-written file never replaces a previous result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ---- fraction of the hardware's peak ------------------------------------------------------------------------


def _sdpa_cpu_forward_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """CPU fused attention (``_scaled_dot_product_flash_attention_for_cpu``): QK^T and AV, 2 x 2 x B H N N d.

    torch's FLOP counter registers the CUDA kernels only; without this the attention of a CPU step counts 0."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any,
                             *args: Any, **kwargs: Any) -> int:
    """Twice the forward: the gradients of Q, K, V (4 products). torch's own formula for the CUDA kernels also
    counts the kernel's recomputation of QK^T; model FLOPs (as in MFU) leave recomputation out."""
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


SDPA_CPU_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_forward_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


def analytic_vit_step_flops(cfg: Any, batch_size: int) -> int:
    """Matmul FLOPs of one training step (forward + backward) of the one-CLS ViT, counted by hand.

    Per image, with N tokens (prefix + patches), width D, MLP width M, P patches of C x p x p pixels, K classes:
    patch embedding 2 P (C p p) D; per block the qkv 2 N D 3D, scores and weighted sum 2 x 2 N N D, projection
    2 N D D and MLP 2 x 2 N D M; the head 2 D K. The backward costs twice the forward (gradients of inputs and
    weights), except the patch embedding, whose input needs no gradient (once). Norms, GELU, softmax, gates and
    the optimiser are elementwise and not counted (as in MFU conventions).
    """
    n_patches = cfg.grid_size[0] * cfg.grid_size[1]
    N = cfg.num_prefix_tokens + n_patches
    D, M = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    patch = 2 * n_patches * cfg.in_chans * cfg.patch_size ** 2 * D
    block = 2 * N * D * 3 * D + 4 * N * N * D + 2 * N * D * D + 4 * N * D * M
    head = 2 * D * cfg.num_classes
    return batch_size * (2 * patch + 3 * (cfg.depth * block + head))


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int, seconds: float = 0.5
                ) -> dict[str, Any]:
    """The machine's matmul rate (FLOP/s): the best median over square sides of :data:`PEAK_SIDES`.

    Each side runs back-to-back products for about ``seconds`` per repeat, with the same threads as the steps;
    2 n^3 FLOPs per product. This is what the hardware does on the operation that dominates a ViT step, measured
    in the same process, so the fraction below is against this machine, not a data-sheet number.
    """
    per_side: dict[int, float] = {}
    for n in PEAK_SIDES:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)
        synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        count = max(1, int(seconds / max(time.perf_counter() - t0, 1e-6)))
        rates = []
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(count):
                torch.mm(a, b)
            synchronize(device)
            rates.append(2 * n ** 3 * count / (time.perf_counter() - t0))
        per_side[n] = statistics.median(rates)
    best = max(per_side, key=per_side.__getitem__)
    return {"flops_per_s": per_side[best], "side": best, "per_side": per_side, "dtype": str(dtype)}


@dataclass
class ArchRun:
    """One architecture's real training step (:meth:`ClassificationTask.training_step`) and its measurements."""

    name: str
    task: ClassificationTask
    optimizer: torch.optim.Optimizer
    flops: int = 0  # forward + backward matmul FLOPs of one step (torch's counter + CPU attention)
    seconds: list[float] = field(default_factory=list)


def build_arch_runs(args: argparse.Namespace, device: torch.device) -> dict[str, ArchRun]:
    """Each of ``args.archs`` as ``weakseg train --arch`` builds it (gated, L0 penalty, its own loss terms)."""
    from weakseg.models.architectures import get_architecture

    runs = {}
    for name in args.archs:
        torch.manual_seed(args.seed)
        fields = get_architecture(name).model_fields(args.num_classes)
        task = ClassificationTask({**model_config(args), **fields}, prune=True, pr_rate=args.pr_rate,
                                  lr=args.lr, lr_scheduler=False, arch=name)
        task.to(device).train()
        runs[name] = ArchRun(name, task, task.configure_optimizers())
    return runs


def arch_step(run: ArchRun, batch: dict[str, Tensor], autocast: Callable[[], Any]) -> Tensor:
    """The training step ``weakseg train`` runs: the task's loss (BCE, L0, auxiliary terms), backward, AdamW."""
    run.optimizer.zero_grad(set_to_none=True)
    with autocast():
        loss = run.task.training_step(batch, 0)
    loss.backward()
    run.optimizer.step()
    return loss.detach()


def count_step_flops(run: ArchRun, batch: dict[str, Tensor], autocast: Callable[[], Any]) -> int:
    """Matmul, convolution and attention FLOPs of one forward + backward, from the shapes of the ops that ran."""
    with FlopCounterMode(display=False, custom_mapping=SDPA_CPU_FLOPS) as counter:
        with autocast():
            loss = run.task.training_step(batch, 0)
        loss.backward()
    run.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def measure_peak_fraction(args: argparse.Namespace, device: torch.device, batch_size: int,
                          autocast: Callable[[], Any]) -> dict[str, Any]:
    """Achieved FLOP/s of every architecture's training step and its fraction of the measured matmul peak."""
    import warnings

    warnings.filterwarnings("ignore", message=".*self.trainer.*")  # the task logs; no Trainer here
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    runs = build_arch_runs(args, device)
    images, targets = make_batch(args, batch_size, device)
    batch = {"image": images, "label": targets}
    for run in runs.values():
        run.flops = count_step_flops(run, batch, autocast)
        for _ in range(max(args.warmup, 1)):
            arch_step(run, batch, autocast)
    peak = matmul_peak(device, dtype, args.repeats)  # between warm-up and timing: same thread pool state
    for r in range(args.repeats):
        names = list(runs)
        for name in names[r % len(names):] + names[: r % len(names)]:
            run = runs[name]
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = arch_step(run, batch, autocast)
            synchronize(device)
            run.seconds.append((time.perf_counter() - t0) / args.steps)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{name}: non-finite loss {float(loss)}; lower --lr")
    result: dict[str, Any] = {"peak": peak, "target": PEAK_FRACTION_TARGET, "archs": {}}
    if "vit" in runs:
        result["analytic_vit_flops"] = analytic_vit_step_flops(runs["vit"].task.model_config, batch_size)
        result["counted_vit_flops"] = runs["vit"].flops
    for name, run in runs.items():
        step = statistics.median(run.seconds)
        result["archs"][name] = {"flops_per_step": run.flops, "seconds_per_step": run.seconds,
                                 "median_seconds_per_step": step, "images_per_s": batch_size / step,
                                 "achieved_flops_per_s": run.flops / step,
                                 "fraction_of_peak": run.flops / step / peak["flops_per_s"]}
    return result


def print_peak_fraction(result: dict[str, Any], batch_size: int) -> None:
    peak = result["peak"]
    sides = ", ".join(f"{n}: {r / 1e9:.1f}" for n, r in peak["per_side"].items())
    print(f"\nmatmul peak ({peak['dtype'].replace('torch.', '')}): {peak['flops_per_s'] / 1e9:.1f} GFLOP/s "
          f"(square side {peak['side']}; per side GFLOP/s {sides})")
    if "analytic_vit_flops" in result:
        a, c = result["analytic_vit_flops"], result["counted_vit_flops"]
        print(f"FLOPs per step of --arch vit: {a / 1e9:.3f} G by hand, {c / 1e9:.3f} G counted "
              f"(ratio {c / a:.4f})")
    print(f"{'arch':<13} {'GFLOP/step':>10} {'ms/step':>8} {'images/s':>9} {'GFLOP/s':>8} {'of peak':>8}")
    for name, r in result["archs"].items():
        verdict = "ok" if r["fraction_of_peak"] >= result["target"] else "BELOW TARGET"
        print(f"{name:<13} {r['flops_per_step'] / 1e9:10.3f} {1000 * r['median_seconds_per_step']:8.1f} "
              f"{r['images_per_s']:9.1f} {r['achieved_flops_per_s'] / 1e9:8.1f} "
              f"{100 * r['fraction_of_peak']:7.1f}%  {verdict} (target >= {100 * result['target']:.0f} %)")
    print(f"batch {batch_size}; the step is the task's own training step (its loss terms, metrics update, "
          "AdamW); counted FLOPs are matmuls, convolutions and attention")


def run_variants(args: argparse.Namespace, device: torch.device, batch_size: int,
                 autocast: Callable[[], Any]) -> dict[str, Any]:
    """The gated, ungated and explicit-attention ViTs timed in interleaved repeats; prints their table."""
    rss_start = max_rss_mib()
    variants = build_variants(args, device)
    images, targets = make_batch(args, batch_size, device)
    cfg = variants["gated"].model.cfg
    tokens = cfg.num_prefix_tokens + cfg.grid_size[0] * cfg.grid_size[1]
    params = sum(p.numel() for p in variants["ungated"].model.parameters())
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or "cpu"
    print(f"config {args.config}: {cfg.img_size[0]}x{cfg.img_size[1]} px, patch {cfg.patch_size}, "
          f"{tokens} tokens, dim {cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}, "
          f"mlp {cfg.mlp_ratio:g}, {params / 1e6:.2f} M parameters, {args.in_chans} channels")
    print(f"batch {batch_size}, {args.steps} step(s) x {args.repeats} repeat(s) per variant after "
          f"{args.warmup} warm-up step(s); device {args.device} ({device_name}), {args.threads} thread(s), "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, torch {torch.__version__}")

    # Sanity: same weights, same gate samples (same seed) -> fused and explicit gated logits agree; ungated
    # differs only by the closed heads. A benchmark of variants that compute different things means nothing.
    first_loss, first_logits = {}, {}
    with torch.no_grad(), autocast():
        for name, v in variants.items():
            torch.manual_seed(args.seed)
            first_logits[name] = v.model(images).float()  # (B, classes)
            first_loss[name] = float(F.binary_cross_entropy_with_logits(first_logits[name], targets))
    fused_vs_explicit = float((first_logits["gated"] - first_logits["explicit"]).abs().max())
    print("first-step BCE with the same gate samples: "
          + ", ".join(f"{n} {x:.6f}" for n, x in first_loss.items())
          + f"; max |logit| difference fused vs explicit: {fused_vs_explicit:.1e}")

    # Warm-up variant by variant (thread pools, allocator, optimiser states), recording memory as it grows.
    torch.manual_seed(args.seed)
    rss_before = max_rss_mib()
    for name in ("ungated", "gated", "explicit"):  # expected memory order: each RSS delta is its own growth
        v = variants[name]
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        for _ in range(max(args.warmup, 1)):
            train_step(v, images, targets, autocast, args.pr_rate)
        synchronize(device)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            v.memory = {"peak_mib": peak / 2**20,
                        "step_peak_above_resident_mib": (peak - resident) / 2**20}
        else:
            rss = max_rss_mib()
            v.memory = {"max_rss_mib": rss, "max_rss_growth_mib": rss - rss_before}
            rss_before = rss

    # Timed repeats, interleaved with a rotating order.
    order = list(VARIANTS)
    for r in range(args.repeats):
        rotation = order[r % len(order):] + order[: r % len(order)]
        for name in rotation:
            v = variants[name]
            synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                loss = train_step(v, images, targets, autocast, args.pr_rate)
            synchronize(device)
            v.seconds.append(time.perf_counter() - t0)
            v.cpu_seconds.append(time.process_time() - c0)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{name}: non-finite loss {float(loss)}; lower --lr")

    images_per_repeat = batch_size * args.steps
    throughput = {n: spread([images_per_repeat / s for s in v.seconds]) for n, v in variants.items()}
    ungated_time = statistics.median(variants["ungated"].seconds)
    gated_ratio = time_ratio(variants, "gated", "ungated")
    explicit_ratio = time_ratio(variants, "explicit", "gated")
    cpu_ratios = {"gated_over_ungated": time_ratio(variants, "gated", "ungated", cpu=True),
                  "explicit_over_fused": time_ratio(variants, "explicit", "gated", cpu=True)}

    mem_head = "peak MiB (step)" if device.type == "cuda" else "max RSS MiB (+growth)"
    print()
    print(f"{'variant':<9} {'attention / loss':<33} {'images/s':>9} {'min':>8} {'max':>8} {'IQR':>7} "
          f"{'ms/step':>8} {'time/ungated':>12}  {mem_head}")
    for name in VARIANTS:
        v, t = variants[name], throughput[name]
        med_s = statistics.median(v.seconds)
        if device.type == "cuda":
            mem = f"{v.memory['peak_mib']:.0f} ({v.memory['step_peak_above_resident_mib']:.0f})"
        else:
            mem = f"{v.memory['max_rss_mib']:.0f} (+{v.memory['max_rss_growth_mib']:.0f})"
        print(f"{name:<9} {DESCRIPTIONS[name]:<33} {t['median']:9.1f} {t['min']:8.1f} {t['max']:8.1f} "
              f"{t['q3'] - t['q1']:7.1f} {1000 * med_s / args.steps:8.1f} {med_s / ungated_time:12.3f}  "
              f"{mem}")
    print()
    verdict = "ok" if gated_ratio["median"] <= GATED_TIME_TARGET else "ABOVE TARGET"
    print(f"gated / ungated time ratio: {gated_ratio['median']:.3f} (target <= {GATED_TIME_TARGET:.2f}; "
          f"per-repeat min {gated_ratio['min']:.3f}, max {gated_ratio['max']:.3f}) {verdict}")
    print(f"explicit / fused time ratio: {explicit_ratio['median']:.3f} (fused clearly faster; "
          f"per-repeat min {explicit_ratio['min']:.3f}, max {explicit_ratio['max']:.3f})")
    if device.type == "cpu":
        g, e = cpu_ratios["gated_over_ungated"], cpu_ratios["explicit_over_fused"]
        print(f"same ratios in process CPU time (less sensitive to other processes): gated / ungated "
              f"{g['median']:.3f} (min {g['min']:.3f}, max {g['max']:.3f}), explicit / fused "
              f"{e['median']:.3f} (min {e['min']:.3f}, max {e['max']:.3f})")
        print(f"memory: process max RSS {rss_start:.0f} MiB at start; growth is cumulative and coarse "
              "(ru_maxrss never falls), so only large differences between variants mean anything")

    return {
        "model": cfg.to_dict(),
        "tokens": tokens,
        "parameters": params,
        "device": args.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "first_step_bce": first_loss,
        "first_step_max_logit_diff_fused_vs_explicit": fused_vs_explicit,
        "variants": {
            n: {"description": DESCRIPTIONS[n], "seconds_per_repeat": v.seconds,
                "cpu_seconds_per_repeat": v.cpu_seconds,
                "images_per_s": throughput[n], "memory": v.memory}
            for n, v in variants.items()
        },
        "gated_over_ungated_time": gated_ratio,
        "explicit_over_fused_time": explicit_ratio,
        "cpu_time_ratios": cpu_ratios if device.type == "cpu" else None,
        "gated_time_target": GATED_TIME_TARGET,
    }


# ---- main --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build or machine has no CUDA device; use --device cpu")
    batch_size = args.batch_size or CONFIGS[args.config]["batch_size"]
    if batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {batch_size}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def autocast() -> Any:
        if args.bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    result: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "batch_size": batch_size, "torch": torch.__version__}
    if "variants" in args.parts:
        result.update(run_variants(args, device, batch_size, autocast))
    if "peak" in args.parts:
        result["peak_fraction"] = measure_peak_fraction(args, device, batch_size, autocast)
        print_peak_fraction(result["peak_fraction"], batch_size)
    if args.json is not None:
        write_json(args.json, result)
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
