"""Shared fixtures: tiny synthetic DFC2020 data (generated once per session) and the real sample patch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two-core CI machine: keep intra-op threads predictable.
torch.set_num_threads(min(2, os.cpu_count() or 1))

FIXTURES = Path(__file__).parent / "fixtures"
REAL_DFC_SAMPLE = FIXTURES / "dfc2020_sample"


@pytest.fixture(scope="session")
def tiny_dfc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic DFC2020-layout data: 24 training tiles and 8 test tiles of 32x32."""
    from weakseg.data.synthetic import generate_synthetic_dfc2020

    root = tmp_path_factory.mktemp("tiny_dfc")
    generate_synthetic_dfc2020(root, num_tiles={"validation": 24, "test": 8}, tile_size=32, seed=3)
    return root


@pytest.fixture()
def real_dfc() -> Path:
    return REAL_DFC_SAMPLE


TINY_VIT_FLAGS = ["--embed_dim", "24", "--depth", "2", "--num_heads", "4", "--patch_size", "8", "--imgsize", "32",
                  "--train_batch_size", "8", "--num_epochs", "1"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dfc: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gated ViT trained for one epoch on the tiny data through the real CLI."""
    from weakseg.cli import main

    out = tmp_path_factory.mktemp("tiny_run")
    assert main(["train", "--datadir", str(tiny_dfc), "--prune", "--output_dir", str(out), *TINY_VIT_FLAGS]) == 0
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(autouse=True)
def _skip_run_figures(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs draw no figures unless the test is marked ``figures``: drawing adds about a second per run, which
    summed to ~15 s over the pipeline tests; the figure tests (marked) draw them and check the files."""
    if request.node.get_closest_marker("figures") is None:
        import weakseg.pipeline.run_figures as run_figures

        monkeypatch.setattr(run_figures, "_guarded", lambda command, draw: [])
