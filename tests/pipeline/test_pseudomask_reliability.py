"""``weakseg pseudomasks`` when things go wrong: full disks, torn manifests, read-only folders, foreign files,
unreadable tiles, a second run into the same folder, DDP (issue 7).

Most tests run the real CLI in-process (``weakseg.cli.main``) with one fault injected by monkeypatching the OS
call that fails on a real machine; the DDP and one disk-full test run it in a subprocess, and one test fills a
real (tmpfs) file system where the machine allows mounting one.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from weakseg.cli import main
from weakseg.data import open_dataset
from weakseg.io import LOCK_NAME, folder_lock

MANIFEST_LOG = ".manifest.rank0.jsonl"


def pseudomasks(checkpoint: Path, data: Path, out: Path, *flags: str) -> int:
    return main(["pseudomasks", "--model_checkpoint", str(checkpoint), "--datadir", str(data), "--output", str(out),
                 "--batch_size", "4", *flags])


def outputs(folder: Path) -> dict[str, bytes]:
    """Every mask and confidence file and the manifest, by path relative to ``folder``."""
    paths = [*folder.glob("*.tif"), *folder.glob("confidence/*.tif"), folder / "manifest.csv"]
    return {str(p.relative_to(folder)): p.read_bytes() for p in paths if p.is_file()}


def error_line(stderr: str) -> str:
    """The one ``error:`` line the CLI printed (logging may print info lines before it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def log_lines(folder: Path) -> list[str]:
    return (folder / MANIFEST_LOG).read_text().splitlines()


def manifest(folder: Path) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path, tiny_dfc: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run (attention, batch 4) that failed and resumed runs must equal byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "pm"
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--no-evaluate") == 0
    return out


def test_manifest_records_size_and_checksum_of_every_file(reference: Path) -> None:
    rows = manifest(reference)
    assert len(rows) == 24
    for r in rows:
        for name, size, digest in ((r["file"], r["bytes"], r["sha256"]),
                                   (r["confidence_file"], r["confidence_bytes"], r["confidence_sha256"])):
            data = (reference / name).read_bytes()
            assert int(size) == len(data) > 0 and digest == hashlib.sha256(data).hexdigest()
        assert r["file"] == f"{r['id']}.tif" and r["confidence_file"] == f"confidence/{r['id']}.tif"


# ---- disk full ----------------------------------------------------------------------------------------------
def fail_tif_replaces_after(monkeypatch: pytest.MonkeyPatch, masks_ok: int) -> None:
    """Disk full after ``masks_ok`` masks: every later ``os.replace`` onto a .tif fails with ENOSPC."""
    real_replace = os.replace
    masks = [0]

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(".tif"):
            if masks[0] >= masks_ok:
                raise OSError(errno.ENOSPC, "No space left on device")
            if Path(dst).parent.name != "confidence":
                masks[0] += 1
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_disk_full_while_writing_masks_is_an_error_and_the_rerun_completes(tiny_checkpoint, tiny_dfc, tmp_path,
                                                                           monkeypatch, capsys, reference) -> None:
    out = tmp_path / "pm"
    fail_tif_replaces_after(monkeypatch, masks_ok=6)
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--no-evaluate") == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: cannot write ") and err.endswith("[Errno 28] No space left on device")
    assert str(out / "confidence") in err  # the first file that did not fit: tile 7's confidence map
    monkeypatch.undo()
    assert not (out / LOCK_NAME).exists()  # released on error
    assert not (out / "manifest.csv").exists() and not list(out.rglob(".*.tmp"))
    assert len(log_lines(out)) == 6 and all(json.loads(line)["file"] for line in log_lines(out))
    assert all(p.stat().st_size > 0 for p in out.rglob("*.tif"))  # complete or absent

    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--no-evaluate") == 0
    assert "24/24 tiles written (18 this run" in capsys.readouterr().out
    assert outputs(out) == outputs(reference)


