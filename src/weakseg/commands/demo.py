"""``weakseg demo``: the whole weakly supervised pipeline on built-in synthetic Sentinel-2 data, compared fairly.

Generates the data, trains four classifiers (one CLS token and one class token per class, each with and without
head pruning), makes pseudomasks with every method each classifier supports (top-class floor, Grad-CAM,
attention clustering with the paper's rank rule and with weakseg's default rule, class attention as released and
weakseg's default), picks the best pipeline on the holdout part of the training split, refines its masks with a
UNet, trains the fully supervised UNet upper bound, prints one table (:mod:`weakseg.pipeline.comparison`), names
the best pipeline and writes figures. Sized to finish in about 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weakseg.commands import command_help
from weakseg.config import save_resolved
from weakseg.io import atomic_write_json, make_dir

log = logging.getLogger("weakseg")


@dataclass
class DemoConfig:
    output_dir: str = "demo_output"
    train_tiles: int = 256
    test_tiles: int = 64
    tile_size: int = 64
    seed: int = 0
    vit_epochs: int = 30
    unet_epochs: int = 30
    iterations: int = 1
    figure_tiles: int = 4
    train_overrides: dict[str, Any] = field(default_factory=dict)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help=command_help("demo"),
                              description=__doc__)
    p.add_argument("--output_dir", default="demo_output", help="where everything goes (default demo_output/)")
    p.add_argument("--train_tiles", type=int, default=256)
    p.add_argument("--test_tiles", type=int, default=64)
    p.add_argument("--vit_epochs", type=int, default=30)
    p.add_argument("--unet_epochs", type=int, default=30)
    p.add_argument("--iterations", type=int, default=1, help="UNet refinement iterations of the best pipeline (1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a tiny smoke-test run (seconds, meaningless numbers)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from weakseg.errors import ConfigError

    for flag, minimum in (("train_tiles", 10), ("test_tiles", 1), ("vit_epochs", 1), ("unet_epochs", 1),
                          ("iterations", 0)):
        if getattr(args, flag) < minimum:
            raise ConfigError(f"--{flag} must be at least {minimum}, got {getattr(args, flag)}"
                              + (" (the holdout needs tiles of its own)" if flag == "train_tiles" else ""))
    cfg = DemoConfig(output_dir=args.output_dir, train_tiles=args.train_tiles, test_tiles=args.test_tiles,
                     vit_epochs=args.vit_epochs, unet_epochs=args.unet_epochs, iterations=args.iterations,
                     seed=args.seed)
    if args.fast:
        cfg.train_tiles, cfg.test_tiles, cfg.tile_size = 16, 8, 32
        cfg.vit_epochs, cfg.unet_epochs, cfg.iterations, cfg.figure_tiles = 1, 1, 1, 2
        cfg.train_overrides = {"embed_dim": 24, "depth": 2, "num_heads": 4, "patch_size": 8}
    run_demo(cfg)
    return 0


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from weakseg.data.synthetic import generate_synthetic_dfc2020
    from weakseg.pipeline.comparison import ComparisonConfig, pipeline_commands, run_comparison
    from weakseg.pipeline.figures import write_comparison_figures

    t0 = time.time()
    out = make_dir(Path(cfg.output_dir), "output folder (--output_dir)")
    save_resolved(cfg, out)
    data = out / "data"
    print(f"[demo] writing synthetic Sentinel-1/2 data ({cfg.train_tiles} + {cfg.test_tiles} tiles) to {data}",
          flush=True)
    generate_synthetic_dfc2020(data, {"validation": cfg.train_tiles, "test": cfg.test_tiles},
                               tile_size=cfg.tile_size, seed=cfg.seed)
    results = run_comparison(
        ComparisonConfig(datadir=str(data), output_dir=str(out), seed=cfg.seed, vit_epochs=cfg.vit_epochs,
                         unet_epochs=cfg.unet_epochs, iterations=cfg.iterations,
                         train_overrides={"imgsize": [cfg.tile_size, cfg.tile_size], **cfg.train_overrides}),
        progress=lambda line: print(f"[demo] {line}", flush=True),
    )
    print("\n" + results["table"])
    figures = write_comparison_figures(out, data, results, cfg.figure_tiles)
    results["figures"] = [str(f) for f in figures]
    results["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out / "results.json", results)
    best = results["best"]
    print(f"\nbest pipeline: {best['label']}. On your data: {pipeline_commands(best)}")
    print(f"figures: {', '.join(str(f) for f in figures)}")
    print(f"results: {out / 'results.json'}  (total {time.time() - t0:.0f}s)")
    return results
