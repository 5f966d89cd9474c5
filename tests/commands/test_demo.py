"""`weakseg demo` end to end: a tiny --fast run in the default suite, the full run marked slow."""

import json

import pytest
from PIL import Image

from weakseg.cli import main

ROWS = ("top-class floor", "Grad-CAM", "attention (no pruning)", "attention (pruned)", "refined, iteration 1",
        "supervised UNet (upper bound)")


def check_outputs(out, iterations):
    results = json.loads((out / "results.json").read_text())
    for row in ROWS:
        assert row in results["table"], row
    assert f"refined, iteration {iterations}" in results["table"]
    for name in ("pseudomasks.png", "attention_heads.png", "gates.png"):
        with Image.open(out / "figures" / name) as im:
            assert im.size[0] > 200 and im.size[1] > 100
    assert (out / "config.yaml").is_file()
    return results


def test_demo_fast_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--output_dir", str(out)]) == 0
    check_outputs(out, 1)
    printed = capsys.readouterr().out
    assert "attention (pruned)" in printed and "figures:" in printed


@pytest.mark.slow
def test_full_demo(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--output_dir", str(out)]) == 0
    results = check_outputs(out, 2)
    assert results["seconds"] < 600
