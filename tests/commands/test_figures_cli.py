"""Figures from ``weakseg train``, ``pseudomasks`` and ``refine`` on a folder dataset, through the CLI.

Each command writes its PNGs into ``<output>/figures/``; ``--no-figures`` writes none; a drawing failure is a warning,
never a failed run; ``--figure_tiles`` is range-checked like every setting.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from weakseg.cli import main

pytestmark = pytest.mark.figures

TINY = ["--imgsize", "32", "--patch_size", "8", "--embed_dim", "24", "--depth", "2", "--num_heads", "4",
        "--train_batch_size", "4", "--num_epochs", "2"]


def make_class_folder(root: Path, num_classes: int, n: int = 10, size: int = 32, bands: int = 4,
                      masks: bool = True) -> Path:
    """A folder dataset (the layout of tests/data/test_folder.py's make_folder) with ``num_classes`` classes:
    each tile split into two half-planes of two classes, every class used, and labels.csv."""
    (root / "images").mkdir(parents=True)
    names = [f"class{c:02d}" for c in range(num_classes)]
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    rng = np.random.default_rng(0)
    rows = ["id,labels"]
    if masks:
        (root / "masks").mkdir()
    for i in range(n):
        tid = f"tile_{i:03d}"
        a, b = i % num_classes, (i + 1) % num_classes
        mask = np.full((size, size), a, np.uint8)
        mask[:, size // 2:] = b
        image = rng.integers(0, 2000, (bands, size, size)).astype(np.uint16) + mask.astype(np.uint16) * 600
        with rasterio.open(root / "images" / f"{tid}.tif", "w", driver="GTiff", height=size, width=size,
                           count=bands, dtype="uint16") as dst:
            dst.write(image)
        if masks:
            Image.fromarray(mask).save(root / "masks" / f"{tid}.png")
        rows.append(f"{tid},{names[a]};{names[b]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def pngs(folder: Path) -> list[str]:
    found = sorted(p.name for p in folder.glob("*.png"))
    for name in found:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return found


@pytest.fixture(scope="module")
def run12(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """12 classes (more than the old 10-colour palette), a pruned classifier and its attention pseudomasks."""
    tmp = tmp_path_factory.mktemp("figures12")
    data = make_class_folder(tmp / "data", 12)
    train = tmp / "train"
    assert main(["train", "--dataset", "folder", "--datadir", str(data), "--output_dir", str(train), "--prune",
                 *TINY]) == 0
    masks = tmp / "masks"
    assert main(["pseudomasks", "--model_checkpoint", str(train / "checkpoints" / "best.ckpt"), "--datadir",
                 str(data), "--split", "all", "--output", str(masks), "--method", "attention",
                 "--figure_tiles", "3"]) == 0
    return {"tmp": tmp, "data": data, "train": train, "masks": masks}


def test_train_writes_curves_and_the_gate_map(run12) -> None:
    figures = run12["train"] / "figures"
    assert pngs(figures) == ["gates_best.png", "training_curves.png"]
    summary = json.loads((run12["train"] / "summary.json").read_text())
    assert sorted(Path(p).name for p in summary["figures"]) == ["gates_best.png", "training_curves.png"]


def test_pseudomasks_write_panels_and_per_head_maps_of_the_sampled_tiles(run12) -> None:
    found = pngs(run12["masks"] / "figures")
    assert "pseudomasks.png" in found
    assert len([n for n in found if n.startswith("attention_heads_tile_")]) == 2  # the first 2 of 3 tiles


def test_a_rerun_draws_the_same_tiles_to_the_same_bytes(run12) -> None:
    figures = run12["masks"] / "figures"
    before = {name: (figures / name).read_bytes() for name in pngs(figures)}
    assert main(["pseudomasks", "--model_checkpoint", str(run12["train"] / "checkpoints" / "best.ckpt"), "--datadir",
                 str(run12["data"]), "--split", "all", "--output", str(run12["masks"]), "--method", "attention",
                 "--figure_tiles", "3"]) == 0  # every tile done: a resume that only redraws
    assert {name: (figures / name).read_bytes() for name in pngs(figures)} == before


def test_refine_writes_iteration_panels_and_the_miou_curve(run12) -> None:
    out = run12["tmp"] / "refine"
    assert main(["refine", "--dataset", "folder", "--datadir", str(run12["data"]), "--split", "all",
                 "--pseudomasks", str(run12["masks"]), "--output", str(out), "--epochs", "1",
                 "--widths", "8", "16", "--figure_tiles", "2"]) == 0
    assert pngs(out / "figures") == ["miou_per_iteration.png", "refine_panels.png"]
    assert len(json.loads((out / "summary.json").read_text())["figures"]) == 2


def test_no_figures_writes_none(run12) -> None:
    tmp, data = run12["tmp"], run12["data"]
    train = tmp / "train_nofig"
    assert main(["train", "--dataset", "folder", "--datadir", str(data), "--output_dir", str(train), "--prune",
                 *TINY[:-2], "--num_epochs", "1", "--no-figures"]) == 0
    masks = tmp / "masks_nofig"
    assert main(["pseudomasks", "--model_checkpoint", str(run12["train"] / "checkpoints" / "best.ckpt"),
                 "--datadir", str(data), "--split", "all", "--output", str(masks), "--method", "attention",
                 "--no-figures"]) == 0
    refined = tmp / "refine_nofig"
    assert main(["refine", "--dataset", "folder", "--datadir", str(data), "--split", "all", "--pseudomasks",
                 str(masks), "--output", str(refined), "--epochs", "1", "--widths", "8", "16",
                 "--no-figures"]) == 0
    for folder in (train, masks, refined):
        assert not (folder / "figures").exists(), folder
    assert (masks / "manifest.csv").is_file() and (refined / "summary.json").is_file()


def test_without_ground_truth_the_panels_have_no_truth_column_and_refine_no_curve(run12, capsys) -> None:
    tmp = run12["tmp"]
    data = tmp / "data_nomasks"
    shutil.copytree(run12["data"], data, ignore=shutil.ignore_patterns("masks"))
    masks = tmp / "masks_nogt"
    assert main(["pseudomasks", "--model_checkpoint", str(run12["train"] / "checkpoints" / "best.ckpt"),
                 "--datadir", str(data), "--split", "all", "--output", str(masks), "--method", "gradcam"]) == 0
    assert pngs(masks / "figures") == ["pseudomasks.png"]  # gradcam reads no attention: no per-head maps
    out = tmp / "refine_nogt"
    assert main(["refine", "--dataset", "folder", "--datadir", str(data), "--split", "all", "--pseudomasks",
                 str(masks), "--output", str(out), "--epochs", "1", "--widths", "8", "16"]) == 0
    assert pngs(out / "figures") == ["refine_panels.png"]
    assert "no ground-truth masks, so no mIoU-per-iteration figure" in capsys.readouterr().err


def test_a_drawing_failure_is_a_warning_and_the_run_succeeds(run12, monkeypatch, capsys) -> None:
    import weakseg.viz.figures as figures

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(figures, "plot_pseudomask_panel", broken)
    masks = run12["tmp"] / "masks_broken"
    assert main(["pseudomasks", "--model_checkpoint", str(run12["train"] / "checkpoints" / "best.ckpt"),
                 "--datadir", str(run12["data"]), "--split", "all", "--output", str(masks), "--method",
                 "top_class"]) == 0
    assert "weakseg pseudomasks: figures not drawn (RuntimeError: no display)" in capsys.readouterr().err
    assert (masks / "manifest.csv").is_file() and (masks / "summary.json").is_file()
    assert not (masks / "figures" / "pseudomasks.png").exists()


def test_a_skipped_tile_is_left_out_of_the_panels(run12, capsys) -> None:
    data = run12["tmp"] / "data_broken"
    shutil.copytree(run12["data"], data)
    (data / "images" / "tile_003.tif").write_bytes(b"not a tiff")  # unreadable: a 'skipped' manifest row
    masks = run12["tmp"] / "masks_skipped"
    assert main(["pseudomasks", "--model_checkpoint", str(run12["train"] / "checkpoints" / "best.ckpt"),
                 "--datadir", str(data), "--split", "all", "--output", str(masks), "--method", "top_class",
                 "--figure_tiles", "10"]) == 0
    assert "figures not drawn" not in capsys.readouterr().err
    assert pngs(masks / "figures") == ["pseudomasks.png"]


def test_overwrite_removes_the_earlier_runs_figures(run12) -> None:
    masks = run12["tmp"] / "masks_overwritten"
    shutil.copytree(run12["masks"], masks)  # an attention run with its figures
    assert main(["pseudomasks", "--model_checkpoint", str(run12["train"] / "checkpoints" / "best.ckpt"),
                 "--datadir", str(run12["data"]), "--split", "all", "--output", str(masks), "--method", "top_class",
                 "--overwrite", "--no-figures"]) == 0
    assert pngs(masks / "figures") == []  # no figure of the attention run is left to be taken for this one


@pytest.mark.parametrize("command", [
    ["pseudomasks", "--model_checkpoint", "c.ckpt", "--datadir", "d", "--output", "o", "--figure_tiles", "0"],
    ["refine", "--datadir", "d", "--pseudomasks", "p", "--output", "o", "--figure_tiles", "0"],
])
def test_figure_tiles_is_range_checked(tmp_path, monkeypatch, capsys, command) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "--figure_tiles" in err and "Traceback" not in err
