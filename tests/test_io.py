import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from weakseg.errors import WeaksegError
from weakseg.io import (
    LOCK_NAME,
    FileRecord,
    append_line,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    check_file,
    folder_lock,
    make_dir,
    read_jsonl,
    repair_jsonl,
)


def test_atomic_write_json(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "scores.json"
    atomic_write_json(path, {"x": float("nan"), "n": np.int64(3), "a": np.arange(2), "p": tmp_path})
    assert json.loads(path.read_text()) == {"x": None, "n": 3, "a": [0, 1], "p": str(tmp_path)}
    assert not list((tmp_path / "sub").glob("*.tmp"))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(WeaksegError, match=r"cannot write .*blocker"):
        atomic_write_json(blocker / "scores.json", {})


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]


# ---- bytes written by us, with a record checked on resume ---------------------------------------------------
def fail_writes_after(monkeypatch: pytest.MonkeyPatch, allowed_bytes: int) -> None:
    """Simulate a full disk: ``os.write`` writes ``allowed_bytes`` in total, then fails with ENOSPC (short first)."""
    real_write = os.write
    left = [allowed_bytes]

    def write(fd: int, data: bytes) -> int:
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, bytes(data)[: left[0]])
        left[0] -= n
        return n

    monkeypatch.setattr(os, "write", write)


def test_atomic_write_bytes_records_exactly_the_bytes_written(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "mask.tif"
    record = atomic_write_bytes(path, b"II*\x00 payload")
    assert path.read_bytes() == b"II*\x00 payload"
    assert record == FileRecord.of_bytes(b"II*\x00 payload") and record.size == 12
    assert check_file(path, record) == ""
    assert not list(path.parent.glob(".*.tmp"))


def test_atomic_write_bytes_on_a_full_disk_names_the_file_and_leaves_the_old_one(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mask.tif"
    path.write_bytes(b"old")
    fail_writes_after(monkeypatch, 4)  # a short write, then ENOSPC: the loop must not take 4 bytes as success
    with pytest.raises(WeaksegError, match=rf"cannot write {path}: \[Errno 28\] No space left on device"):
        atomic_write_bytes(path, b"0123456789")
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]  # no temporary left


def test_check_file_says_why_a_file_is_not_the_recorded_one(tmp_path: Path) -> None:
    path = tmp_path / "a.tif"
    record = atomic_write_bytes(path, b"0123456789")
    assert check_file(path, record) == ""
    path.write_bytes(b"0123456780")  # same size, other content
    assert "another checksum" in check_file(path, record)
    assert check_file(path, record, checksum=False) == ""  # size only
    path.write_bytes(b"")
    assert check_file(path, record) == f"{path} is 0 bytes, the manifest recorded 10"
    path.unlink()
    assert check_file(path, record) == f"{path} is missing"


def test_append_line_on_a_full_disk_cuts_the_half_line_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log_file = tmp_path / "rows.jsonl"
    append_line(log_file, '{"id": "a"}')
    before = log_file.read_bytes()
    fail_writes_after(monkeypatch, 5)  # half of the next line reaches the disk, then ENOSPC
    with pytest.raises(WeaksegError, match=rf"cannot write {log_file}: \[Errno 28\]"):
        append_line(log_file, '{"id": "b", "status": "ok"}')
    assert log_file.read_bytes() == before  # no torn line for the next append to land on
    monkeypatch.undo()
    append_line(log_file, '{"id": "c"}')
    assert read_jsonl(log_file) == ([{"id": "a"}, {"id": "c"}], 0)


def test_append_line_never_lands_on_a_torn_line(tmp_path: Path) -> None:
    log_file = tmp_path / "rows.jsonl"
    log_file.write_text('{"id": "a"}\n{"id": "b", "sta')  # killed mid-line
    append_line(log_file, '{"id": "c"}')
    assert read_jsonl(log_file) == ([{"id": "a"}, {"id": "c"}], 1)


def test_repair_jsonl_drops_torn_lines_and_leaves_a_clean_file_alone(tmp_path: Path) -> None:
    log_file = tmp_path / "rows.jsonl"
    log_file.write_text('{"id": "a"}\n{"id": "b", "sta')
    assert repair_jsonl(log_file) == 1
    assert log_file.read_text() == '{"id": "a"}\n'
    mtime = log_file.stat().st_mtime_ns
    assert repair_jsonl(log_file) == 0 and log_file.stat().st_mtime_ns == mtime
    log_file.write_text('{"id": "a"}')  # complete row, newline lost: kept, newline added
    assert repair_jsonl(log_file) == 0 and log_file.read_text() == '{"id": "a"}\n'


def test_make_dir_names_the_path_when_it_cannot(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(WeaksegError, match=rf"cannot create --output {blocker / 'sub'}: .*a part of the path is a file"):
        make_dir(blocker / "sub", "--output")
    with pytest.raises(WeaksegError, match=rf"cannot create --output {blocker}: it exists and is not a folder"):
        make_dir(blocker, "--output")
    with pytest.raises(WeaksegError, match="cannot create --output .*File name too long"):
        make_dir(tmp_path / ("x" * 300), "--output")


# ---- folder_lock ----------------------------------------------------------------------------------------------
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def write_lock(folder: Path, **holder: object) -> Path:
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"what": "weakseg pseudomasks", "host": socket.gethostname(),
                                "started": "2026-01-01 00:00:00", **holder}))
    return lock


