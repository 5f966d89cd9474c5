import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from weakseg.cli import main
from weakseg.data.dfc2020 import DFC2020Dataset
from weakseg.errors import ConfigError
from weakseg.pipeline.pseudomasks import KILL_AFTER_ENV, check_checkpoint_matches_data
from weakseg.tasks.classification import load_classifier


def read_masks(folder):
    out = {}
    for p in sorted(folder.glob("*.tif")):
        with rasterio.open(p) as src:
            out[p.stem] = src.read(1)
    return out


@pytest.mark.parametrize("method", ["attention", "gradcam", "top_class"])
def test_every_tile_gets_a_mask_and_a_manifest_row(tiny_checkpoint, tiny_dfc, tmp_path, method, capsys):
    out = tmp_path / method
    assert main(["pseudomasks", "--model_checkpoint", str(tiny_checkpoint), "--datadir", str(tiny_dfc),
                 "--method", method, "--output", str(out), "--batch_size", "5"]) == 0
    reader = DFC2020Dataset(tiny_dfc, "validation")
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert [r["id"] for r in rows] == reader.ids  # one row per tile, dataset order
    assert all(r["status"] in ("ok", "fallback") and r["reason"] and r["method"] == method for r in rows)
    masks = read_masks(out)
    assert set(masks) == set(reader.ids)
    with rasterio.open(out / f"{reader.ids[0]}.tif") as src, rasterio.open(reader.source_path(0)) as ref:
        assert src.dtypes[0] == "uint8" and src.shape == (32, 32)
        assert src.crs == ref.crs and src.transform == ref.transform  # georeference carried over
    assert all(m.max() < 8 for m in masks.values())
    printed = capsys.readouterr().out
    assert "24/24 tiles written" in printed and "mIoU" in printed  # summary and scores table


def test_oracle_uses_ground_truth_labels(tiny_checkpoint, tiny_dfc, tmp_path):
    out = tmp_path / "oracle"
    assert main(["pseudomasks", "--model_checkpoint", str(tiny_checkpoint), "--datadir", str(tiny_dfc),
                 "--oracle", "--output", str(out)]) == 0
    reader = DFC2020Dataset(tiny_dfc, "validation")
    rows = {r["id"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    for i, tid in enumerate(reader.ids):
        gt = [reader.class_names[c] for c in np.flatnonzero(reader[i]["label"].numpy())]
        assert rows[tid]["labels"] == ";".join(gt)


def test_killed_run_resumes_to_identical_outputs(tiny_checkpoint, tiny_dfc, tmp_path):
    def run(out, env_extra=None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
        return subprocess.run([sys.executable, "-m", "weakseg.cli", "pseudomasks", "--model_checkpoint",
                               str(tiny_checkpoint), "--datadir", str(tiny_dfc), "--output", str(out),
                               "--batch_size", "4"], env=env, capture_output=True, text=True, timeout=300)

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert run(reference).returncode == 0
    killed = run(resumed, {KILL_AFTER_ENV: "10"})
    assert killed.returncode != 0  # SIGKILL in the middle of the run
    assert not (resumed / "manifest.csv").exists()
    assert 10 <= len(list(resumed.glob("*.tif"))) < 24
    again = run(resumed)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "14 this run" in again.stdout or "this run" in again.stdout
    a, b = read_masks(reference), read_masks(resumed)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert (reference / "manifest.csv").read_text() == (resumed / "manifest.csv").read_text()
    assert not list(resumed.glob(".*.tmp"))


def test_output_folder_of_another_run_is_refused(tiny_checkpoint, tiny_dfc, tmp_path, capsys):
    out = tmp_path / "pm"
    base = ["pseudomasks", "--model_checkpoint", str(tiny_checkpoint), "--datadir", str(tiny_dfc), "--output", str(out)]
    assert main(base) == 0
    assert main([*base, "--method", "gradcam"]) == 2
    err = capsys.readouterr().err
    assert "holds masks of another run" in err and "method was 'attention', now 'gradcam'" in err
    assert main([*base, "--method", "gradcam", "--overwrite"]) == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.tif").write_bytes(b"")
    assert main([*base[:-1], str(foreign)]) == 2
    assert "no weakseg run wrote" in capsys.readouterr().err
    assert main([*base[:-1], str(foreign), "--overwrite"]) == 2  # --overwrite never deletes files we did not write
    assert "no weakseg run wrote" in capsys.readouterr().err and (foreign / "x.tif").exists()


def test_unreadable_tile_is_recorded_not_dropped(tiny_checkpoint, tiny_dfc, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_dfc, data)
    bad = sorted((data / "ROIs0000_validation" / "s2_validation").glob("*.tif"))[3]
    bad.write_bytes(b"not a tiff")
    out = tmp_path / "pm"
    assert main(["pseudomasks", "--model_checkpoint", str(tiny_checkpoint), "--datadir", str(data),
                 "--output", str(out)]) == 0
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert len(rows) == 24
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert len(skipped) == 1 and bad.name in skipped[0]["reason"] and skipped[0]["file"] == ""
    assert len(list(out.glob("*.tif"))) == 23
    printed = capsys.readouterr().out
    assert "skipped" in printed
    # the run succeeds (skipping with a reason is the design) but says why no score table follows
    assert "scores not computed: 1 of 24 tile(s) were skipped (unreadable, see manifest.csv)" in printed
    assert "mIoU" not in printed and not (out / "scores.json").exists()


def test_checkpoint_must_match_the_data(tiny_checkpoint, tmp_path):
    from weakseg.data.synthetic import generate_synthetic_dfc2020

    task = load_classifier(tiny_checkpoint)
    small = tmp_path / "small"
    generate_synthetic_dfc2020(small, {"validation": 2, "test": 0}, tile_size=16, seed=0)
    with pytest.raises(ConfigError, match="16x16, smaller than the input 32x32"):
        check_checkpoint_matches_data(task, DFC2020Dataset(small), tiny_checkpoint)
    with pytest.raises(ConfigError, match="expects 13 input channels .* gives 15 .*--multimodal"):
        check_checkpoint_matches_data(task, DFC2020Dataset(small, modality="s1s2"), tiny_checkpoint)

    class OtherClasses:
        class_names = ("water", "land")

    with pytest.raises(ConfigError, match="trained on classes .* but the data has \\['water', 'land'\\]"):
        check_checkpoint_matches_data(task, OtherClasses(), tiny_checkpoint)
