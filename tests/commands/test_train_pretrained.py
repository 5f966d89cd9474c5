"""``weakseg train --pretrained FILE``: a timm / DeiT / DINO checkpoint really is where training starts.

Each run trains one epoch with a learning rate of 1e-30 (the CLI refuses 0) and no weight decay: AdamW moves
a weight by about the learning rate, far below the spacing of float32 numbers near the file's values, so every
optimiser step leaves the weights where they started and the saved checkpoint must hold the file's tensors
(adapted where the shapes differ).
If ``--pretrained`` were ignored, the checkpoint would hold the random initialisation instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_VIT_FLAGS
from weakseg.cli import main
from weakseg.models.pretrained import adapt_patch_kernel
from weakseg.models.vit import build_vit

D, DEPTH, HEADS = 24, 2, 4  # TINY_VIT_FLAGS' backbone
FROZEN = ["--learning_rate", "1e-30", "--weight_decay", "0", "--val_split", "none", "--seed", "3"]


def write_checkpoint(path: Path, layout: str = "deit") -> dict[str, torch.Tensor]:
    """An RGB ViT (patch 8, 32x32: 4x4 grid, 1000 classes) in timm's key layout, saved the way DeiT, timm or
    DINO save them.

    Returns the plain state dict (timm names). Values are drawn far from the model's own initialisation
    (trunc-normal 0.02 / LayerNorm ones), so a checkpoint that ignored the file cannot match by chance.
    """
    torch.manual_seed(123)
    src = build_vit(img_size=(32, 32), patch_size=8, in_chans=3, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                    num_classes=1000, gated=False)
    sd = {k: torch.randn_like(v) for k, v in src.state_dict().items()}
    if layout == "deit":  # {"model": {...}} as DeiT's releases
        torch.save({"model": sd, "epoch": 299}, path)
    elif layout == "dino":  # {"teacher": {"backbone.<name>": ...}} as DINO's full checkpoints, no classifier
        torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("head.")},
                    "epoch": 100}, path)
    else:  # "timm": a bare state dict with DDP's "module." prefix
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    return sd


def train(tiny_dfc: Path, out: Path, *extra: str) -> dict:
    argv = ["train", "--datadir", str(tiny_dfc), "--output_dir", str(out), *TINY_VIT_FLAGS, *FROZEN, *extra]
    assert main(argv) == 0
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] > 0  # the optimiser really stepped
    return {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}


def assert_backbone_is_the_files(trained: dict, src: dict, in_chans: int) -> None:
    for name, value in src.items():
        if name.startswith(("patch_embed.", "head.", "cls_token", "pos_embed")):
            continue
        assert torch.equal(trained[name], value), name  # blocks.*, norm.*
    torch.testing.assert_close(trained["patch_embed.proj.weight"],
                               adapt_patch_kernel(src["patch_embed.proj.weight"], in_chans, 8))
    assert torch.equal(trained["patch_embed.proj.bias"], src["patch_embed.proj.bias"])
    assert torch.equal(trained["pos_embed"][0, -16:], src["pos_embed"][0, 1:])  # same 4x4 grid: unchanged


@pytest.mark.parametrize("layout", ["deit", "timm"])
def test_vit_run_starts_from_the_checkpoint(tiny_dfc: Path, tmp_path: Path, layout: str) -> None:
    src = write_checkpoint(tmp_path / f"{layout}.pth", layout)
    trained = train(tiny_dfc, tmp_path / "run", "--pretrained", str(tmp_path / f"{layout}.pth"))
    assert_backbone_is_the_files(trained, src, in_chans=13)
    assert torch.equal(trained["cls_token"], src["cls_token"])
    assert torch.equal(trained["pos_embed"], src["pos_embed"])
    assert trained["head.weight"].shape == (8, D)  # 1000 ImageNet classes -> 8 DFC classes: a new head
    assert trained["head.weight"].abs().max() < 0.1  # the model's own trunc-normal(0.02) init, not the file's


def test_class_token_run_starts_every_class_token_and_the_register_at_the_files_cls(tiny_dfc: Path,
                                                                                    tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "dino.pth", "dino")
    trained = train(tiny_dfc, tmp_path / "run", "--arch", "class_tokens",
                    "--pretrained", str(tmp_path / "dino.pth"))
    assert_backbone_is_the_files(trained, src, in_chans=13)
    cls = trained["cls_token"]
    assert cls.shape == (1, 8, D)
    for c in range(8):
        assert torch.equal(cls[0, c], src["cls_token"][0, 0]), c
    pos = trained["pos_embed"]
    assert pos.shape == (1, 8 + 1 + 16, D)  # 8 class tokens + 1 register + 4x4 patches
    for p in range(9):
        assert torch.equal(pos[0, p], src["pos_embed"][0, 0]), p
    assert trained["head.weight"].shape == (8, D)  # the per-class head: one row per class


def test_multimodal_sum_fusion_gets_both_embeddings_from_the_rgb_kernel(tiny_dfc: Path,
                                                                        tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "deit.pth")
    trained = train(tiny_dfc, tmp_path / "run", "--multimodal", "--fusion", "sum", "--prune",
                    "--target_pruned_fraction", "none",  # no target: it would close half of the gates by rank
                    "--gate_init", "1.5", "--pretrained", str(tmp_path / "deit.pth"))
    assert_backbone_is_the_files(trained, src, in_chans=13)  # S2: the first 13 channels
    torch.testing.assert_close(trained["patch_embed_s1.proj.weight"],
                               adapt_patch_kernel(src["patch_embed.proj.weight"], 2, 8))
    assert trained["patch_embed_s1.proj.bias"].abs().max() < 1e-20  # zeros (moved by at most the lr)
    for b in range(DEPTH):  # gates are not in such files: they keep --gate_init
        assert (trained[f"blocks.{b}.attn.gate.log_alpha"] == 1.5).all()


def test_bad_pretrained_files_are_user_errors(tiny_dfc: Path, tmp_path: Path, capsys) -> None:
    base = ["train", "--datadir", str(tiny_dfc), "--output_dir", str(tmp_path / "run"), *TINY_VIT_FLAGS,
            *FROZEN]
    assert main([*base, "--pretrained", str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err
    assert f"pretrained checkpoint {tmp_path / 'missing.pth'} does not exist (--pretrained)" in err
    assert "Traceback" not in err
    write_checkpoint(tmp_path / "deit.pth")
    assert main([*base, "--embed_dim", "48", "--pretrained", str(tmp_path / "deit.pth")]) == 2
    assert "has embed_dim 24 but the model has 48 (--embed_dim)" in capsys.readouterr().err
    assert main([*base, "--depth", "3", "--pretrained", str(tmp_path / "deit.pth")]) == 2
    assert "has 2 blocks but the model has depth 3 (--depth)" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training
