"""``weakseg attention`` and its extraction (weakseg.methods.attention_maps): per-head maps, 60 % mass, PNGs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from weakseg.cli import main
from weakseg.errors import ConfigError
from weakseg.methods.attention_maps import (
    crop_to_patch_multiple,
    mass_fractions,
    token_attention,
    vit_config_from_state_dict,
)
from weakseg.models.vit import build_vit


def _pruned_vit(**kw):
    torch.manual_seed(0)
    model = build_vit(img_size=32, patch_size=8, in_chans=3, embed_dim=24, depth=2, num_heads=4, **kw)
    with torch.no_grad():
        for gate in model.gates:
            gate.log_alpha.fill_(5.0)
        model.blocks[1].attn.gate.log_alpha.view(-1)[2] = -5.0  # prune head 2 of block 1
    return model.eval()


def test_mass_fraction_of_a_known_map():
    # sorted 0.5, 0.2, 0.2, 0.1: 0.5 alone holds < 60 %, 0.5 + 0.2 = 70 % >= 60 %: 2 of the 4 patches
    attn = np.array([[0.5, 0.2], [0.2, 0.1]])
    assert mass_fractions(attn, 0.6) == pytest.approx(0.5)
    assert mass_fractions(attn, 0.5) == pytest.approx(0.25)
    assert mass_fractions(attn, 1.0) == pytest.approx(1.0)
    assert mass_fractions(np.zeros((2, 3, 3)), 0.6).tolist() == [0.0, 0.0]  # pruned heads: empty sets


def test_attention_shapes_per_head_and_pruned_heads_all_zero():
    model = _pruned_vit()
    att = token_attention(model, torch.randn(2, 3, 35, 43), [0, -1])  # cropped to 32 x 40: a 4 x 5 grid
    assert att.blocks == [0, 1]
    assert att.maps.shape == (2, 2, 1, 4, 4, 5)  # (B, blocks, tokens, heads, h, w)
    assert att.kept.tolist() == [[True] * 4, [True, True, False, True]]
    assert (att.maps[:, 1, :, 2] == 0).all()
    kept = att.maps[:, 1, :, [0, 1, 3]]
    assert (kept > 0).all()
    assert float(att.maps[:, 0].sum(dim=(-2, -1)).max()) <= 1.0 + 1e-5  # patch part of a softmax row
    assert att.probs.shape == (2, 8)


def test_class_token_models_give_one_map_per_token():
    model = _pruned_vit(num_classes=3, num_cls_tokens=3, head_type="per_class")
    att = token_attention(model, torch.randn(1, 3, 32, 32), [-1])
    assert att.maps.shape == (1, 1, 3, 4, 4, 4)
    assert (att.maps[0, 0, :, 2] == 0).all()


def test_crop_and_block_errors():
    assert crop_to_patch_multiple(torch.zeros(3, 17, 9), 8).shape == (3, 16, 8)
    with pytest.raises(ConfigError, match="smaller than one"):
        crop_to_patch_multiple(torch.zeros(3, 7, 9), 8)
    with pytest.raises(ConfigError, match="block 5 does not exist"):
        token_attention(_pruned_vit(), torch.randn(1, 3, 32, 32), [5])


def test_shape_is_read_from_a_timm_state_dict(tmp_path):
    sd = build_vit(img_size=32, patch_size=8, in_chans=3, embed_dim=24, depth=2, num_heads=4, gated=False,
                   num_classes=5, mlp_ratio=3.0).state_dict()
    cfg, prefix = vit_config_from_state_dict(sd, tmp_path / "x.pth", num_heads=4)
    assert (cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.depth, cfg.num_classes, prefix) == (8, 3, 24, 2, 5, 1)
    assert cfg.img_size == (32, 32) and cfg.mlp_ratio == 3.0 and not cfg.gated
    with pytest.raises(ConfigError, match="--num_heads"):
        vit_config_from_state_dict(sd, tmp_path / "x.pth")
    sd384 = build_vit(img_size=16, patch_size=16, in_chans=3, embed_dim=384, depth=1, num_heads=6).state_dict()
    assert vit_config_from_state_dict(sd384, tmp_path / "y.pth")[0].num_heads == 6
    with pytest.raises(ConfigError, match="embed_dim 24, not 48"):
        vit_config_from_state_dict(sd, tmp_path / "x.pth", embed_dim=48, num_heads=4)


def test_cli_writes_pngs_and_json_for_a_checkpoint(tiny_checkpoint, tiny_dfc, tmp_path, capsys):
    from weakseg.tasks.classification import load_classifier

    out = tmp_path / "att"
    code = main(["attention", "--checkpoint", str(tiny_checkpoint), "--datadir", str(tiny_dfc), "--tiles", "2",
                 "--blocks", "0", "-1", "--output", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert f"wrote 2 PNGs to {out}" in stdout
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    with Image.open(pngs[0]) as im:
        assert im.size[0] > 400 and im.size[1] > 200  # 1 + 4 panels wide, 2 rows
    report = json.loads((out / "attention.json").read_text())
    assert report["blocks"] == [0, 1] and report["mass"] == 0.6
    kept = load_classifier(tiny_checkpoint).model.head_mask()
    tile = report["tiles"][0]
    assert tile["input_size"] == [32, 32] and tile["grid"] == [4, 4]
    assert len(tile["heads"]) == 2 * 4
    for h in tile["heads"]:
        assert h["kept"] == bool(kept[h["block"], h["head"]])
        assert 0 < h["mass_fraction"] <= 1 if h["kept"] else h["mass_fraction"] == 0


def _timm_file(tmp_path, in_chans=3):
    torch.manual_seed(1)
    model = build_vit(img_size=32, patch_size=8, in_chans=in_chans, embed_dim=24, depth=2, num_heads=4, gated=False,
                      num_classes=5)
    path = tmp_path / "vit_timm.pth"
    torch.save(model.state_dict(), path)
    return path


def test_cli_reads_a_timm_state_dict_and_crops_images_to_the_patch_grid(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 45, 3), dtype=np.uint8)).save(images / "photo.png")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(images / "grey.jpg")  # read as RGB
    out = tmp_path / "out"
    code = main(["attention", "--timm_checkpoint", str(_timm_file(tmp_path)), "--num_heads", "4", "--images",
                 str(images), "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.png")) == ["grey.png", "photo.png"]
    tiles = {t["id"]: t for t in json.loads((out / "attention.json").read_text())["tiles"]}
    assert tiles["photo"]["input_size"] == [32, 40] and tiles["photo"]["grid"] == [4, 5]  # 37 x 45 cropped
    assert tiles["grey"]["input_size"] == [40, 40]
    assert all(h["kept"] and h["block"] == 1 for h in tiles["photo"]["heads"])


def test_a_timm_file_without_num_heads_asks_for_it(tmp_path, capsys):
    code = main(["attention", "--timm_checkpoint", str(_timm_file(tmp_path)), "--images", str(tmp_path),
                 "--output", str(tmp_path / "o")])
    assert code == 2 and "--num_heads" in capsys.readouterr().err


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope.ckpt"
    code = main(["attention", "--checkpoint", str(missing), "--images", str(tmp_path), "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and "does not exist" in err


def test_image_with_the_wrong_channel_count(tiny_checkpoint, tmp_path, capsys):
    image = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    code = main(["attention", "--checkpoint", str(tiny_checkpoint), "--images", str(image), "--output",
                 str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and str(image) in err and "3 channels" in err and "13 input channels" in err


def test_folder_without_readable_images(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("x")
    code = main(["attention", "--timm_checkpoint", str(_timm_file(tmp_path)), "--num_heads", "4", "--images",
                 str(folder), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and str(folder) in err and "broken.png" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["attention", "--timm_checkpoint", str(_timm_file(tmp_path)), "--num_heads", "4", "--images",
                 str(empty), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and str(empty) in err and "holds no images" in err


def test_token_choice_of_class_token_models():
    from weakseg.commands.attention import _token_rows

    probs = torch.tensor([0.1, 0.9, 0.3])
    names = ["water", "forest", "urban"]
    assert _token_rows("top", probs, 3, names) == ([1], "class token 'forest' (p = 0.90)")
    assert _token_rows("urban", probs, 3, names)[0] == [2]
    assert _token_rows("0", probs, 3, names)[0] == [0]
    assert _token_rows("all", probs, 3, names)[0] == [0, 1, 2]
    assert _token_rows("mean", probs, 3, names)[0] == "mean"
    assert _token_rows("top", probs[:1], 1, names) == ([0], "CLS token")
    for bad, n in (("7", 3), ("lava", 3), ("2", 1)):
        with pytest.raises(ConfigError, match="--token"):
            _token_rows(bad, probs, n, names)
