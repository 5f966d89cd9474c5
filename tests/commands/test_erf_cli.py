"""``weakseg erf``: one PNG of ERF heatmaps and erf.npz, for a classifier and for a refine checkpoint."""

import numpy as np
import torch
from PIL import Image

from weakseg.cli import main


def test_erf_of_a_classifier(tiny_checkpoint, tiny_dfc, tmp_path, capsys):
    out = tmp_path / "erf" / "erf.png"
    code = main(["erf", "--checkpoint", str(tiny_checkpoint), "--datadir", str(tiny_dfc), "--tiles", "5",
                 "--batch_size", "2", "--layers", "4", "--output", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "3 batch(es)" in stdout and f"wrote {out}" in stdout
    with Image.open(out) as im:
        assert im.size[0] > 500
    data = np.load(out.parent / "erf.npz")
    # depth 2: patch embedding, block 0, block 1; 4 layers asked: all three
    assert data["layers"].tolist() == ["patch embedding", "block 0", "block 1"]
    maps = data["maps"]
    assert maps.shape == (3, 32, 32)
    inside = np.zeros((32, 32), dtype=bool)
    inside[16:24, 16:24] = True  # the centre patch of the 4 x 4 grid
    assert (maps[0][inside] > 0).all() and (maps[0][~inside] == 0).all()
    assert (maps[-1][~inside] > 0).any()
    assert data["r90"][-1] > data["r90"][0]


def _refine_checkpoint(tmp_path):
    import lightning as L

    from weakseg.tasks.segmentation import SegmentationTask

    torch.manual_seed(0)
    task = SegmentationTask(in_chans=13, num_classes=8, widths=[8, 16, 32], tile_size=[32, 32])
    path = tmp_path / "refine" / "iter1" / "unet.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return path


def test_erf_of_a_refine_unet(tiny_dfc, tmp_path, capsys):
    out = tmp_path / "unet_erf.png"
    code = main(["erf", "--checkpoint", str(_refine_checkpoint(tmp_path)), "--datadir", str(tiny_dfc), "--tiles",
                 "2", "--layers", "3", "--output", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "refine unet" in stdout and "not normalised" in stdout
    data = np.load(tmp_path / "erf.npz")
    assert data["layers"].tolist() == ["stem", "encoder 2", "output"]
    stem = data["maps"][0]
    support = np.argwhere(stem > 0)
    assert support.min(axis=0).tolist() == [14, 14] and support.max(axis=0).tolist() == [18, 18]


def test_bad_input(tmp_path, tiny_checkpoint, capsys):
    missing = tmp_path / "missing.ckpt"
    code = main(["erf", "--checkpoint", str(missing), "--images", str(tmp_path), "--output", str(tmp_path / "e.png")])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err
    code = main(["erf", "--checkpoint", str(tiny_checkpoint), "--images", str(tmp_path), "--output",
                 str(tmp_path / "erf.jpg")])
    assert code == 2 and "must be a .png" in capsys.readouterr().err
    image = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    code = main(["erf", "--checkpoint", str(tiny_checkpoint), "--images", str(image), "--output",
                 str(tmp_path / "e.png")])
    err = capsys.readouterr().err
    assert code == 2 and str(image) in err and "13 input channels" in err
    not_a_model = tmp_path / "other.ckpt"
    torch.save({"hyper_parameters": {}, "state_dict": {}}, not_a_model)
    code = main(["erf", "--checkpoint", str(not_a_model), "--images", str(image), "--output", str(tmp_path / "e.png")])
    err = capsys.readouterr().err
    assert code == 2 and "neither a weakseg classifier" in err and str(not_a_model) in err
