"""configs/*.yaml are exactly what the code runs: the demo's pruning recipe, the paper preset, the released class-token
setup (issue 8: cpu_demo.yaml once held only ``prune: true`` while the recipe lived in code)."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_VIT_FLAGS
from weakseg.cli import build_parser, main
from weakseg.commands.train import resolve_config
from weakseg.config import load_yaml
from weakseg.pipeline.comparison import DEMO_PRUNING
from weakseg.pipeline.train import PRESETS, TRAIN_CHECKS, TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: The released TokenMasking-WSSS setup (token_masking.md 1.1 and 3) as configs/class_tokens_paper.yaml claims it.
RELEASED_CLASS_TOKENS = {
    "arch": "class_tokens", "class_token_head": "flatten", "token_mask_rate": 0.5, "num_register_tokens": 1,
    "prune": True, "pr_rate": 0.01, "target_pruned_fraction": None, "gate_init": None, "l0_normalize": False,
    "l0_warmup_steps": 0, "gate_lr_scale": 1.0,
}


def resolved(*argv: str) -> TrainConfig:
    return resolve_config(build_parser().parse_args(["train", *argv]))


def typed(layer: dict) -> dict:
    """A YAML layer with its values coerced as the command reads them (1e-3 -> 0.001, 3 -> 3.0 for a float)."""
    from weakseg.config import check_layer

    return check_layer(TrainConfig, layer, "test", TRAIN_CHECKS)


def test_every_config_file_is_checked_here() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == ["class_tokens_paper.yaml", "cpu_demo.yaml",
                                                                 "paper.yaml"]


def test_cpu_demo_yaml_is_the_demo_pruning_recipe() -> None:
    assert typed(load_yaml(CONFIGS / "cpu_demo.yaml")) == {"prune": True, **DEMO_PRUNING}


def test_paper_yaml_is_the_paper_preset_and_resolves_the_same() -> None:
    assert typed(load_yaml(CONFIGS / "paper.yaml")) == typed(PRESETS["paper"])
    assert resolved("--config", str(CONFIGS / "paper.yaml")) == resolved("--preset", "paper")


def test_class_tokens_paper_yaml_is_the_released_setup() -> None:
    cfg = resolved("--config", str(CONFIGS / "class_tokens_paper.yaml"))
    assert {k: getattr(cfg, k) for k in RELEASED_CLASS_TOKENS} == RELEASED_CLASS_TOKENS
    assert typed(load_yaml(CONFIGS / "class_tokens_paper.yaml")) == RELEASED_CLASS_TOKENS


def test_demo_pruning_lists_every_pruning_setting_so_new_defaults_cannot_change_the_demo() -> None:
    pruning = {"target_pruned_fraction", "pr_rate", "l0_normalize", "l0_warmup_steps", "gate_lr_scale", "gate_init"}
    assert pruning <= set(DEMO_PRUNING)
    assert pruning <= set(PRESETS["paper"])
    demo = dataclasses.replace(TrainConfig(prune=True), **DEMO_PRUNING)
    assert (demo.target_pruned_fraction, demo.pr_rate, demo.gate_init) == (None, 0.35, 1.0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_paper_preset_trains_with_xavier_gates_and_the_plain_summed_l0(tiny_dfc, tmp_path) -> None:
    """Through the real CLI: no target, Xavier-uniform log alpha, loss = BCE + 0.2 * sum over heads of P(open)."""
    out = tmp_path / "paper"
    assert main(["train", "--preset", "paper", "--datadir", str(tiny_dfc), "--output_dir", str(out), *TINY_VIT_FLAGS,
                 "--accumulate_grad", "1", "--max_steps", "2", "--val_split", "none"]) == 0
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    hp = ckpt["hyper_parameters"]
    assert (hp["target_pruned_fraction"], hp["pr_rate"], hp["l0_normalize"], hp["l0_warmup_steps"],
            hp["gate_lr_scale"], hp["model"]["gate_init"]) == (None, 0.2, False, 0, 1.0, None)
    alphas = torch.cat([v.flatten() for k, v in ckpt["state_dict"].items() if k.endswith("log_alpha")])
    bound = (6 / (4 + 1)) ** 0.5  # Xavier-uniform on (1, 4, 1, 1), plus 2 steps of lr 1e-3
    assert alphas.numel() == 8 and alphas.abs().max() <= bound + 0.01 and alphas.unique().numel() == 8
    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r.get("train_l0")]
    assert rows and "train_target_pruned" not in rows[0]
    for r in rows:
        assert float(r["train_loss"]) == pytest.approx(float(r["train_bce"]) + 0.2 * float(r["train_l0"]), rel=1e-5)
        assert 2 < float(r["train_l0"]) < 8  # summed over the 8 heads (P(open) ~ 0.45-0.8 each), not averaged