def test_disk_full_on_the_manifest_is_an_error_and_leaves_no_torn_line(tiny_checkpoint, tiny_dfc, tmp_path,
                                                                       monkeypatch, capsys, reference) -> None:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell which file a write goes to")
    out = tmp_path / "pm"
    real_write = os.write
    rows = [0]

    def write(fd, data):  # the manifest's 4th row: half of it reaches the disk, then the disk is full
        if os.readlink(f"/proc/self/fd/{fd}").endswith(MANIFEST_LOG):
            rows[0] += 1
            if rows[0] == 4:
                real_write(fd, bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--no-evaluate") == 2
    err = capsys.readouterr().err
    assert f"error: cannot write {out / MANIFEST_LOG}: [Errno 28] No space left on device" in err
    monkeypatch.undo()
    lines = log_lines(out)
    assert len(lines) == 3 and (out / MANIFEST_LOG).read_bytes().endswith(b"\n")  # the half row was cut back
    assert not (out / LOCK_NAME).exists()
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--no-evaluate") == 0
    assert outputs(out) == outputs(reference)
    assert len(log_lines(out)) == 24


def test_disk_full_through_the_real_cli_prints_one_error_line(tiny_checkpoint, tiny_dfc, tmp_path) -> None:
    """A subprocess: the console entry point's exit status and stderr, not main()'s return value."""
    script = tmp_path / "disk_full.py"
    script.write_text(textwrap.dedent("""
        import errno, os, sys
        real_replace, count = os.replace, [0]
        def replace(src, dst, *a, **k):
            if str(dst).endswith(".tif"):
                count[0] += 1
                if count[0] > 3:
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real_replace(src, dst, *a, **k)
        os.replace = replace
        from weakseg.cli import main
        sys.exit(main(sys.argv[1:]))
    """))
    out = tmp_path / "pm"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script), "pseudomasks", "--model_checkpoint", str(tiny_checkpoint),
                           "--datadir", str(tiny_dfc), "--output", str(out), "--split", "validation:holdout",
                           "--no-evaluate"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(out) in errors[0] and "No space left on device" in errors[0]
    assert not (out / LOCK_NAME).exists()


