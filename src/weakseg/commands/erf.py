"""``weakseg erf``: effective receptive fields of a checkpoint over depth, one heatmap per layer in one PNG.

Luo et al., "Understanding the Effective Receptive Field in Deep Convolutional Neural Networks", NeurIPS 2016;
procedure of reference ``ssl_vit.md`` section 3 (:mod:`weakseg.evaluation.erf`): ``|d y_centre / d x|`` of the
centre unit of each selected layer, summed over input channels, averaged over ``--tiles`` tiles in a separate
eval-mode pass, min-max normalised for display.

**Models** (``--checkpoint``): a ``weakseg train`` classifier (the ViT: the patch embedding as layer 0, then its
blocks) or a ``weakseg refine`` checkpoint (``<output>/iter<i>/unet.ckpt``; a UNet: stem, encoder and decoder
stages, then the logits; a Segmenter: its encoder's patch embedding and blocks, then the logits; inputs are
normalised as the run's ``config.yaml`` says). ``--layers N`` picks N layers evenly over depth, the first and the
last included. Tiles: ``--datadir`` or ``--images`` as for ``weakseg attention``, resized to ``--imgsize``
(default: the checkpoint's input size, so every batch has one size).

**Output**: ``--output`` (a .png file) and ``erf.npz`` beside it: the raw maps (``maps``, layers x H x W),
the layer names (``layers``), and ``r90`` (radius in pixels around the centre holding 90 % of each map).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from weakseg.commands import command_help
from weakseg.errors import ConfigError


def add_parser(subparsers: Any) -> None:
    from weakseg.commands.attention import add_input_arguments

    p = subparsers.add_parser("erf", help=command_help("erf"), description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="classifier checkpoint (weakseg train) or refine checkpoint (weakseg refine's iter<i>/unet.ckpt)")
    add_input_arguments(p, default_tiles=8)
    p.add_argument("--layers", type=int, default=4, help="layers, evenly over depth incl. the last (default 4)")
    p.add_argument("--batch_size", type=int, default=8, help="tiles per gradient pass (default 8)")
    p.add_argument("--output", type=Path, required=True, help="PNG to write; erf.npz is written beside it")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from weakseg.commands.attention import _size_arg, load_inputs
    from weakseg.evaluation.erf import (
        effective_receptive_fields,
        erf_candidates,
        load_network,
        mass_radius,
        pick_evenly,
        plot_erf,
    )

    if args.output.suffix.lower() != ".png":
        raise ConfigError(f"--output {args.output} must be a .png file (erf.npz is written beside it)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {args.batch_size}")
    net = load_network(args.checkpoint, "--checkpoint")
    candidates = erf_candidates(net.model)
    layers = [candidates[i] for i in pick_evenly(candidates, args.layers)]
    size = _size_arg(args.imgsize) or net.img_size
    print(f"model: {args.checkpoint} ({net.description}); layers {', '.join(layer.name for layer in layers)} "
          f"of {len(candidates)}; input {size[0]}x{size[1]}")
    if net.kind == "refine" and not net.data_config:
        print("note: no config.yaml of the refine run beside the checkpoint: inputs are not normalised")
    tiles = load_inputs(args, net.in_chans, net.data_config, size)
    x = torch.stack([t.image for t in tiles])  # (N, C, H, W)
    batches = list(x.split(args.batch_size))
    print(f"{len(tiles)} tile(s) in {len(batches)} batch(es): {', '.join(t.id for t in tiles[:8])}"
          f"{' ...' if len(tiles) > 8 else ''}")
    maps = effective_receptive_fields(net.model, batches, layers)
    radii = {name: mass_radius(m) for name, m in maps.items()}
    for name, r in radii.items():
        print(f"  {name}: 90 % of the gradient mass within {r:.1f} px of the centre")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    plot_erf(maps, args.output, title=f"Effective receptive field of the centre unit ({net.description}, "
                                      f"{len(tiles)} tiles, {size[0]}x{size[1]})")
    npz = args.output.parent / "erf.npz"
    np.savez(npz, maps=np.stack(list(maps.values())), layers=np.array(list(maps)),
             r90=np.array(list(radii.values())))
    print(f"wrote {args.output} and {npz} ({len(maps)} layers)")
    return 0
