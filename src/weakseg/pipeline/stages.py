"""Resume bookkeeping of multi-stage runs: completion markers, setting fingerprints, reuse and invalidation.

A stage (one refinement iteration, or the supervised run) writes everything atomically into its folder and
``done.json`` last, so a folder with the marker is complete. The marker records the stage's *fingerprint*:
the settings that change what the stage computes. A re-run reuses a finished stage only when the fingerprint
is the same; other settings are refused with a message listing what changed (silently retraining would
overwrite results the user may want, silently reusing would mix settings). A stage that is redone makes
every later iteration stale, since those were trained on its old output.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weakseg.config import to_plain
from weakseg.errors import ConfigError
from weakseg.io import atomic_write_json

if TYPE_CHECKING:
    from weakseg.pipeline.refine import RefineConfig

DONE_FILE = "done.json"
#: Prefix of the iteration folders (``iter0``, ``iter1``, ...).
ITERATION_PREFIX = "iter"
#: Settings that change what a stage computes; a finished stage recorded with other values is not reused.
FINGERPRINT_KEYS = (
    "datadir", "pseudomasks", "dataset", "split", "modality", "normalization", "band_stats", "epochs",
    "batch_size", "lr", "lr_schedule", "widths", "seed", "augment", "min_confidence", "classifier",
    "label_weighting", "model", "loss", "clip_start", "clip_window", "optimizer", "encoder_lr_scale", "patch_size",
    "embed_dim", "depth", "num_heads", "decoder_depth", "pretrained", "window", "stride", "predict_scales",
    "predict_flip", "encoder_checkpoint", "freeze_encoder",
)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or unreadable (an unfinished stage)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def stage_fingerprint(cfg: RefineConfig, band_stats: Sequence[Sequence[float]] | None,
                      supervised: bool) -> dict[str, Any]:
    """The values of :data:`FINGERPRINT_KEYS` for one stage, as plain JSON-able values.

    Paths are resolved so that a relative and an absolute spelling of one folder match. ``band_stats`` are
    the ones actually used (computed on the split when not given). The supervised stage trains on the ground
    truth, so the pseudomask folder and ``min_confidence`` do not change it and are recorded as None.
    """
    values = {key: getattr(cfg, key) for key in FINGERPRINT_KEYS}
    values["datadir"] = str(Path(cfg.datadir).resolve())
    uses_pseudomasks = not supervised and cfg.pseudomasks is not None
    values["pseudomasks"] = str(Path(str(cfg.pseudomasks)).resolve()) if uses_pseudomasks else None
    values["min_confidence"] = None if supervised else float(cfg.min_confidence)
    values["classifier"] = str(Path(cfg.classifier).resolve()) if cfg.classifier else None
    values["band_stats"] = band_stats
    values["widths"] = [int(w) for w in cfg.widths]
    return to_plain(values)


def check_reusable(stage_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The stage's done record, or None if unfinished.

    Raises:
        ConfigError: the stage was finished with other settings; the message lists each changed setting with
            its recorded and current value.
    """
    done = read_json(Path(stage_dir) / DONE_FILE)
    if done is None:
        return None
    recorded = done.get("fingerprint") or {}
    changed = sorted(key for key in fingerprint if recorded.get(key) != fingerprint[key])
    if changed:
        details = "; ".join(f"{key}: {recorded.get(key)!r} then, {fingerprint[key]!r} now" for key in changed)
        raise ConfigError(
            f"{stage_dir} was finished with other settings ({details}); choose a new output folder "
            f"(--output) or delete {stage_dir} to redo it"
        )
    return done


def unmark(stage_dir: Path) -> None:
    """Remove the stage's marker before rewriting it: a crash midway must not leave an old marker."""
    (Path(stage_dir) / DONE_FILE).unlink(missing_ok=True)


def mark_done(stage_dir: Path, done: dict[str, Any]) -> None:
    """Write the stage's marker (last, after every other file of the stage)."""
    atomic_write_json(Path(stage_dir) / DONE_FILE, done)


def iteration_dir(out: Path, iteration: int) -> Path:
    """``out/iter{iteration}``."""
    return Path(out) / f"{ITERATION_PREFIX}{iteration}"


def invalidate_later_iterations(out: Path, iteration: int) -> None:
    """Iterations after a retrained one were made from masks that no longer exist: unmark them."""
    for stage_dir in Path(out).glob(f"{ITERATION_PREFIX}*"):
        suffix = stage_dir.name[len(ITERATION_PREFIX):]
        if suffix.isdigit() and int(suffix) > iteration:
            unmark(stage_dir)
