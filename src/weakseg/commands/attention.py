"""``weakseg attention``: per-head attention maps of a ViT checkpoint, one PNG per tile (DINO style).

For each tile: the tile (true colour, RGB, or bands 1-3) and every head's attention of the class token to the
patches in the chosen block(s) (``--block``, default the last; ``--blocks`` for several, one row each), each
head scaled to its own maximum, the smallest set of patches holding ``--mass`` (0.6) of the head's attention
outlined in white, pruned heads greyed, crossed and labelled (Caron et al., "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021; reference ``ssl_vit.md`` section 2). The maps are the explicit
softmax of :meth:`GatedViT.forward_features`, gated (:mod:`weakseg.methods.attention_maps`).

**Models.** ``--checkpoint``: a ``weakseg train`` classifier of any architecture. A one-CLS ViT shows its CLS
token; a class-token model (``class_tokens``, ``weaktr``) the token chosen by ``--token``: ``top`` (default: the
tile's most probable class), a class index or name, ``mean`` (mean over the class tokens) or ``all`` (one row per
token and block). ``--timm_checkpoint``: a timm / DeiT / DINO state-dict file; its patch size, width, depth and
input channels are read from the tensors, ``--num_heads`` must be given unless the width is 384 (6 heads).

**Tiles.** ``--datadir`` (with ``--dataset``, ``--split``, and ``--tiles N`` for the first N or ``--ids``), or
``--images``: PNG / JPEG (read as RGB) or GeoTIFF files, or folders of them. Inputs are scaled as the folder
reader scales them (uint8 / 255, uint16 / 10000), normalised like the checkpoint's training data (a timm file:
ImageNet mean / std for 3 channels), resized to ``--imgsize`` (default: the classifier's input size; a timm
file: the image's own size) and cropped down to a multiple of the patch size (top-left, as DINO); the position
embeddings are interpolated to the grid.

**Output** (``--output DIR``): ``<id>.png`` per tile and ``attention.json``: per tile, block, token and head,
whether the head is kept and the fraction of the patches in its ``--mass`` set (0 for a pruned head).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weakseg.commands import command_help
from weakseg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: File types ``--images`` reads (PNG / JPEG with pillow as RGB, GeoTIFF with rasterio).


def add_input_arguments(p: argparse.ArgumentParser, default_tiles: int) -> None:
    """The tile options ``weakseg attention`` and ``weakseg erf`` share."""
    g = p.add_argument_group("tiles (--datadir or --images)")
    g.add_argument("--datadir", type=Path, help="dataset root")
    g.add_argument("--dataset", choices=["dfc2020", "folder", "voc"],
                   help="reader (default: the one the checkpoint was trained on, else dfc2020)")
    g.add_argument("--split", default="validation", help="split of --datadir (default: validation)")
    g.add_argument("--tiles", type=int, default=default_tiles,
                   help=f"how many tiles of the split, the first ones (default {default_tiles})")
    g.add_argument("--ids", nargs="+", metavar="ID", help="these tiles of the split instead of the first --tiles")
    g.add_argument("--images", nargs="+", type=Path, metavar="FILE",
                   help="PNG / JPEG (read as RGB) or GeoTIFF files, or folders of them, instead of --datadir")
    g.add_argument("--imgsize", type=int, nargs="+", metavar="PX",
                   help="resize inputs to this size (one or two integers; default: the checkpoint's input size, "
                        "or the image's own size for --timm_checkpoint)")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("attention", help=command_help("attention"), description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_mutually_exclusive_group(required=True)
    m.add_argument("--checkpoint", type=Path, help="classifier checkpoint (weakseg train) or a weakseg pretrain checkpoint (checkpoints/last.ckpt)")
    m.add_argument("--timm_checkpoint", type=Path, help="timm / DeiT / DINO state-dict file (.pth)")
    t = p.add_argument_group("shape of a --timm_checkpoint (read from the file unless given)")
    t.add_argument("--patch_size", type=int, help="patch size (default: the file's; another one resizes the kernel)")
    t.add_argument("--embed_dim", type=int, help="width (checked against the file)")
    t.add_argument("--depth", type=int, help="blocks to use (default: all of the file's)")
    t.add_argument("--num_heads", type=int, help="attention heads (not stored in the file; default 6 for width 384)")
    add_input_arguments(p, default_tiles=4)
    p.add_argument("--block", type=int, default=-1, help="block whose attention is drawn (default -1, the last)")
    p.add_argument("--blocks", type=int, nargs="+", metavar="B", help="several blocks, one row each (overrides --block)")
    p.add_argument("--token", default="top",
                   help="class-token models: 'top' (the tile's most probable class, default), a class index or "
                        "name, 'mean' (over the class tokens) or 'all' (one row per token); one-CLS models: the CLS")
    p.add_argument("--mass", type=float, default=0.6, help="attention mass the outline holds (default 0.6, DINO)")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNGs (default 100)")
    p.add_argument("--output", type=Path, required=True, help="folder for <id>.png and attention.json")
    p.set_defaults(run=run)


# ---- inputs (shared with weakseg erf) ---------------------------------------------------------------------------
@dataclass
class InputTile:
    """One input: its id, the model's view (C, H, W) float tensor and the same pixels unnormalised for display."""

    id: str
    source: str
    image: Any  # torch.Tensor (C, H, W), normalised and resized
    display: Any  # np.ndarray (C, H, W), scaled, unnormalised, resized like ``image``


