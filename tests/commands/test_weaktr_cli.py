"""WeakTr through the real CLI on the built-in Sentinel data: train -> pseudomasks -> evaluate, S2 and S1+S2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_VIT_FLAGS
from weakseg.cli import main
from weakseg.tasks.classification import load_classifier


@pytest.mark.parametrize("modality", ["s2", "s1s2"])
def test_weaktr_train_pseudomasks_evaluate(tiny_dfc: Path, tmp_path: Path, modality: str, capsys) -> None:
    run = tmp_path / "run"
    extra = ["--multimodal"] if modality == "s1s2" else []
    assert main(["train", "--datadir", str(tiny_dfc), "--arch", "weaktr", "--prune", "--output_dir", str(run),
                 *extra, *TINY_VIT_FLAGS]) == 0
    ckpt = run / "checkpoints" / "best.ckpt"
    task = load_classifier(ckpt)
    assert task.hparams["arch"] == "weaktr" and task.model_config.aaf == "v2"
    assert task.model_config.in_chans == (15 if modality == "s1s2" else 13)
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "train_coarse_bce" in header and "train_fine_bce" in header  # the three losses are trained
    masks = tmp_path / "masks"
    assert main(["pseudomasks", "--model_checkpoint", str(ckpt), "--datadir", str(tiny_dfc), "--split",
                 "validation:holdout", "--method", "weaktr", "--output", str(masks), "--batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert "weaktr" in out and "mIoU" in out  # scored against the holdout's masks
    rows = list(csv.DictReader((masks / "manifest.csv").open()))
    assert len(rows) == 5 and all(r["method"] == "weaktr" for r in rows)
    multi = [r for r in rows if r["reason"].startswith("weaktr_argmax")]  # land cover: argmax among labels
    assert all(r["status"] == "ok" for r in multi)
    run_json = json.loads((masks / "run.json").read_text())
    assert run_json["method_options"]["scales"] == "1,1.2" and run_json["method_options"]["flip"] == "on"
    assert main(["evaluate", "--datadir", str(tiny_dfc), "--split", "validation:holdout", "--predictions",
                 str(masks)]) == 0
    refined = tmp_path / "refine"  # WeakTr's phase 2: Segmenter with the gradient-clipping loss
    assert main(["refine", "--datadir", str(tiny_dfc), "--pseudomasks", str(masks), "--split", "validation:holdout",
                 "--eval_split", "test", "--model_checkpoint", str(ckpt), "--model", "segmenter", "--loss", "clip",
                 "--encoder_checkpoint", str(ckpt), "--epochs", "1", "--output", str(refined), "--no-figures"]) == 0
    # the encoder took the WeakTr classifier's shape (and its S1 + S2 fusion)
    import yaml

    resolved = yaml.safe_load((refined / "config.yaml").read_text())["config"]
    shape = load_classifier(ckpt).model_config
    assert resolved["encoder_checkpoint"] == str(ckpt)
    assert (resolved["embed_dim"], resolved["depth"], resolved["num_heads"]) == (shape.embed_dim, shape.depth,
                                                                                 shape.num_heads)
    summary = json.loads((refined / "summary.json").read_text())
    assert summary["iterations"][1]["eval_scores"]["miou"] is not None


def test_weaktr_flags_need_the_weaktr_arch(tiny_dfc: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--datadir", str(tiny_dfc), "--arch", "class_tokens", "--aaf", "v1", "--output_dir",
                 str(tmp_path / "r"), *TINY_VIT_FLAGS]) == 2
    assert "--aaf configure WeakTr's heads and need --arch weaktr" in capsys.readouterr().err


def test_weaktr_loads_a_timm_checkpoint_with_the_cls_token_repeated(tmp_path: Path) -> None:
    from weakseg.models.architectures import get_architecture
    from weakseg.models.pretrained import load_pretrained
    from weakseg.models.vit import ViTConfig, build_vit
    from weakseg.models.architectures import build_classifier

    source = build_vit(img_size=(32, 32), patch_size=8, in_chans=3, embed_dim=24, depth=2, num_heads=4,
                       num_classes=10, gated=False)
    torch.save(source.state_dict(), tmp_path / "deit.pth")
    cfg = ViTConfig(img_size=(48, 48), patch_size=8, in_chans=13, embed_dim=24, depth=2, num_heads=4,
                    num_classes=5, final_norm=False, **get_architecture("weaktr").model_fields(5))
    model = build_classifier(cfg)
    load_pretrained(model, tmp_path / "deit.pth")
    for c in range(5):  # every class token (and its position) starts as the CLS token
        torch.testing.assert_close(model.cls_token[0, c], source.cls_token[0, 0])
        torch.testing.assert_close(model.pos_embed[0, c], source.pos_embed[0, 0])
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert model.pos_embed.shape == (1, 5 + 36, 24)  # patch positions resized 4x4 -> 6x6
