"""Benchmark: start-up time of the ``weakseg`` command, per sub-command, against importing everything.

A user measured every command spending ~55 s starting around ~14 s of work on a busy machine. Most of a command's
start-up is imports: torch (~1.5 s here), Lightning (~5 s, it pulls in torch's compiler stack), the methods. The
CLI used to build every sub-command's parser, so every command, even ``weakseg evaluate`` (which needs neither
torch nor Lightning) paid for all of them. It now imports only the command that runs
(:data:`weakseg.commands.COMMANDS`).

Each figure is the median wall time of fresh interpreters (``python -c ...``, a new process each time, so nothing
is cached in-process; the OS file cache is warm after the first run). Printed per command: the time to build its
parser and quieten logging as ``weakseg <command>`` does before its work starts, and the same with every command's
parser built (the old behaviour, measured in the same run as the reference), with their ratio::

    python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

# What ``weakseg <command>`` does before its work: parse (its parser alone) and set up logging.
NOW = ("from weakseg.cli import build_parser, chosen_command, setup_logging; "
       "a = build_parser(chosen_command({argv!r})).parse_args({argv!r}); "
       "setup_logging(False, lightning=getattr(a, 'uses_lightning', True))")
# The old behaviour: every command's parser built, Lightning always imported.
BEFORE = ("from weakseg.cli import build_parser, setup_logging; "
          "a = build_parser('all').parse_args({argv!r}); setup_logging(False, lightning=True)")

COMMAND_LINES = {
    "evaluate": ["evaluate", "--predictions", "p", "--datadir", "d", "--split", "test"],
    "make-data": ["make-data", "out"],
    "train": ["train"],
    "pseudomasks": ["pseudomasks", "--model_checkpoint", "c", "--datadir", "d", "--split", "test", "--output", "o"],
    "refine": ["refine", "--pseudomasks", "p", "--datadir", "d"],
    "demo": ["demo"],
}


def wall(code: str, repeats: int) -> float:
    """Median seconds of ``python -c code`` over ``repeats`` fresh processes."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    wall("import weakseg", 1)  # warm the file cache
    python = wall("pass", args.repeats)
    print(f"python start-up alone: {python:.2f} s; import torch: {wall('import torch', args.repeats):.2f} s; "
          f"import lightning: {wall('import lightning', args.repeats):.2f} s (median of {args.repeats})\n")
    print(f"{'command':<12} {'start-up now (s)':>17} {'all parsers (s)':>16} {'ratio':>6}")
    for name, argv in COMMAND_LINES.items():
        now = wall(NOW.format(argv=argv), args.repeats)
        before = wall(BEFORE.format(argv=argv), args.repeats)
        print(f"{name:<12} {now:>17.2f} {before:>16.2f} {before / now:>5.1f}x")


if __name__ == "__main__":
    main()