def _size_arg(imgsize: list[int] | None) -> tuple[int, int] | None:
    if not imgsize:
        return None
    if len(imgsize) > 2 or any(v < 1 for v in imgsize):
        raise ConfigError(f"--imgsize takes one or two positive integers, got {imgsize}")
    return (imgsize[0], imgsize[-1])


def read_image_file(path: Path, channels: int) -> Any:
    """A PNG / JPEG (as RGB) or GeoTIFF file as scaled float32 (C, H, W)
    (:func:`weakseg.data.unlabelled.read_scaled_image`; GeoTIFF no-data as NaN).

    Raises:
        DataError: naming the file, when it cannot be read or its channel count is not ``channels``.
    """
    from weakseg.data.unlabelled import read_scaled_image

    img = read_scaled_image(path, rgb=True)
    if img.shape[0] != channels:
        how = "bands" if path.suffix.lower() in (".tif", ".tiff") else "channels (PNG / JPEG are read as RGB)"
        raise DataError(f"{path} has {img.shape[0]} {how} but the model expects {channels} input channels")
    return img


def _image_files(paths: list[Path]) -> list[Path]:
    from weakseg.data.folder import IMAGE_SUFFIXES

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}) (--images)")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"image {path} does not exist (--images)")
    return files


def load_inputs(args: argparse.Namespace, in_chans: int, data_config: dict[str, Any], size: tuple[int, int] | None,
                imagenet: bool = False) -> list[InputTile]:
    """The tiles of ``--datadir`` / ``--images``, normalised by ``data_config`` (ImageNet mean / std with
    ``imagenet``) and resized to ``size`` (None: their own size).

    Raises:
        ConfigError / DataError: no tiles chosen, both or neither source, an unreadable file, a channel mismatch.
    """
    import torch

    from weakseg.data.normalization import Normalize
    from weakseg.data.transforms import Resize
    from weakseg.methods.attention_maps import IMAGENET_MEAN, IMAGENET_STD

    if (args.datadir is None) == (args.images is None):
        raise ConfigError("give the tiles with either --datadir or --images")
    if args.tiles < 1:
        raise ConfigError(f"--tiles must be at least 1, got {args.tiles}")
    if imagenet and in_chans == 3:
        norm = Normalize("standardize", IMAGENET_MEAN, IMAGENET_STD)
    else:
        norm = Normalize(data_config.get("normalization", "none"), *(data_config.get("band_stats") or (None, None)))
    raw: list[tuple[str, str, Any]] = []  # (id, source, scaled (C, H, W))
    if args.images is not None:
        files = _image_files(list(args.images))
        unreadable = []
        for f in files:
            try:
                raw.append((f.stem, str(f), read_image_file(f, in_chans)))
            except DataError as e:
                if f in args.images:  # a file named on the command line must be readable
                    raise
                unreadable.append(str(e))
                log.warning("skipped: %s", e)
        if not raw:
            raise DataError(f"no readable image among {', '.join(str(p) for p in args.images)}: "
                            + "; ".join(unreadable[:3]))
    else:
        from weakseg.data import open_dataset

        kind = args.dataset or data_config.get("dataset", "dfc2020")
        reader = open_dataset(kind, args.datadir, args.split, modality=data_config.get("modality", "s2"))
        if args.ids:
            index = {tid: i for i, tid in enumerate(reader.ids)}
            missing = [tid for tid in args.ids if tid not in index]
            if missing:
                raise DataError(f"split {args.split!r} of {args.datadir} has no tile(s) {missing[:5]} (--ids)")
            picks = [index[tid] for tid in args.ids]
        else:
            picks = list(range(min(args.tiles, len(reader))))
        if not picks:
            raise DataError(f"split {args.split!r} of {args.datadir} has no tiles")
        for i in picks:
            image = reader.read_image(i)
            if image.shape[0] != in_chans:
                raise DataError(f"{reader.source_path(i)} has {image.shape[0]} bands but the model expects "
                                f"{in_chans} input channels (--dataset, modality)")
            raw.append((reader.ids[i], str(reader.source_path(i)), image))
    tiles = []
    for tid, source, image in raw:
        sample = norm({"image": torch.from_numpy(image.copy())})
        shown = torch.from_numpy(image.copy())
        if size is not None:
            sample = Resize(size)(sample)
            shown = Resize(size)({"image": torch.nan_to_num(shown)})["image"]
        tiles.append(InputTile(tid, source, sample["image"].float(), shown.numpy()))
    return tiles


