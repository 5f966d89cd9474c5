"""`weakseg demo` end to end: a tiny --fast run in the default suite, the full run marked slow."""

import json

import pytest
from PIL import Image

from weakseg.cli import main
from weakseg.pipeline.comparison import CLASSIFIERS, DEMO_CLASSIFIERS, METHODS_BY_ARCH

FIGURES = ("pseudomasks.png", "class_attention.png", "attention_heads.png", "gates_vit_pruned.png",
           "gates_class_tokens_pruned.png")


def check_outputs(out, iterations):
    results = json.loads((out / "results.json").read_text())
    table = results["table"]
    # Every classifier has its group, and every method it can run has a row in that group.
    for spec in (c for c in CLASSIFIERS if c.name in DEMO_CLASSIFIERS):
        assert spec.label in table, spec.label
        rows = {r["method"] for r in results["rows"] if r["classifier"] == spec.name}
        assert rows >= {m.key for m in METHODS_BY_ARCH[spec.arch]}, spec.name
    assert f"refined, iteration {iterations}" in table and "supervised UNet (upper bound)" in table
    # The best pipeline is chosen on the holdout among the non-floor rows, and named.
    best = results["best"]
    candidates = [r for r in results["rows"] if r["holdout"] and not r["floor"]]
    assert best["holdout_miou"] == max(r["holdout"]["miou"] for r in candidates)
    assert best["label"] in table
    # One checkpoint per row: the row's score (and its metric) and heads pruned are those of the checkpoint's
    # description.
    for r in results["rows"]:
        if r["classifier"] and not r["method"].startswith("refined"):
            described = results["classifiers"][r["classifier"]]["best"]
            assert r["checkpoint_score"] == described["val_score"] and r["epoch"] == described["epoch"]
            assert r["checkpoint_metric"] == described["monitor"] == "val_map"
    for name in FIGURES:
        with Image.open(out / "figures" / name) as im:
            assert im.size[0] > 200 and im.size[1] > 100
    assert (out / "config.yaml").is_file() and (out / "comparison.yaml").is_file()
    return results


def test_demo_fast_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--output_dir", str(out)]) == 0
    results = check_outputs(out, 1)
    printed = capsys.readouterr().out
    assert "attention clustering, rank rule (paper)" in printed and "figures:" in printed
    assert f"best pipeline: {results['best']['label']}" in printed
    # Classifiers train on the training part and choose their checkpoint on the holdout, never on 'test'.
    for run in results["classifiers"].values():
        assert run["train_split"] == "validation:train" and run["val_split"] == "validation:holdout"
    # The demo draws its own figures; its inner train / pseudomasks / refine runs draw none (time).
    assert [p.parent for p in out.rglob("figures")] == [out]


@pytest.mark.slow
def test_full_demo(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--output_dir", str(out)]) == 0
    results = check_outputs(out, 1)
    assert results["seconds"] < 600