def test_a_second_run_is_refused_naming_the_lock_file_and_its_holder(tmp_path: Path) -> None:
    with folder_lock(tmp_path, "weakseg pseudomasks (first)") as lock:
        assert lock == tmp_path / LOCK_NAME
        held = json.loads(lock.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"]
        with pytest.raises(WeaksegError) as refused:
            with folder_lock(tmp_path, "weakseg pseudomasks (second)"):
                pass
        message = str(refused.value)
        assert str(lock) in message and f"pid {os.getpid()} on {socket.gethostname()}" in message
        assert "weakseg pseudomasks (first)" in message
        assert lock.read_text() == json.dumps(held)  # the refused run did not touch it
    assert not lock.exists()  # released


def test_the_lock_is_released_when_the_run_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), folder_lock(tmp_path, "a run"):
        raise RuntimeError("failed mid-run")
    assert not (tmp_path / LOCK_NAME).exists()
    with folder_lock(tmp_path, "the next run"):
        pass


def test_a_stale_lock_of_a_dead_process_is_recovered_with_a_warning(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    pid = dead_pid()
    write_lock(tmp_path, pid=pid)
    with caplog.at_level(logging.WARNING, logger="weakseg.io"), folder_lock(tmp_path, "new run") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"recovered a stale lock: weakseg pseudomasks (pid {pid}" in caplog.text
    assert "is no longer running" in caplog.text
    assert not list(tmp_path.iterdir())  # nothing left: no lock, no renamed stale file


def test_a_live_pid_with_another_start_time_is_a_reused_pid(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if not Path(f"/proc/{os.getpid()}/stat").is_file():
        pytest.skip("needs /proc to tell a reused pid")
    write_lock(tmp_path, pid=os.getpid(), proc_start=1)  # this process, but it started at another tick
    with caplog.at_level(logging.WARNING, logger="weakseg.io"), folder_lock(tmp_path, "new run"):
        pass
    assert "its pid now belongs to another process" in caplog.text


def test_locks_that_may_be_alive_are_respected(tmp_path: Path) -> None:
    write_lock(tmp_path, pid=dead_pid(), host="another-host")  # pid cannot be checked from here
    with pytest.raises(WeaksegError, match="on another-host"):
        with folder_lock(tmp_path, "x"):
            pass
    lock = tmp_path / LOCK_NAME
    lock.write_text("")  # a run that created its lock file and is about to fill it
    with pytest.raises(WeaksegError, match="starting now"):
        with folder_lock(tmp_path, "x"):
            pass
    old = time.time() - 3600
    os.utime(lock, (old, old))  # ... but an hour ago: it died in between
    with folder_lock(tmp_path, "x"):
        pass


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path: Path) -> None:
    with folder_lock(tmp_path, "first") as lock:
        lock.unlink()  # a user removed it by hand and another run took the folder
        other = write_lock(tmp_path, pid=os.getpid(), token="someone else")
    assert other.exists()
