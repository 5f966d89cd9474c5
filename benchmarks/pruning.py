"""Pruning benchmark: the pruned fraction that ``--prune`` reaches in a short and a long run, with the default gate
settings (a target pruned fraction) and with the former defaults (the paper's Xavier init and lambda 0.2 * L0).

Issue 8: with the former defaults half of the heads went after 1-2 steps, in the same per-layer pattern on unrelated
data, because the eval rule keeps a head iff log alpha > 0 and Xavier-uniform starts about half of them below 0;
with the demo's recipe a 88-step run pruned none. This script trains the default small ViT (4 blocks x 6 heads) on
the built-in data (256 training tiles of 64 x 64, data seed 0; ``validation:train`` / ``validation:holdout``) through
:func:`weakseg.pipeline.train.train` with ``--prune`` for each of ``--steps`` optimiser steps (``max_steps``) and
each seed, and prints per setting and run length:

- the pruned fraction of the last step (mean and standard deviation over seeds) and of ``best.ckpt`` (the checkpoint
  the pseudomask commands read; chosen on the holdout mAP), the heads pruned per layer of every seed;
- the holdout macro F1 and mAP of the last epoch;
- how much the initial sign decides: heads closed after optimiser steps 1 and 2, how many of them started closed
  (log alpha <= 0 at init), and how many of the heads closed at the end started closed.

Each seed runs in its own process with one thread (``--jobs`` seeds at once). Usage::

    python benchmarks/pruning.py --seeds 0 1 2 --jobs 1      # about 13 min on one thread
    python benchmarks/pruning.py --aggregate runs/pruning      # print the table of finished seeds again
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from _seeds import add_seed_arguments, seed_benchmark_main

#: The settings compared: TrainConfig overrides on top of ``prune=True``.
SETTINGS: dict[str, dict[str, Any]] = {
    "default (target 0.5)": {},
    "former default (Xavier, 0.2 * L0)": {"target_pruned_fraction": None, "gate_init": None, "pr_rate": 0.2},
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_seed_arguments(p, "runs/pruning", jobs=1)
    p.add_argument("--steps", type=int, nargs="+", default=[100, 1000], help="run lengths in optimiser steps")
    return p


@contextmanager
def recording_gates(store: dict[str, Any]) -> Iterator[None]:
    """Record which heads are closed (log alpha <= 0) at the start of fit, after optimiser steps 1 and 2 and at
    the end of training.

    Hooks set on :class:`ClassificationTask` for the duration (it defines neither), so the run is the unchanged
    :func:`weakseg.pipeline.train.train`.
    """
    from weakseg.tasks.classification import ClassificationTask

    def closed(task: Any) -> list[bool]:
        return (~task.model.head_mask()).flatten().tolist()

    def on_fit_start(self: Any) -> None:
        store["init"] = closed(self)

    def on_train_batch_end(self: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(self.global_step)
        if step in (1, 2) and f"step{step}" not in store:
            store[f"step{step}"] = closed(self)

    def on_train_end(self: Any) -> None:
        store["final_closed"] = closed(self)

    hooks = {"on_fit_start": on_fit_start, "on_train_batch_end": on_train_batch_end, "on_train_end": on_train_end}
    assert not set(hooks) & set(vars(ClassificationTask)), "ClassificationTask defines a hook this script sets"
    for hook, fn in hooks.items():
        setattr(ClassificationTask, hook, fn)
    try:
        yield
    finally:
        for hook in hooks:
            delattr(ClassificationTask, hook)


def run_one_seed(args: argparse.Namespace) -> None:
    """Every setting and run length for one seed, in this process (a subprocess of :func:`main`)."""
    import torch

    torch.set_num_threads(args.threads)
    from weakseg.cli import setup_logging
    from weakseg.pipeline.train import TrainConfig, train

    setup_logging(quiet=True)
    seed = args.seed_run
    out = args.output / f"seed{seed}"
    result_file = out / "results.json"
    results: dict[str, Any] = json.loads(result_file.read_text()) if result_file.is_file() else {}
    t0 = time.time()
    for steps in args.steps:
        for name, overrides in SETTINGS.items():
            key = f"{name} | {steps}"
            if key in results:
                continue
            gates: dict[str, Any] = {}
            run_dir = out / f"{'default' if not overrides else 'former'}_{steps}"
            t1 = time.time()
            with recording_gates(gates):
                summary = train(TrainConfig(datadir=str(args.output / "data"), output_dir=str(run_dir), prune=True,
                                            max_steps=steps, num_epochs=100_000, seed=seed, cache_data=True,
                                            figures=False, **overrides))
            m = summary["final_metrics"]
            results[key] = {
                "pruned_fraction": summary["pruned_fraction"], "per_layer": summary["pruned_heads_per_layer"],
                "heads": summary["num_heads_total"], "best_pruned": (summary["best"] or {}).get("pruned_heads"),
                "best_epoch": (summary["best"] or {}).get("epoch"), "val_macro_f1": m.get("val_macro_f1"),
                "val_map": m.get("val_map"),
                "seconds": round(time.time() - t1, 1), **gates,
            }
            result_file.write_text(json.dumps(results, indent=1))
            print(f"[seed {seed} {time.time() - t0:5.0f}s] {key}: pruned {summary['pruned_fraction']:.2f} "
                  f"{summary['pruned_heads_per_layer']}", flush=True)


def _mean_sd(values: list[float | None], fmt: str = "{:.2f}") -> str:
    if any(v is None for v in values):
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(sd)}"


def aggregate(folder: Path) -> str:
    """The table over every ``seed*/results.json`` in ``folder``."""
    results = {int(p.parent.name[4:]): json.loads(p.read_text()) for p in sorted(folder.glob("seed*/results.json"))}
    if not results:
        raise SystemExit(f"no finished seed in {folder}")
    keys = list(dict.fromkeys(k for r in results.values() for k in r))
    keys.sort(key=lambda k: (int(k.split(" | ")[1]), list(SETTINGS).index(k.split(" | ")[0])))
    seeds = sorted(results)
    lines = [f"seeds {seeds}; mean ± sd over seeds. Heads closed: mean count, in brackets how many of them started "
             "closed (log alpha <= 0 at init)",
             f"{'setting':<35}{'steps':>6}  {'pruned (last)':<14}{'pruned (best.ckpt)':<20}{'macro F1':<14}"
             f"{'mAP':<14}{'closed after step 1 / 2':<26}{'closed at the end'}"]
    per_layer = []
    for key in keys:
        rows = [results[s][key] for s in seeds if key in results[s]]
        name, steps = key.split(" | ")
        heads = rows[0]["heads"]

        def closed(state: str) -> str:
            count = statistics.fmean(sum(r[state]) for r in rows)
            from_init = statistics.fmean(sum(a and b for a, b in zip(r[state], r["init"])) for r in rows)
            return f"{count:.1f} ({from_init:.1f})"

        best = [r["best_pruned"] / heads if r["best_pruned"] is not None else None for r in rows]
        lines.append(
            f"{name:<35}{steps:>6}  {_mean_sd([r['pruned_fraction'] for r in rows]):<14}{_mean_sd(best):<20}"
            f"{_mean_sd([r['val_macro_f1'] for r in rows]):<14}{_mean_sd([r['val_map'] for r in rows]):<14}"
            f"{closed('step1') + ' / ' + closed('step2'):<26}{closed('final_closed')} of {heads}")
        per_layer.append(f"  {name}, {steps} steps: " + "  ".join(
            f"seed {s} {results[s][key]['per_layer']}" for s in seeds if key in results[s]))
    seconds = sum(r["seconds"] for res in results.values() for r in res.values())
    return "\n".join([*lines, "heads pruned per layer (4 blocks x 6 heads) at the last step:", *per_layer,
                      f"training time {seconds:.0f}s in all"])


def main() -> None:
    args = get_args_parser().parse_args()
    forwarded = ["--steps", *map(str, args.steps)]
    seed_benchmark_main(args, __file__, forwarded, run_one_seed, aggregate, "pruning.txt")


if __name__ == "__main__":
    main()
