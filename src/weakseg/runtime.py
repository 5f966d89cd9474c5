"""CPU threads and DataLoader workers, chosen from the machine the command runs on.

**Why.** torch sizes its intra-op thread pool from the machine's cores, not from the CPUs this process may use
(a container's ``taskset``/cgroup affinity, a SLURM allocation) and not from the other processes a command starts:
two weakseg runs side by side on 2 cores with default threads each ran 10x slower than with one thread each
(thread pools fighting over the same cores), and the ranks of a CPU DDP run multiply the pool by their number.
Every ``weakseg`` command therefore takes ``--threads N`` (default: ``OMP_NUM_THREADS`` when set, else the CPUs in
this process's affinity mask), and :func:`configure_threads` gives each process its share.

**Workers.** A DataLoader worker is a whole process that takes a core from the training step. On a small machine
the tile store (``weakseg prepare``) reads a tile in a fraction of a millisecond and the step dominates, so the
main process builds the samples (0 workers); with 8 or more CPUs a quarter of them (at most 4) build samples while
the rest compute (``benchmarks/data.py`` measures both sides).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("weakseg")

#: CPUs below which DataLoader workers cost the step more than they save.
MIN_CPUS_FOR_WORKERS = 8
#: Most DataLoader workers chosen by default.
MAX_DEFAULT_WORKERS = 4


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (Linux), else ``os.cpu_count()``; at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def env_threads() -> int | None:
    """``OMP_NUM_THREADS`` as a positive int, or None when unset or not a positive integer."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n >= 1 else None


#: The whole command's thread count, passed to the processes it starts (a DDP rank re-runs the command and must
#: divide the same total, not its own already-divided ``OMP_NUM_THREADS``).
TOTAL_THREADS_ENV = "WEAKSEG_THREADS"


def default_threads() -> int:
    """The thread count a command uses without ``--threads``: in a DDP rank the launching command's total
    (``WEAKSEG_THREADS``, read only where ``LOCAL_RANK`` says this is a launched rank), else ``OMP_NUM_THREADS``,
    else :func:`available_cpus`."""
    inherited = os.environ.get(TOTAL_THREADS_ENV, "")
    if "LOCAL_RANK" in os.environ and inherited.isdigit() and int(inherited) >= 1:
        return int(inherited)
    return env_threads() or available_cpus()


def default_num_workers(num_processes: int = 1) -> int:
    """DataLoader workers per process by default: 0 below :data:`MIN_CPUS_FOR_WORKERS` CPUs per process, else a
    quarter of them, at most :data:`MAX_DEFAULT_WORKERS` (module docstring)."""
    cpus = available_cpus() // max(1, num_processes)
    if cpus < MIN_CPUS_FOR_WORKERS:
        return 0
    return min(MAX_DEFAULT_WORKERS, cpus // 4)


def threads_per_process(threads: int, num_processes: int) -> int:
    """Each of ``num_processes`` processes sharing ``threads`` threads gets ``threads // num_processes``, >= 1."""
    return max(1, int(threads) // max(1, int(num_processes)))


def configure_threads(threads: int | None = None, num_processes: int = 1) -> int:
    """Set this process's intra-op threads to its share of ``threads`` (default :func:`default_threads`).

    ``OMP_NUM_THREADS`` is set too, before torch is imported where possible (numpy's BLAS reads it at import) and
    for the processes this one starts (DDP ranks re-run the command; DataLoader workers use one thread each).
    Returns the threads of this process.
    """
    total = default_threads() if threads is None else int(threads)
    if total < 1:
        from weakseg.errors import ConfigError

        raise ConfigError(f"--threads must be at least 1, got {threads}")
    per_process = threads_per_process(total, num_processes)
    if num_processes > 1:  # for the ranks Lightning launches
        os.environ[TOTAL_THREADS_ENV] = str(total)
    else:  # nothing to pass on: a later command of this process, or a child it starts, chooses afresh
        os.environ.pop(TOTAL_THREADS_ENV, None)
    os.environ["OMP_NUM_THREADS"] = str(per_process)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(per_process)
    return per_process