# ---- the command ------------------------------------------------------------------------------------------------
def _token_rows(choice: str, probs: Any, num_tokens: int, class_names: list[str]) -> tuple[list[int] | str, str]:
    """(token indices or "mean", what the figure says) for one tile."""
    if num_tokens == 1:
        if choice not in ("top", "mean", "all", "0"):
            raise ConfigError(f"--token {choice!r}: the model has one CLS token (use the default)")
        return [0], "CLS token"
    if choice == "all":
        return list(range(num_tokens)), "every class token"
    if choice == "mean":
        return "mean", "mean of the class tokens"
    if choice == "top":
        k = int(probs.argmax())
    elif choice.lstrip("-").isdigit():
        k = int(choice)
        if not 0 <= k < num_tokens:
            raise ConfigError(f"--token {k}: the model has class tokens 0..{num_tokens - 1}")
    elif choice in class_names:
        k = class_names.index(choice)
    else:
        raise ConfigError(f"--token {choice!r}: use top, mean, all, a class index (0..{num_tokens - 1}) or one of "
                          f"{class_names}")
    name = class_names[k] if k < len(class_names) else str(k)
    return [k], f"class token '{name}' (p = {float(probs[k]):.2f})"


def _safe_name(tile_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in tile_id) or "tile"


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from weakseg.io import atomic_write_json
    from weakseg.methods.attention_maps import mass_fractions, token_attention, vit_from_state_dict_file
    from weakseg.viz.figures import plot_attention_grid, render_image

    if not 0.0 < args.mass <= 1.0:
        raise ConfigError(f"--mass must be in (0, 1], got {args.mass}")
    size = _size_arg(args.imgsize)
    if args.checkpoint is not None:
        given = [f"--{k}" for k in ("patch_size", "embed_dim", "depth", "num_heads") if getattr(args, k) is not None]
        if given:
            raise ConfigError(f"{' '.join(given)} describe a --timm_checkpoint; a weakseg checkpoint has its own shape")
        from weakseg.models.architectures import architecture_of
        from weakseg.tasks.classification import load_classifier, read_checkpoint

        ckpt = read_checkpoint(args.checkpoint, "--checkpoint")  # names the flag in the error for a missing file
        if "projector_dim" in (ckpt.get("hyper_parameters") or {}):  # a weakseg pretrain checkpoint
            from weakseg.tasks.pretraining import BarlowTwinsTask

            del ckpt
            task = BarlowTwinsTask.load_from_checkpoint(args.checkpoint, map_location="cpu")
            model = task.backbone.eval()
            class_names = []
            what_model = "Barlow Twins backbone"
        else:
            del ckpt
            task = load_classifier(args.checkpoint)
            model = task.model.eval()
            class_names = list(task.class_names)
            what_model = f"{architecture_of(task.model_config)}"
        data_config = dict(task.hparams.get("data_config") or {})
        size = size or tuple(task.model_config.img_size)
        source = args.checkpoint
        imagenet = False
    else:
        model = vit_from_state_dict_file(args.timm_checkpoint, args.patch_size, args.embed_dim, args.depth,
                                         args.num_heads)
        data_config, class_names, imagenet = {}, [], True
        source, what_model = args.timm_checkpoint, "timm state dict"
    cfg = model.cfg
    print(f"model: {source} ({what_model}; patch {cfg.patch_size}, width {cfg.embed_dim}, depth {cfg.depth}, "
          f"{cfg.num_heads} heads, {cfg.num_cls_tokens} class token(s), "
          f"{int((~model.head_mask()).sum())} of {model.head_mask().numel()} heads pruned)")
    blocks = list(args.blocks) if args.blocks else [args.block]
    tiles = load_inputs(args, cfg.in_chans, data_config, size, imagenet=imagenet)
    args.output.mkdir(parents=True, exist_ok=True)
    records, used = [], set()
    for n, tile in enumerate(tiles, 1):
        att = token_attention(model, tile.image[None], blocks)
        maps = att.maps[0]  # (L, T, heads, h, w)
        tokens, what = _token_rows(args.token, att.probs[0], maps.shape[1], class_names)
        if tokens == "mean":
            maps, labels = maps.mean(dim=1, keepdim=True), ["mean"]
        else:
            maps = maps[:, tokens]
            labels = ["CLS"] if maps.shape[1] == 1 and cfg.num_cls_tokens == 1 else [
                class_names[k] if k < len(class_names) else str(k) for k in tokens]
        L, T = maps.shape[:2]
        grid = maps.reshape(L * T, *maps.shape[2:]).numpy()  # (L*T, heads, h, w), block-major
        kept = att.kept.repeat_interleave(T, dim=0).numpy()  # (L*T, heads)
        row_labels = [str(b) if T == 1 else f"{b} {labels[t]}" for b in att.blocks for t in range(T)]
        H, W = grid.shape[-2] * cfg.patch_size, grid.shape[-1] * cfg.patch_size
        rgb, image_title = render_image(tile.display[:, :H, :W])
        name = _safe_name(tile.id)
        while name in used:
            name += "_"
        used.add(name)
        png = args.output / f"{name}.png"
        outline = f"outline: {args.mass:.0%} of the mass"
        one_row = L * T == 1  # a (heads, h, w) grid: panels named "head <i>"
        plot_attention_grid(grid[0] if one_row else grid, kept[0] if one_row else kept, png, image=rgb,
                            mass=args.mass, layer_indices=None if one_row else row_labels, image_title=image_title,
                            dpi=args.dpi,
                            title=f"{what} attention per head, block{'s' if L > 1 else ''} "
                                  f"{', '.join(map(str, att.blocks))}, tile {tile.id} ({outline})")
        fractions = mass_fractions(grid, args.mass)  # (L*T, heads)
        heads = [{"block": att.blocks[r // T], "token": labels[r % T], "head": h, "kept": bool(kept[r, h]),
                  "mass_fraction": round(float(fractions[r, h]), 6)}
                 for r in range(L * T) for h in range(grid.shape[1])]
        records.append({"id": tile.id, "source": tile.source, "png": png.name, "input_size": [H, W],
                        "grid": list(grid.shape[-2:]), "token": what,
                        "probabilities": [round(float(v), 6) for v in att.probs[0]], "heads": heads})
        kept_frac = [f for f, k in zip(fractions.ravel(), kept.ravel(), strict=True) if k]
        print(f"[{n}/{len(tiles)}] {tile.id}: {H}x{W} px, grid {grid.shape[-2]}x{grid.shape[-1]}, "
              f"{args.mass:.0%} mass in {np.mean(kept_frac) if kept_frac else 0:.0%} of the patches (mean of the "
              f"kept heads) -> {png}")
    atomic_write_json(args.output / "attention.json", {
        "checkpoint": str(source), "model": what_model, "mass": args.mass,
        "blocks": sorted({h["block"] for r in records for h in r["heads"]}), "tiles": records})
    print(f"wrote {len(records)} PNGs to {args.output} (and attention.json)")
    return 0