@pytest.fixture()
def small_tmpfs(tmp_path: Path):
    """A real 64 KiB file system (tmpfs); skipped where this process may not mount one (not root, containers)."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_really_full_disk_leaves_no_empty_mask_and_resumes(tiny_checkpoint, tiny_dfc, small_tmpfs, capsys,
                                                             reference) -> None:
    """GDAL itself, on a full disk, prints an error and returns: the masks it wrote were 0-byte files."""
    out = small_tmpfs / "pm"
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--no-evaluate") == 2
    err = capsys.readouterr().err
    assert "error: cannot write" in err and "No space left on device" in err and str(out) in err
    assert all(p.stat().st_size > 0 for p in out.rglob("*.tif"))
    assert not (out / "summary.json").exists()
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--no-evaluate") == 0
    assert outputs(out) == outputs(reference)


# ---- resume checks every file -------------------------------------------------------------------------------
def test_resume_redoes_empty_truncated_altered_and_missing_files(tiny_checkpoint, tiny_dfc, tmp_path, capsys,
                                                                 reference) -> None:
    out = tmp_path / "pm"
    shutil.copytree(reference, out)
    ids = [r["id"] for r in manifest(reference)]
    (out / f"{ids[0]}.tif").write_bytes(b"")  # what a full disk left before
    conf = out / "confidence" / f"{ids[1]}.tif"
    conf.write_bytes(conf.read_bytes()[:-10])  # truncated
    mask = out / f"{ids[2]}.tif"
    data = bytearray(mask.read_bytes())
    data[-1] ^= 0xFF  # same size, another content
    mask.write_bytes(bytes(data))
    (out / f"{ids[3]}.tif").unlink()
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--no-evaluate") == 0
    captured = capsys.readouterr()
    assert "24/24 tiles written (4 this run" in captured.out
    assert "4 tile(s) listed as written have incomplete files and are redone" in captured.err
    assert f"{ids[0]}.tif is 0 bytes, the manifest recorded" in captured.err
    assert outputs(out) == outputs(reference)


def test_a_torn_manifest_line_is_repaired_not_appended_onto(tiny_checkpoint, tiny_dfc, tmp_path, capsys,
                                                            reference) -> None:
    out = tmp_path / "pm"
    shutil.copytree(reference, out)
    (out / "manifest.csv").unlink()
    lines = log_lines(out)
    # killed while appending row 23: rows 23 and 24 are missing, half of row 23 is on disk without a newline
    (out / MANIFEST_LOG).write_text("\n".join(lines[:22]) + "\n" + lines[22][:40])
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--no-evaluate") == 0
    captured = capsys.readouterr()
    assert "dropped 1 torn line(s)" in captured.err and "(2 this run" in captured.out
    rows = [json.loads(line) for line in log_lines(out)]  # every line parses: nothing was appended onto the tear
    assert len(rows) == 24 and len({r["id"] for r in rows}) == 24
    assert outputs(out) == outputs(reference)


# ---- --overwrite and the dataset's own files ----------------------------------------------------------------
@pytest.fixture()
def data_copy(tiny_dfc: Path, tmp_path: Path) -> Path:
    """A copy of the tiny data, which a test may damage."""
    return Path(shutil.copytree(tiny_dfc, tmp_path / "data"))


def test_an_output_inside_the_dataset_is_refused_and_the_ground_truth_kept(tiny_checkpoint, data_copy, capsys) -> None:
    gt_dir = data_copy / "ROIs0000_validation" / "dfc_validation"
    before = {p.name: p.read_bytes() for p in gt_dir.iterdir()}
    assert len(before) == 24
    for out in (gt_dir, data_copy, data_copy / "masks"):
        assert pseudomasks(tiny_checkpoint, data_copy, out, "--overwrite") == 2
        err = error_line(capsys.readouterr().err)
        assert err.startswith(f"error: --output {out} ") and f"--datadir {data_copy}" in err
    assert {p.name: p.read_bytes() for p in gt_dir.iterdir()} == before
    assert not (data_copy / "masks").exists() and not (data_copy / "run.json").exists()


def test_an_input_folder_linked_into_the_dataset_is_refused_too(tiny_checkpoint, data_copy, tmp_path,
                                                                 capsys) -> None:
    """A dataset whose ground truth is a link to a folder elsewhere: that folder is an input folder too."""
    gt_dir = data_copy / "ROIs0000_validation" / "dfc_validation"
    elsewhere = Path(shutil.move(gt_dir, tmp_path / "labels"))
    gt_dir.symlink_to(elsewhere, target_is_directory=True)
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    assert pseudomasks(tiny_checkpoint, data_copy, elsewhere, "--overwrite") == 2
    err = error_line(capsys.readouterr().err)
    assert f"is the dataset's masks folder {elsewhere}" in err and f"--datadir {data_copy}" in err
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == before


def test_overwrite_deletes_only_what_the_manifest_lists(tiny_checkpoint, tiny_dfc, tmp_path, capsys,
                                                        reference) -> None:
    out = tmp_path / "pm"
    shutil.copytree(reference, out)
    (out / "my_map.tif").write_bytes(b"a user's file")
    (out / "confidence" / "notes.tif").write_bytes(b"another")
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--method", "top_class", "--no-evaluate") == 2
    assert "holds masks of another run" in capsys.readouterr().err
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--method", "top_class", "--no-evaluate", "--overwrite") == 0
    err = capsys.readouterr().err
    assert "left 2 .tif file(s)" in err and "my_map.tif" in err
    assert (out / "my_map.tif").read_bytes() == b"a user's file"
    assert (out / "confidence" / "notes.tif").read_bytes() == b"another"
    rows = manifest(out)
    assert len(rows) == 24 and {r["method"] for r in rows} == {"top_class"}
    assert json.loads((out / "run.json").read_text())["method"] == "top_class"


def test_overwrite_never_deletes_tifs_that_no_weakseg_run_wrote(tiny_checkpoint, tiny_dfc, tmp_path, capsys) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "label.tif").write_bytes(b"ground truth of someone")
    assert pseudomasks(tiny_checkpoint, tiny_dfc, foreign, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "no weakseg run wrote" in err and "--overwrite only removes files a weakseg run lists" in err
    assert (foreign / "label.tif").read_bytes() == b"ground truth of someone"


# ---- write failures are errors that name the path -----------------------------------------------------------
def deny_writes_under(folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Make ``folder`` read-only: by chmod where that blocks this process, else (root) by failing the OS calls.

    Returns how it was done, for the test's messages.
    """
    folder.chmod(0o555)
    probe = folder / ".probe"
    try:
        probe.touch()
    except PermissionError:
        return "chmod"
    probe.unlink()
    folder.chmod(0o755)  # root ignores the mode: simulate EACCES for every write under the folder instead
    root = str(folder.resolve())

    def inside(path) -> bool:
        try:
            p = os.path.abspath(os.fsdecode(path))
        except TypeError:
            return False  # a file descriptor
        return p == root or p.startswith(root + os.sep)

    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))

    real_open, real_mkdir, real_replace, real_io_open = os.open, os.mkdir, os.replace, io.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def fake_os_open(path, flags, *a, **k):
        return denied(path) if flags & write_flags and inside(path) else real_open(path, flags, *a, **k)

    def fake_io_open(file, mode="r", *a, **k):
        return denied(file) if any(c in mode for c in "wax+") and inside(file) else real_io_open(file, mode, *a, **k)

    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", lambda path, *a, **k: denied(path) if inside(path) else real_mkdir(path, *a, **k))
    monkeypatch.setattr(os, "replace", lambda s, d, *a, **k: denied(d) if inside(d) else real_replace(s, d, *a, **k))
    monkeypatch.setattr(io, "open", fake_io_open)
    return "monkeypatch (running as root, chmod does not block writes)"


