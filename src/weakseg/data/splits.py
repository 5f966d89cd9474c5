"""A validation subset carved from the training split: where checkpoints, thresholds and settings are chosen.

Weakly supervised results are reported on two things: the pseudomasks of the training tiles and a segmenter on a
held-out split. Choosing the classifier checkpoint, a threshold or a method on either of them leaks the reported
numbers into the choice. So every choice is made on a **holdout**: a fixed part of the *training* split that the
classifier does not train on (its image labels choose the checkpoint; where the dataset has masks, they choose
thresholds and methods). The reported numbers come from the rest of the training split and the held-out split.

A split name may name a part of a split::

    validation            every tile of the split
    validation:train      the split without its holdout (what the classifier trains on)
    validation:holdout    the holdout

**Which tiles.** The holdout is the ``ceil(HOLDOUT_FRACTION * N)`` tiles (at least one, at most ``N - 1``) whose
``sha256("weakseg-holdout:<HOLDOUT_SEED>:<tile id>")`` is smallest. The rule depends only on the tile ids, not on
their order or on anything random at run time, so every command (train, pseudomasks, evaluate, refine) resolves
the same tiles, and adding tiles to a dataset moves few existing ones between the parts.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from weakseg.errors import DataError

#: Fraction of a split's tiles in its holdout.
HOLDOUT_FRACTION = 0.2
#: Seed of the hash that orders tiles for the holdout (change it for a different but equally fixed holdout).
HOLDOUT_SEED = 0
#: Names of the two parts of a split.
SPLIT_PARTS = ("train", "holdout")


def parse_split(name: str) -> tuple[str, str | None]:
    """``"validation:holdout"`` -> ``("validation", "holdout")``; ``"validation"`` -> ``("validation", None)``.

    Raises:
        DataError: the part after ``:`` is not one of :data:`SPLIT_PARTS`, or the split name is empty.
    """
    base, sep, part = str(name).partition(":")
    if not base:
        raise DataError(f"split {name!r} has no name before ':'")
    if not sep:
        return base, None
    if part not in SPLIT_PARTS:
        raise DataError(
            f"split {name!r}: the part after ':' must be one of {list(SPLIT_PARTS)} "
            f"(e.g. {base}:train, {base}:holdout)"
        )
    return base, part


def _order_key(tile_id: str, seed: int) -> str:
    return hashlib.sha256(f"weakseg-holdout:{seed}:{tile_id}".encode()).hexdigest()


def holdout_ids(ids: Sequence[str], fraction: float = HOLDOUT_FRACTION, seed: int = HOLDOUT_SEED) -> set[str]:
    """The tiles of a split that form its holdout (see the module docstring).

    Raises:
        DataError: fewer than two tiles (a holdout needs one and training needs one).
    """
    if len(ids) < 2:
        raise DataError(
            f"a split of {len(ids)} tile(s) cannot be divided into a training part and a holdout; "
            "use the whole split (no ':train' / ':holdout')"
        )
    count = min(len(ids) - 1, max(1, math.ceil(fraction * len(ids))))
    return set(sorted(ids, key=lambda t: _order_key(t, seed))[:count])


def part_indices(ids: Sequence[str], part: str | None) -> list[int]:
    """Indices (in the split's order) of the tiles in ``part`` (None: all tiles)."""
    if part is None:
        return list(range(len(ids)))
    held = holdout_ids(ids)
    return [i for i, t in enumerate(ids) if (t in held) == (part == "holdout")]
