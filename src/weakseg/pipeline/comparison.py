"""A fair comparison of every method on the same classifiers: what ``weakseg demo`` runs once and
``benchmarks/quality.py`` runs over several seeds.

The rules it follows (the README's "Results" section shows its table):

- **Same classifier.** The classifiers are trained on the same tiles with the same seed: the demo's four are the
  one-CLS ViT (``--arch vit``) and the class-token ViT (``--arch class_tokens``), each with and without head
  pruning; ``benchmarks/quality.py`` adds WeakTr (``--arch weaktr``) and ViT-PCM (``--arch pcm``). Every
  method that can read a classifier is run on it, so each row of a classifier's group differs only in the method.
- **Nothing chosen on a reported number.** The classifiers train on ``validation:train`` and pick their
  checkpoint on the image labels of ``validation:holdout`` (:mod:`weakseg.data.splits`). Pseudomasks are made for
  both parts; the holdout's mIoU (it has masks) picks the best pipeline, which alone is refined with the UNet.
  Reported: pseudomask quality on the ``validation:train`` tiles and on ``test`` (each method applied to the test
  tiles directly, the like-for-like reference of the UNet), and the UNet on ``test``.
- **One checkpoint per row.** The holdout score (the ``--checkpoint_metric`` that chose it) and heads pruned of a row are those of the checkpoint whose masks the
  row scores (:func:`weakseg.pipeline.train.describe_checkpoint`), not of the last epoch.
- **Predicted labels.** Every row uses the classifier's predicted image labels (``p > 0.5``), as a user would.
  With ``oracle_holdout`` each row also scores the holdout with the ground-truth image labels (``--oracle``): the
  bound of the map stage alone, which separates a method whose maps fail from one whose label prediction does.
- **Refinement** trains the UNet on the best pipeline's masks of the ``validation:train`` tiles; its predictions
  are weighted by that classifier's image-label probabilities (:mod:`weakseg.pipeline.refine`), on the training
  tiles (the next pseudomasks) and on ``test`` (classifier + UNet, as on new tiles); ``test`` is also scored with
  the UNet alone. The supervised upper bound is scored the same two ways.

Outputs under ``output_dir``: ``classifiers/<name>/`` (runs), ``pseudomasks/<name>/<method>_{train,holdout,test}/``,
``refine/`` (best pipeline), ``supervised/`` (upper bound), ``results.json`` and ``results.txt``.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weakseg.config import save_resolved
from weakseg.io import atomic_write_json, atomic_write_text
from weakseg.pipeline.tables import score_name

log = logging.getLogger("weakseg")

#: Pruning recipe of the comparison's gated ViTs (weakseg additions, documented in the README). With the paper's
#: recipe (Xavier init, lambda 0.2 on the summed penalty, gate lr = lr) a 30-epoch CPU run prunes 75 % of the heads
#: but mostly by the sign of their random init. A faster gate learning rate with an open start lets the task decide
#: which heads stay. Every pruning setting is listed, so a change of the training defaults (the target pruned fraction
#: since issue 8) does not change what the demo trains; configs/cpu_demo.yaml holds the same (a test compares them).
DEMO_PRUNING: dict[str, Any] = {
    "target_pruned_fraction": None, "gate_lr_scale": 5.0, "gate_init": 1.0, "l0_normalize": True, "pr_rate": 0.35,
    "l0_warmup_steps": 100,
}
TRAIN_PART, HOLDOUT_PART = "validation:train", "validation:holdout"
TEST_SPLIT = "test"


@dataclass(frozen=True)
class ClassifierSpec:
    """One classifier of the comparison."""

    name: str
    label: str
    arch: str
    prune: bool


@dataclass(frozen=True)
class MethodSpec:
    """One pseudomask method (with options) run on every classifier it can read."""

    key: str
    label: str
    method: str
    options: tuple[tuple[str, Any], ...] = ()
    floor: bool = False  # the top-class floor is reported but never picked as the best pipeline

    def options_dict(self) -> dict[str, Any]:
        return dict(self.options)


CLASSIFIERS: tuple[ClassifierSpec, ...] = (
    ClassifierSpec("vit_pruned", "ViT (1 CLS), pruned", "vit", True),
    ClassifierSpec("vit_unpruned", "ViT (1 CLS), unpruned", "vit", False),
    ClassifierSpec("class_tokens_pruned", "class tokens, pruned", "class_tokens", True),
    ClassifierSpec("class_tokens_unpruned", "class tokens, unpruned", "class_tokens", False),
    ClassifierSpec("weaktr_pruned", "WeakTr, pruned", "weaktr", True),
    ClassifierSpec("weaktr_unpruned", "WeakTr, unpruned", "weaktr", False),
    ClassifierSpec("pcm_pruned", "ViT-PCM, pruned", "pcm", True),
    ClassifierSpec("pcm_unpruned", "ViT-PCM, unpruned", "pcm", False),
)
#: The classifiers ``weakseg demo`` trains (``benchmarks/quality.py`` trains every one of :data:`CLASSIFIERS`).
DEMO_CLASSIFIERS: tuple[str, ...] = ("vit_pruned", "vit_unpruned", "class_tokens_pruned", "class_tokens_unpruned")
METHODS_BY_ARCH: dict[str, tuple[MethodSpec, ...]] = {
    "vit": (
        MethodSpec("top_class", "top-class floor", "top_class", floor=True),
        MethodSpec("gradcam", "Grad-CAM", "gradcam"),
        MethodSpec("attention_rank", "attention clustering, rank rule (paper)", "attention", (("assign", "rank"),)),
        MethodSpec("attention", "attention clustering (default rule)", "attention"),
    ),
    "class_tokens": (
        MethodSpec("top_class", "top-class floor", "top_class", floor=True),
        MethodSpec("gradcam", "Grad-CAM", "gradcam"),
        MethodSpec("class_attention_released", "class attention as released (mean, threshold)", "class_attention",
                   (("combine", "mean"), ("heads", "all"), ("rule", "threshold"))),
        MethodSpec("class_attention", "class attention (default)", "class_attention"),
    ),
    "weaktr": (
        MethodSpec("top_class", "top-class floor", "top_class", floor=True),
        MethodSpec("gradcam", "Grad-CAM", "gradcam"),
        MethodSpec("class_attention", "class attention (default)", "class_attention"),
        MethodSpec("weaktr_released", "WeakTr fine CAM as released (1, 1.2 + flip)", "weaktr",
                   (("cam", "fine"),)),
        MethodSpec("weaktr_fused", "WeakTr fused CAM (no patch refinement)", "weaktr", (("cam", "fused"),)),
        MethodSpec("weaktr_coarse", "WeakTr coarse CAM (conv head)", "weaktr", (("cam", "coarse"),)),
    ),
    "pcm": (
        MethodSpec("top_class", "top-class floor", "top_class", floor=True),
        MethodSpec("gradcam", "Grad-CAM", "gradcam"),
        MethodSpec("pcm", "ViT-PCM patch argmax (training size)", "pcm", (("masking", "labels"), ("scales", "1"))),
        MethodSpec("pcm_hires", "ViT-PCM patch argmax at 2.5x (as released)", "pcm",
                   (("masking", "labels"), ("scales", "2.5"))),
        MethodSpec("pcm_all", "ViT-PCM patch argmax over all classes (no labels)", "pcm",
                   (("masking", "none"), ("scales", "1"))),
    ),
}


@dataclass
class ComparisonConfig:
    """Settings of one comparison run.

    Attributes:
        datadir: DFC2020-layout data with ``validation`` (split into train/holdout parts) and ``test`` splits.
        output_dir: where everything goes; its stage folders are replaced at the start.
        seed: seed of every classifier and UNet.
        vit_epochs: classifier epochs.
        unet_epochs: UNet epochs per refinement iteration (and of the supervised upper bound).
        iterations: refinement iterations of the best pipeline (0 = none).
        supervised: also train the UNet on the ground truth (upper bound).
        classifiers: names from :data:`CLASSIFIERS` to train.
        train_overrides: extra :class:`~weakseg.pipeline.train.TrainConfig` settings for every classifier.
        refine_overrides: extra :class:`~weakseg.pipeline.refine.RefineConfig` settings.
        oracle_holdout: also score each method's holdout masks made with the ground-truth image labels
            (``holdout_oracle`` of a row; never used to choose anything).
        refine_best_of: architectures whose own best pipeline (on the holdout, among the rows of the method named
            like the architecture) is refined too, beside the best pipeline overall (``benchmarks/quality.py``: WeakTr's refined masks are reported whichever wins).
    """

    datadir: str
    output_dir: str
    seed: int = 0
    vit_epochs: int = 30
    unet_epochs: int = 30
    iterations: int = 1
    supervised: bool = True
    classifiers: tuple[str, ...] = DEMO_CLASSIFIERS
    train_overrides: dict[str, Any] = field(default_factory=dict)
    refine_overrides: dict[str, Any] = field(default_factory=dict)
    refine_best_of: tuple[str, ...] = ()
    oracle_holdout: bool = False


STAGE_DIRS = ("classifiers", "pseudomasks", "refine", "supervised", "refine_weaktr", "refine_pcm")


def _scores(folder: Path, split: str, datadir: str) -> dict[str, Any]:
    from weakseg.data import open_dataset
    from weakseg.evaluation.compare import evaluate_folder

    return evaluate_folder(folder, open_dataset("dfc2020", datadir, split))


def _short(scores: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if scores is None else {k: scores.get(k) for k in ("miou", "oa", "aa", "coverage")}


def run_comparison(cfg: ComparisonConfig, progress: Any = print) -> dict[str, Any]:
    """Train the classifiers, make and score every method's pseudomasks, refine the best pipeline.

    Args:
        cfg: the settings.
        progress: called with one line per stage (``print`` by default).

    Returns:
        The results (also ``output_dir/results.json``): ``rows`` (one per classifier and method, plus the
        refined and supervised rows), ``classifiers`` (training summaries), ``best`` (the chosen pipeline),
        ``table`` (the printed table) and ``seconds``.
    """
    from weakseg.pipeline.pseudomasks import generate_pseudomasks
    from weakseg.pipeline.refine import RefineConfig, refine
    from weakseg.pipeline.train import TrainConfig, train

    t0 = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in STAGE_DIRS:  # only the folders this function writes
        shutil.rmtree(out / name, ignore_errors=True)
    save_resolved(cfg, out, name="comparison.yaml")
    specs = [c for c in CLASSIFIERS if c.name in cfg.classifiers]

    def step(message: str) -> None:
        progress(f"[{time.time() - t0:5.0f}s] {message}")

    runs: dict[str, dict[str, Any]] = {}
    for spec in specs:
        step(f"training the classifier '{spec.label}' ({cfg.vit_epochs} epochs)")
        pruning = DEMO_PRUNING if spec.prune else {}
        tc = TrainConfig(datadir=cfg.datadir, output_dir=str(out / "classifiers" / spec.name), arch=spec.arch,
                         prune=spec.prune, num_epochs=cfg.vit_epochs, seed=cfg.seed, cache_data=True,
                         **{"figures": False, **pruning, **cfg.train_overrides})  # the demo draws its own
        runs[spec.name] = train(tc)

    rows: list[dict[str, Any]] = []
    for spec in specs:
        run = runs[spec.name]
        best = run["best"] or {}
        step(f"pseudomasks from '{spec.label}' (epoch {best.get('epoch')}, holdout "
             f"{score_name(best.get('monitor'))} {best.get('val_score') or float('nan'):.3f}, heads pruned {best.get('pruned_heads')}/"
             f"{best.get('num_heads_total')})")
        for m in METHODS_BY_ARCH[spec.arch]:
            parts = [("train", TRAIN_PART, False), ("holdout", HOLDOUT_PART, False), ("test", TEST_SPLIT, False)]
            if cfg.oracle_holdout:
                parts.append(("holdout_oracle", HOLDOUT_PART, True))
            folders, scores = {}, {}
            for part, split, oracle in parts:
                folder = out / "pseudomasks" / spec.name / f"{m.key}_{part}"
                summary = generate_pseudomasks(Path(run["best_checkpoint"]), Path(cfg.datadir), split, folder,
                                               m.method, method_options=m.options_dict(), oracle=oracle,
                                               progress=False, overwrite=True, batch_size=64, figures=False)
                folders[part] = (folder, summary)
                scores[part] = _short(_scores(folder, split, cfg.datadir))
            rows.append({
                "classifier": spec.name, "classifier_label": spec.label, "method": m.key, "label": m.label,
                "floor": m.floor, "masks": str(folders["train"][0]),
                "train": scores["train"], "holdout": scores["holdout"], "holdout_oracle": scores.get("holdout_oracle"),
                "test": scores["test"],
                "assignment": folders["train"][1].get("assignment"),
                "checkpoint_score": best.get("val_score"), "checkpoint_metric": best.get("monitor"),
                "epoch": best.get("epoch"),
                "pruned": f"{best.get('pruned_heads')}/{best.get('num_heads_total')}",
            })

    candidates = [r for r in rows if not r["floor"]]
    chosen = max(candidates, key=lambda r: r["holdout"]["miou"])
    best_pipeline = {"classifier": chosen["classifier"], "method": chosen["method"],
                     "label": f"{chosen['classifier_label']} + {chosen['label']}",
                     "holdout_miou": chosen["holdout"]["miou"]}
    step(f"best pipeline on the holdout: {best_pipeline['label']} (holdout mIoU "
         f"{100 * best_pipeline['holdout_miou']:.1f})")

    def common_settings(row: dict[str, Any]) -> dict[str, Any]:
        ckpt_data = _data_settings(Path(runs[row["classifier"]]["best_checkpoint"]))
        return {**dict(datadir=cfg.datadir, split=TRAIN_PART, eval_split=TEST_SPLIT, epochs=cfg.unet_epochs,
                       seed=cfg.seed, figures=False, **ckpt_data), **cfg.refine_overrides}

    def refine_rows(row: dict[str, Any], folder: str, prefix: str, label: str) -> tuple[dict[str, Any], list]:
        refined = refine(RefineConfig(pseudomasks=row["masks"], output_dir=str(out / folder),
                                      iterations=cfg.iterations, **common_settings(row)), verbose=False)
        new_rows = []
        for it in refined["iterations"][1:]:
            step(f"  iteration {it['iteration']}: train tiles mIoU {100 * it['train_scores']['miou']:.1f}, test mIoU "
                 f"{100 * it['eval_scores']['miou']:.1f} ({100 * (it.get('ignored_fraction') or 0):.0f}% of the "
                 "target pixels ignored)")
            new_rows.append({
                "classifier": row["classifier"], "classifier_label": row["classifier_label"],
                "method": f"{prefix}_{it['iteration']}", "label": f"{label}, iteration {it['iteration']}",
                "floor": False, "masks": it["masks"], "train": it.get("train_scores"), "holdout": None,
                "test": it.get("eval_scores"), "test_unet_alone": it.get("eval_unet_alone_scores"),
                "ignored_fraction": it.get("ignored_fraction"), "refines": row["method"],
                "refines_label": row["label"],
                "checkpoint_score": row["checkpoint_score"], "checkpoint_metric": row["checkpoint_metric"],
                "epoch": row["epoch"], "pruned": row["pruned"],
            })
        return refined, new_rows

    refined = None
    if cfg.iterations > 0:
        step(f"UNet refinement of the best pipeline's masks ({cfg.iterations} iteration(s), {cfg.unet_epochs} "
             "epochs each)")
        refined, new_rows = refine_rows(chosen, "refine", "refined", "refined")
        rows += new_rows
        arch_of = {c.name: c.arch for c in CLASSIFIERS}
        for family in cfg.refine_best_of:  # e.g. WeakTr's own best pipeline, when it is not the best overall
            family_rows = [r for r in candidates if arch_of[r["classifier"]] == family  # its own method's rows
                           and r["method"].startswith(family)]
            if not family_rows:
                continue
            pick = max(family_rows, key=lambda r: r["holdout"]["miou"])
            step(f"UNet refinement of the best {family} pipeline: {pick['classifier_label']} + {pick['label']} "
                 f"(holdout mIoU {100 * pick['holdout']['miou']:.1f})")
            rows += refine_rows(pick, f"refine_{family}", f"refined_{family}", f"refined ({family} pipeline)")[1]
    supervised = None
    if cfg.supervised:
        step(f"supervised UNet on the ground truth ({cfg.unet_epochs} epochs): the upper bound")
        supervised = refine(RefineConfig(pseudomasks=None, output_dir=str(out / "supervised"), supervised=True,
                                         iterations=1, **common_settings(chosen)), verbose=False)["supervised"]
        rows.append({"classifier": "", "classifier_label": "", "method": "supervised",
                     "label": "supervised UNet (upper bound)", "floor": False, "masks": supervised["masks"],
                     "train": supervised.get("train_scores"), "holdout": None,
                     "test": supervised.get("eval_scores"),
                     "test_unet_alone": supervised.get("eval_unet_alone_scores"), "checkpoint_score": None,
                     "checkpoint_metric": None, "epoch": None,
                     "pruned": ""})

    from weakseg.pipeline.tables import format_comparison_table

    table = format_comparison_table(rows, best_pipeline)
    results = {"rows": rows, "classifiers": runs, "best": best_pipeline, "table": table,
               "refine": refined, "seconds": round(time.time() - t0, 1), "seed": cfg.seed}
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.txt", table + "\n")
    return results


def _data_settings(checkpoint: Path) -> dict[str, Any]:
    """The classifier for the UNet: its input settings (modality, normalisation, band statistics) and itself (the
    image-label probabilities that weight the UNet's predictions)."""
    from weakseg.tasks.classification import load_classifier

    data = dict(load_classifier(checkpoint).hparams["data_config"])
    return {"modality": data["modality"], "normalization": data["normalization"],
            "band_stats": data.get("band_stats"), "classifier": str(checkpoint)}


def pipeline_commands(best: dict[str, Any]) -> str:
    """The ``weakseg`` commands that run the pipeline ``best`` (a ``results["best"]``) on a user's data."""
    spec = next(c for c in CLASSIFIERS if c.name == best["classifier"])
    method = next(m for m in METHODS_BY_ARCH[spec.arch] if m.key == best["method"])
    train = [f"--arch {spec.arch}"]
    if spec.prune:
        train.append("--prune")
        train += [f"--{k}" if v is True else f"--{k} none" if v is None else f"--{k} {v:g}"
                  for k, v in DEMO_PRUNING.items()]
    options = "".join(f" --{k} {v}" for k, v in method.options)
    return (f"`weakseg train {' '.join(train)}`, then `weakseg pseudomasks --method {method.method}{options}`, "
            "then `weakseg refine --model_checkpoint <the classifier>`")