def test_a_read_only_output_folder_is_an_error_naming_it(tiny_checkpoint, tiny_dfc, tmp_path, monkeypatch,
                                                         capsys) -> None:
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    how = deny_writes_under(readonly, monkeypatch)
    try:
        assert pseudomasks(tiny_checkpoint, tiny_dfc, readonly, "--no-evaluate") == 2, how
        err = error_line(capsys.readouterr().err)
        assert err.startswith(f"error: cannot create lock file {readonly / LOCK_NAME}: [Errno 13]"), (how, err)
        assert pseudomasks(tiny_checkpoint, tiny_dfc, readonly / "masks", "--no-evaluate") == 2, how
        err = error_line(capsys.readouterr().err)
        assert err.startswith(f"error: cannot create --output folder {readonly / 'masks'}: [Errno 13]"), (how, err)
    finally:
        readonly.chmod(0o755)


def test_impossible_output_paths_are_errors_naming_them(tiny_checkpoint, tiny_dfc, tmp_path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    assert pseudomasks(tiny_checkpoint, tiny_dfc, afile / "masks") == 2
    assert f"error: cannot create --output folder {afile / 'masks'}: " in capsys.readouterr().err
    assert pseudomasks(tiny_checkpoint, tiny_dfc, afile) == 2
    assert f"error: --output {afile} exists and is not a folder" in capsys.readouterr().err
    long_name = tmp_path / ("x" * 300)
    assert pseudomasks(tiny_checkpoint, tiny_dfc, long_name) == 2
    assert f"error: --output {long_name} cannot be used: File name too long" in capsys.readouterr().err


# ---- unreadable tiles -----------------------------------------------------------------------------------------
def test_an_unreadable_first_tile_is_skipped_like_any_other(tiny_checkpoint, data_copy, tmp_path, capsys) -> None:
    first = open_dataset("dfc2020", data_copy, "validation").source_path(0)
    first.write_bytes(b"not a tiff")
    out = tmp_path / "pm"
    assert pseudomasks(tiny_checkpoint, data_copy, out) == 0
    rows = manifest(out)
    assert len(rows) == 24 and rows[0]["status"] == "skipped" and first.name in rows[0]["reason"]
    assert all(r["status"] != "skipped" for r in rows[1:]) and len(list(out.glob("*.tif"))) == 23
    printed = capsys.readouterr().out
    assert "scores not computed: 1 of 24 tile(s) were skipped" in printed and "mIoU" not in printed


def test_no_readable_tile_is_an_error_naming_files_and_reasons(tiny_checkpoint, data_copy, tmp_path,
                                                               capsys) -> None:
    holdout = open_dataset("dfc2020", data_copy, "validation:holdout")
    for i in range(len(holdout)):
        holdout.source_path(i).write_bytes(b"not a tiff")
    assert pseudomasks(tiny_checkpoint, data_copy, tmp_path / "pm", "--split", "validation:holdout") == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"error: none of the {len(holdout)} tiles can be read, e.g. ")
    assert all(f"cannot read {holdout.source_path(i)}: " in err for i in range(3))
    assert str(holdout.source_path(3)) not in err  # a few, not all


