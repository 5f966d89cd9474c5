"""Safe output writing: files complete or absent, checkable on resume, one run per output folder.

**Atomic writes.** Every writer in weakseg (masks, manifests, scores, configs, figures, synthetic tiles) goes
through :func:`atomic_path`: it hands out a hidden temporary name in the target's folder (same file system, so the
final ``os.replace`` is atomic; the process id keeps DDP ranks apart) and moves it into place only when the write
succeeded. A crash or kill leaves at most a ``.<name>.<pid>.tmp`` file, which no reader picks up. Any ``OSError``
(disk full, read-only folder, a path under a file, a name too long) becomes a :class:`WeaksegError` that names the
path, so the CLI prints ``error: cannot write <path>: ...`` instead of a traceback.

**Bytes we write ourselves.** A library that writes a file itself may not report a failed write: GDAL, asked to
write a GeoTIFF on a full disk, prints ``_tiffSeekProc: No space left on device`` and returns normally, leaving a
0-byte file that an atomic rename then moves into place. :func:`atomic_write_bytes` is for such files: the library
encodes into memory, and we write the bytes with ``os.write`` (which raises on a short or failed write), ``fsync``
them, and only then rename. It returns a :class:`FileRecord` (size and sha256 of exactly those bytes); a stage that
resumes stores it (``weakseg pseudomasks``: in each manifest row) and checks the file with :func:`check_file`
before counting it as done, so an empty, truncated or altered file is redone, never trusted.

**Append-only logs.** :func:`append_line` appends one line durably; when the write fails it cuts the file back to
its previous end, so a full disk never leaves half a line that the next run would append onto.
:func:`read_jsonl` / :func:`repair_jsonl` find and drop a line cut by a kill (the one thing no write can prevent).

**One run per folder.** :func:`folder_lock` is a small lock file (``<folder>/.weakseg.lock``) that a stage holds
while it writes into a folder, so two runs into the same output cannot both redo every tile and interleave their
manifests. See its docstring; ``weakseg pseudomasks`` uses it, and train / refine folders can use it the same way.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weakseg.errors import WeaksegError

log = logging.getLogger(__name__)

#: File name of :func:`folder_lock`'s lock inside the locked folder.
LOCK_NAME = ".weakseg.lock"
#: A lock file that holds no readable holder (a process killed between creating and filling it) is stale after this.
_UNREADABLE_LOCK_GRACE_S = 30.0


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed.

    Args:
        durable: ``fsync`` the temporary file before the rename, so a power loss cannot leave an empty file under
            the final name (costs a disk flush per file: use it for outputs a run resumes from).

    Raises:
        WeaksegError: the folder cannot be created or the file cannot be written (the message names it).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if durable:
            _fsync_path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise WeaksegError(f"cannot write {path}: {_os_reason(e)}") from e
    finally:
        with suppress(OSError):  # nothing to clean when the folder itself could not be made
            tmp.unlink(missing_ok=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_reason(e: OSError) -> str:
    """``[Errno 28] No space left on device`` without the file name (the message names the target itself)."""
    if e.errno is not None and e.strerror:
        return f"[Errno {e.errno}] {e.strerror}"
    return str(e)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = False) -> Path:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_csv(path: str | Path, header: list[str], rows: Any) -> Path:
    """Write a CSV (``header``, then every row of ``rows``, each a sequence) atomically: the lists of skipped
    tiles (``skipped_tiles.csv``) of training, pretraining and ``weakseg prepare``."""
    import csv

    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, *, durable: bool = False) -> Path:
    """Indented strict JSON: NaN/inf become null, numpy values and paths are converted."""
    text = json.dumps(to_json_compatible(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text, durable=durable)


def to_json_compatible(obj: Any) -> Any:
    """Numpy values -> Python, non-finite floats -> None, paths -> str, tuples -> lists."""
    if isinstance(obj, Mapping):
        return {str(key): to_json_compatible(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_compatible(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return to_json_compatible(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ---- files we write byte by byte, and their records ---------------------------------------------------------
@dataclass(frozen=True)
class FileRecord:
    """What a complete file is: its size in bytes and the sha256 of its content (hex)."""

    size: int
    sha256: str

    @classmethod
    def of_bytes(cls, data: bytes) -> FileRecord:
        return cls(len(data), hashlib.sha256(data).hexdigest())


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written; a short write is retried, a failed one raises ``OSError``."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # POSIX never returns 0 for a non-empty regular-file write; do not loop forever if it does
            raise OSError(errno.EIO, "write returned 0 bytes")
        view = view[n:]


def atomic_write_bytes(path: str | Path, data: bytes) -> FileRecord:
    """Write ``data`` to ``path`` atomically and durably; return its :class:`FileRecord`.

    Written with ``os.write`` and ``fsync`` into a temporary file, whose size is checked before the rename, so
    the file under ``path`` is exactly ``data`` or the old content, never a partial or empty file.

    Raises:
        WeaksegError: any ``OSError`` on the way (disk full, permissions, ...); the message names ``path``.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, data)
            os.fsync(fd)
            if os.fstat(fd).st_size != len(data):
                raise OSError(errno.EIO, f"wrote {os.fstat(fd).st_size} of {len(data)} bytes")
        finally:
            os.close(fd)
    return FileRecord.of_bytes(data)


