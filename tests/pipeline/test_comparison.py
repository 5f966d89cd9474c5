"""The fair comparison's specification: classifiers, methods per architecture, the table, the commands it names."""

import pytest

from weakseg.cli import build_parser
from weakseg.commands.pseudomasks import method_options_from_args
from weakseg.commands.train import resolve_config
from weakseg.methods import METHODS, get_method
from weakseg.pipeline.comparison import CLASSIFIERS, DEMO_PRUNING, METHODS_BY_ARCH, pipeline_commands
from weakseg.pipeline.tables import format_comparison_table


@pytest.mark.parametrize("arch", sorted(METHODS_BY_ARCH))
def test_every_compared_method_reads_its_architecture_with_valid_options(arch):
    for spec in METHODS_BY_ARCH[arch]:
        method = get_method(spec.method, **spec.options_dict())
        assert arch in METHODS[spec.method].architectures, (arch, spec.key)
        assert method.options_dict().items() >= spec.options_dict().items()
    keys = [m.key for m in METHODS_BY_ARCH[arch]]
    assert len(keys) == len(set(keys)) and sum(m.floor for m in METHODS_BY_ARCH[arch]) == 1


def test_classifiers_cover_both_architectures_pruned_and_unpruned():
    assert {(c.arch, c.prune) for c in CLASSIFIERS} == {(a, p) for a in METHODS_BY_ARCH for p in (True, False)}


@pytest.mark.parametrize("classifier", [c.name for c in CLASSIFIERS])
def test_named_commands_reproduce_the_pipeline(classifier):
    """The commands the demo prints parse, and give the compared classifier and method."""
    spec = next(c for c in CLASSIFIERS if c.name == classifier)
    method = METHODS_BY_ARCH[spec.arch][-1]
    text = pipeline_commands({"classifier": classifier, "method": method.key})
    train_cmd, pm_cmd = (part.split("`")[1] for part in text.split(", then ")[:2])
    cfg = resolve_config(build_parser().parse_args(train_cmd.split()[1:]))
    assert cfg.arch == spec.arch and cfg.prune == spec.prune
    if spec.prune:
        assert {k: getattr(cfg, k) for k in DEMO_PRUNING} == DEMO_PRUNING
    args = build_parser().parse_args([*pm_cmd.split()[1:], "--model_checkpoint", "c", "--datadir", "d",
                                      "--output", "o"])
    assert args.method == method.method and method_options_from_args(args) == method.options_dict()


def _row(classifier, method, label, miou, holdout=None, test=None, floor=False):
    return {"classifier": classifier, "classifier_label": classifier.upper(), "method": method, "label": label,
            "floor": floor, "train": {"miou": miou, "oa": 0.5, "aa": 0.4},
            "holdout": {"miou": holdout} if holdout is not None else None,
            "test": {"miou": test} if test is not None else None, "macro_f1": 0.7, "epoch": 3, "pruned": "2/8"}


def test_comparison_table_groups_rows_by_checkpoint_and_names_the_best():
    rows = [_row("a", "top_class", "floor", 0.30, 0.31, floor=True), _row("a", "gradcam", "Grad-CAM", 0.40, 0.41),
            _row("b", "x", "X", 0.50, 0.52), _row("b", "refined_1", "refined, iteration 1", 0.55, test=0.53),
            _row("", "supervised", "supervised UNet (upper bound)", 0.8, test=0.7)]
    best = {"label": "B + X", "holdout_miou": 0.52}
    lines = format_comparison_table(rows, best).splitlines()
    titles = [line for line in lines if "checkpoint of epoch 3" in line]
    assert [t.split(":")[0] for t in titles] == ["A", "B"]  # one group title per classifier, in order
    assert any(line.startswith("refined with a UNet: B + X") for line in lines)
    gradcam = next(line for line in lines if "Grad-CAM" in line)
    assert gradcam.split()[-2:] == ["40.0", "41.0"]  # train mIoU, holdout mIoU
    assert lines[-1] == "best pipeline (chosen on the holdout, mIoU 52.0): B + X"


def test_a_second_refined_pipeline_gets_its_own_group_title():
    rows = [_row("a", "gradcam", "Grad-CAM", 0.40, 0.41), _row("b", "weaktr_fused", "WeakTr fused", 0.5, 0.5),
            {**_row("a", "refined_1", "refined, iteration 1", 0.45, test=0.4), "refines": "gradcam"},
            {**_row("b", "refined_weaktr_1", "refined (weaktr pipeline), iteration 1", 0.48, test=0.4),
             "refines": "weaktr_fused", "refines_label": "WeakTr fused"}]
    best = {"label": "A + Grad-CAM", "holdout_miou": 0.41, "classifier": "a", "method": "gradcam"}
    lines = format_comparison_table(rows, best).splitlines()
    titles = [line for line in lines if line.startswith("refined with a UNet")]
    assert titles == ["refined with a UNet: A + Grad-CAM", "refined with a UNet: B + WeakTr fused"]


def test_oracle_holdout_scores_every_method_with_ground_truth_labels(tiny_dfc, tmp_path):
    """ViT-PCM in the comparison: each row has the holdout scored with predicted and with ground-truth labels;
    the label-free mode (--masking none) reads no labels, so its two scores agree."""
    from weakseg.pipeline.comparison import ComparisonConfig, run_comparison

    small = {"imgsize": [32, 32], "embed_dim": 24, "depth": 2, "num_heads": 4, "train_batch_size": 8}
    res = run_comparison(ComparisonConfig(datadir=str(tiny_dfc), output_dir=str(tmp_path), vit_epochs=1,
                                          iterations=0, supervised=False, classifiers=("pcm_unpruned",),
                                          train_overrides=small, oracle_holdout=True), progress=lambda line: None)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {m.key for m in METHODS_BY_ARCH["pcm"]}
    assert all(0 <= r["holdout_oracle"]["miou"] <= 1 for r in rows.values())
    assert rows["pcm_all"]["holdout_oracle"]["miou"] == rows["pcm_all"]["holdout"]["miou"]
    assert (tmp_path / "pseudomasks" / "pcm_unpruned" / "pcm_holdout_oracle" / "manifest.csv").is_file()