# ---- one run per folder ---------------------------------------------------------------------------------------
def test_a_second_run_into_a_locked_folder_is_refused(tiny_checkpoint, tiny_dfc, tmp_path, capsys) -> None:
    out = tmp_path / "pm"
    out.mkdir()
    with folder_lock(out, "weakseg pseudomasks (the first run)"):
        assert pseudomasks(tiny_checkpoint, tiny_dfc, out) == 2
        err = capsys.readouterr().err
        assert f"lock file {out / LOCK_NAME} is held by weakseg pseudomasks (the first run) (pid {os.getpid()}" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the refused run wrote nothing
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--no-evaluate") == 0
    assert not (out / LOCK_NAME).exists()


def test_a_stale_lock_of_a_killed_run_is_recovered(tiny_checkpoint, tiny_dfc, tmp_path, capsys) -> None:
    out = tmp_path / "pm"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_NAME).write_text(json.dumps({"what": "weakseg pseudomasks", "pid": int(dead.stdout),
                                             "host": socket.gethostname(), "started": "earlier"}))
    assert pseudomasks(tiny_checkpoint, tiny_dfc, out, "--no-evaluate") == 0
    assert "warning: recovered a stale lock" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists() and len(manifest(out)) == 24


# ---- DDP --------------------------------------------------------------------------------------------------------
def test_ddp_every_tile_gets_exactly_one_row_and_a_mask(tiny_checkpoint, tiny_dfc, tmp_path) -> None:
    """Two CPU ranks through the real CLI; rank 1 writes late, so rank 0 must wait for it before the manifest.

    Lightning re-launches the script per rank, so the delay (a test hook, not weakseg code) applies in rank 1 too.
    """
    script = tmp_path / "slow_rank1.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from weakseg.pipeline import pseudomasks
        write = pseudomasks.PseudomaskWriter.write_on_batch_end
        def slow(self, trainer, *args, **kwargs):
            if trainer.global_rank != 0 and not getattr(self, "_delayed", False):
                self._delayed = True
                time.sleep(2)  # rank 0 has long finished its 12 tiles by then
            return write(self, trainer, *args, **kwargs)
        pseudomasks.PseudomaskWriter.write_on_batch_end = slow
        from weakseg.cli import main
        sys.exit(main(sys.argv[1:]))
    """))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script), "pseudomasks", "--model_checkpoint", str(tiny_checkpoint),
                           "--datadir", str(tiny_dfc), "--output", str(out), "--num_devices", "2", "--accelerator",
                           "cpu", "--batch_size", "4", "--no-evaluate"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = open_dataset("dfc2020", tiny_dfc, "validation").ids
    assert [r["id"] for r in manifest(out)] == ids  # exactly one row per tile, dataset order
    assert sorted(p.stem for p in out.glob("*.tif")) == sorted(ids)
    logged = [json.loads(line)["id"] for k in (0, 1)
              for line in (out / f".manifest.rank{k}.jsonl").read_text().splitlines()]
    assert sorted(logged) == sorted(ids)  # both ranks wrote, no tile twice
    assert "24/24 tiles written (24 this run" in proc.stdout
    assert not (out / LOCK_NAME).exists()