def file_record(path: str | Path) -> FileRecord:
    """Size and sha256 of a file on disk (raises ``OSError`` when it cannot be read)."""
    h = hashlib.sha256()
    size = 0
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return FileRecord(size, h.hexdigest())


def check_file(path: str | Path, expected: FileRecord, *, checksum: bool = True) -> str:
    """Why ``path`` is not the file ``expected`` describes; ``""`` when it is.

    Args:
        checksum: also compare the sha256 (reads the file); without it only existence and size are checked.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as e:
        return f"cannot read {path}: {_os_reason(e)}"
    if size != expected.size:
        return f"{path} is {size} bytes, the manifest recorded {expected.size}"
    if checksum:
        try:
            actual = file_record(path)
        except OSError as e:
            return f"cannot read {path}: {_os_reason(e)}"
        if actual.sha256 != expected.sha256:
            return f"{path} has another checksum than the manifest recorded"
    return ""


# ---- append-only line logs ----------------------------------------------------------------------------------
def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` (plus a newline) to ``path`` and ``fsync`` it: one committed record of a log.

    When the write fails (disk full), the file is cut back to where it ended, so no half line is left for the next
    append to land on; a file that (from an older run) ends without a newline first gets one.

    Raises:
        WeaksegError: the file cannot be opened or written; the message names it.
    """
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise WeaksegError(f"cannot write {path}: {_os_reason(e)}") from e
    try:
        end = os.fstat(fd).st_size
        try:
            if end and _last_byte(path, end) != b"\n":
                data = b"\n" + data
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as e:
            with suppress(OSError):
                os.ftruncate(fd, end)
                os.fsync(fd)
            raise WeaksegError(f"cannot write {path}: {_os_reason(e)}") from e
    finally:
        os.close(fd)


def _last_byte(path: Path, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(size - 1)
        return f.read(1)


def read_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON-object lines of a log and the number of lines that are not one (cut by a kill, or garbage)."""
    rows: list[dict[str, Any]] = []
    bad = 0
    for line in Path(path).read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def repair_jsonl(path: str | Path) -> int:
    """Rewrite a log without its torn lines (atomically); returns how many were dropped (0: file untouched).

    A file whose last line lacks its newline is also rewritten, so the next :func:`append_line` starts a line.

    Raises:
        WeaksegError: the file cannot be read or rewritten; the message names it.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise WeaksegError(f"cannot read {path}: {_os_reason(e)}") from e
    rows, bad = read_jsonl(path)
    if bad == 0 and (not raw or raw.endswith(b"\n")):
        return 0
    text = "".join(json.dumps(r) + "\n" for r in rows)
    with atomic_path(path, durable=True) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return bad


# ---- making folders -----------------------------------------------------------------------------------------
def make_dir(path: str | Path, what: str) -> Path:
    """``mkdir -p`` with an error that names ``path`` and what it is for (``what``, e.g. ``"--output"``)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise WeaksegError(f"cannot create {what} {path}: it exists and is not a folder") from e
    except OSError as e:
        hint = ""
        if e.errno == errno.ENOTDIR:
            hint = " (a part of the path is a file)"
        raise WeaksegError(f"cannot create {what} {path}: {_os_reason(e)}{hint}") from e
    return path


# ---- one run per folder -------------------------------------------------------------------------------------
@contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[Path]:
    """Hold ``<folder>/.weakseg.lock`` while a run writes into ``folder``; a second run is refused.

    Use it around everything a stage writes into its output folder, once the folder exists (:func:`make_dir`);
    in a DDP run in the process of global rank 0 only (the other ranks must not take it: they would find rank 0
    holding it)::

        with folder_lock(out_dir, "weakseg refine"):
            ...  # write into out_dir

    - **Acquire**: the lock file is created with ``O_CREAT | O_EXCL`` (atomic, also on NFS v3+) and holds JSON:
      ``what``, ``pid``, ``host``, ``started`` (local time), ``boot_id`` and ``proc_start`` (Linux: which boot
      and the process's start tick, to tell a live holder from a reused pid) and a random ``token``.
    - **Refused** (:class:`WeaksegError`): the message names the lock file and the holder (what, pid, host,
      start time) and says to delete the file only if that run is gone. A holder on another host is always
      treated as alive (its pid cannot be checked from here).
    - **Stale**: a holder on this host whose process is gone (no such pid, a zombie, another process under the
      same pid, or an earlier boot) is recovered with a logged warning; so is an unreadable lock file older than
      30 s (a process killed between creating and filling it). Recovery renames the stale file away and re-checks
      it, so two runs recovering at once cannot both get the lock.
    - **Released** when the ``with`` block ends, normally or by an exception (also ``KeyboardInterrupt``); a
      ``SIGKILL`` leaves the file, which the next run recovers as stale.

    Not re-entrant: the same process taking the same lock twice is refused (it is a second run).

    Yields:
        The lock file's path.

    Raises:
        WeaksegError: the folder is locked by a live run, or the lock file cannot be created (the message names
            it).
    """
    lock = Path(folder) / LOCK_NAME
    holder = _lock_content(what)
    _acquire(lock, holder)
    try:
        yield lock
    finally:
        _release(lock, holder["token"])


def _lock_content(what: str) -> dict[str, Any]:
    pid = os.getpid()
    return {
        "what": what, "pid": pid, "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "boot_id": _boot_id(), "proc_start": _proc_start(pid),
        "token": uuid.uuid4().hex,
    }


def _acquire(lock: Path, holder: dict[str, Any]) -> None:
    data = json.dumps(holder).encode("utf-8")
    for _ in range(5):  # a retry per stale lock recovered; more than a few means something keeps recreating it
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            _recover_or_refuse(lock)
            continue
        except OSError as e:
            raise WeaksegError(f"cannot create lock file {lock}: {_os_reason(e)}") from e
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            with suppress(OSError):
                lock.unlink()
            raise WeaksegError(f"cannot write lock file {lock}: {_os_reason(e)}") from e
        os.close(fd)
        return
    raise WeaksegError(f"cannot take lock file {lock}: it keeps being recreated by another process")


def _read_lock(lock: Path) -> tuple[dict[str, Any] | None, bytes]:
    """(holder, raw content); holder None when the file holds no readable holder."""
    raw = lock.read_bytes()
    try:
        content = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, raw
    return (content if isinstance(content, dict) and "pid" in content else None), raw


def _describe(holder: dict[str, Any]) -> str:
    return (f"{holder.get('what', 'a weakseg run')} (pid {holder.get('pid')} on {holder.get('host')}, "
            f"started {holder.get('started')})")


def _recover_or_refuse(lock: Path) -> None:
    """The lock exists: return after removing it when it is stale, raise when its holder may be alive."""
    try:
        holder, raw = _read_lock(lock)
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return  # released meanwhile: try again
    except OSError as e:
        raise WeaksegError(f"cannot read lock file {lock}: {_os_reason(e)}") from e
    if holder is None:
        if age < _UNREADABLE_LOCK_GRACE_S:
            raise WeaksegError(
                f"{lock.parent} is locked by another run that is starting now (lock file {lock}); try again in a "
                f"minute, or delete {lock} if no run uses this folder"
            )
        why = f"lock file {lock} holds no readable holder and is {age:.0f}s old"
    else:
        dead = _holder_gone(holder)
        if not dead:
            raise WeaksegError(
                f"{lock.parent} is in use by another run: lock file {lock} is held by {_describe(holder)}. Wait for "
                f"it to finish or choose another folder; delete {lock} only if that run is no longer running"
            )
        why = f"{_describe(holder)} {dead}"
    # Rename the stale file away, then check it is still the one judged stale: a racing run may have recovered it
    # and taken the lock in between, and that live lock must be put back, not deleted.
    aside = lock.with_name(f"{lock.name}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        os.replace(lock, aside)
    except FileNotFoundError:
        return
    except OSError as e:
        raise WeaksegError(f"cannot remove stale lock file {lock}: {_os_reason(e)}") from e
    try:
        moved = aside.read_bytes()
    except OSError:
        moved = raw
    if moved != raw:
        with suppress(OSError):
            os.link(aside, lock)  # fails when yet another run holds it now: then that one is the holder
        with suppress(OSError):
            aside.unlink()
        raise WeaksegError(f"{lock.parent} was just locked by another run (lock file {lock}); try again later")
    with suppress(OSError):
        aside.unlink()
    log.warning("warning: recovered a stale lock: %s; lock file %s", why, lock)


def _holder_gone(holder: dict[str, Any]) -> str:
    """Why the holder's process is no longer running (``""`` when it may be: then the lock is respected)."""
    if holder.get("host") != socket.gethostname() or os.name == "nt":
        return ""  # another machine's pid cannot be checked; on Windows os.kill(pid, 0) would signal it
    boot = _boot_id()
    if holder.get("boot_id") and boot and holder["boot_id"] != boot:
        return "ran before this machine restarted"
    try:
        pid = int(holder["pid"])
    except (TypeError, ValueError):
        return "has no valid pid"
    if pid <= 0:
        return "has no valid pid"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "is no longer running"
    except PermissionError:
        pass  # alive, another user's
    except OSError:
        return ""
    state, start = _proc_stat(pid)
    if state == "Z":
        return "has exited"
    if holder.get("proc_start") is not None and start is not None and start != holder["proc_start"]:
        return "is no longer running (its pid now belongs to another process)"
    return ""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str | None, int | None]:
    """(state, start time in clock ticks since boot) of a process from ``/proc``; Nones where unavailable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None, None
    fields = text[text.rfind(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None, None


def _proc_start(pid: int) -> int | None:
    return _proc_stat(pid)[1]


def _release(lock: Path, token: str) -> None:
    """Remove the lock file if it is still ours (a user may have deleted it and another run taken it)."""
    try:
        holder, _ = _read_lock(lock)
    except OSError:
        return
    if holder is not None and holder.get("token") == token:
        with suppress(OSError):
            lock.unlink()


def process_rank() -> int:
    """This process's DDP rank as the launcher announces it in the environment, before Lightning starts (0 alone).

    Lightning re-runs the whole command in ranks 1.. (``LOCAL_RANK``/``NODE_RANK``); torchrun and SLURM set
    ``RANK`` / ``SLURM_PROCID``. Only rank 0 may lock, check and change the output folder: the others would find
    the lock held by rank 0, or delete what rank 0 just prepared.
    """
    for var in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var])
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0)
    return local if node == 0 else node * 1000 + local  # any non-zero value: only "is it 0" matters
