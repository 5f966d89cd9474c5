"""The manifest of a pseudomask run is merged from the rank logs a row at a time (issue 12: memory flat in the
number of tiles): the same bytes as merging every row in memory, with memory that does not grow with the rows."""

from __future__ import annotations

import csv
import io
import json
import tracemalloc
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import weakseg.pipeline.pseudomasks as pm
from weakseg.io import atomic_write_bytes, read_jsonl


def job() -> pm.PseudomaskJob:
    return pm.PseudomaskJob(checkpoint="c.ckpt", checkpoint_sha256="0" * 64, method="attention", oracle=False,
                            relabel=False, dataset="dfc2020", datadir="d", split="validation", threshold=0.5)


def row(tid: str, t: int, status: str = "ok", reason: str = "clustered", assignment: str = "") -> dict[str, Any]:
    """A manifest log row as PseudomaskWriter writes it (files recorded only for written tiles)."""
    files = {"file": "", "bytes": "", "sha256": "", "confidence_file": "", "confidence_bytes": "",
             "confidence_sha256": ""}
    return {"id": tid, "status": status, "reason": reason, "method": "attention", "labels": "Forest;Water",
            "used_labels": "Forest", "probabilities": ";".join(f"c{k}={k / 10:.4f}" for k in range(8)),
            "assignment": assignment, **files, "_index": 0, "_time": t}


def written(out: Path, r: dict[str, Any], content: bytes) -> dict[str, Any]:
    """``r`` with its two files written and recorded (size, sha256)."""
    tid = r["id"]
    mask = atomic_write_bytes(out / f"{tid}.tif", content)
    conf = atomic_write_bytes(out / "confidence" / f"{tid}.tif", content * 2)
    return {**r, "file": f"{tid}.tif", "bytes": mask.size, "sha256": mask.sha256,
            "confidence_file": f"confidence/{tid}.tif", "confidence_bytes": conf.size,
            "confidence_sha256": conf.sha256}


def in_memory_merge(out: Path, ids: list[str]) -> tuple[bytes, dict[str, Any]]:
    """The manifest bytes and summary counts the way finalize made them before: every row held."""
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(out.glob(pm.MANIFEST_LOG_GLOB)):
        for r in read_jsonl(path)[0]:
            tid = r.get("id")
            if isinstance(tid, str) and (tid not in rows or r.get("_time", 0) >= rows[tid].get("_time", 0)):
                rows[tid] = r
    ordered = [rows[t] for t in ids]
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=pm.MANIFEST_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(ordered)
    counts = {"status": dict(Counter(r["status"] for r in ordered)),
              "reasons": dict(Counter(r["reason"].split(";")[0] if r["status"] != "skipped" else "unreadable"
                                      for r in ordered)),
              "written": sum(1 for r in ordered if r["file"]),
              "skipped": [{"id": r["id"], "reason": r["reason"]} for r in ordered if r["status"] == "skipped"]}
    checked = [r["assignment"] for r in ordered if r.get("assignment")]
    counts["assignment"] = {"best": checked.count("best"), "checked": len(checked), "labels": "predicted"}
    return f.getvalue().encode(), counts


def write_logs(out: Path, logs: dict[int, list[dict[str, Any]]], torn: bool = False) -> None:
    for rank, rows in logs.items():
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if torn and rank == 0:
            text += '{"id": "t1", "status": "ok", "rea'  # cut by a kill: no newline, no closing brace
        (out / f".manifest.rank{rank}.jsonl").write_text(text)


def test_merged_manifest_is_byte_identical_to_merging_every_row_in_memory(tmp_path: Path) -> None:
    """Two ranks, tiles redone (the later _time wins, across logs), a tie (the later log wins), a skipped tile,
    rows of a tile outside the split and a torn line: the same bytes and counts as the in-memory merge."""
    out = tmp_path
    ids = [f"t{k}" for k in range(12)]
    logs: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for k, tid in enumerate(ids):
        logs[k % 2].append(written(out, row(tid, 100 + k, assignment="best" if k % 3 else "not_best"), b"m" * (k + 1)))
    logs[1].append(written(out, row("t2", 500, status="fallback", reason="one label;kept"), b"x"))  # redone
    # Rows that lose record files of their own (never written: a loser's files are not checked).
    logs[0].append({**row("t3", 50, reason="older"), "file": "t3.tif", "bytes": 9})  # older, later in a log
    logs[0].append({**row("t5", 105, reason="tie, rank 0"), "file": "t5.tif", "bytes": 9})  # rank 1's _time
    logs[1].append(row("t7", 900, status="skipped", reason="cannot read t7.tif"))
    logs[0].append(row("other", 1000))  # not a tile of the split
    write_logs(out, logs, torn=True)
    expected, counts = in_memory_merge(out, ids)
    reader = SimpleNamespace(ids=ids, modality="s2")
    summary = pm.finalize(out, reader, job(), elapsed=1.0, tiles_this_run=3)
    assert (out / "manifest.csv").read_bytes() == expected
    assert {k: summary[k] for k in counts} == counts
    assert summary["assignment"]["checked"] == 10  # t2's and t7's latest rows have none
    rows = {r["id"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    assert rows["t2"]["status"] == "fallback" and rows["t3"]["reason"] == "clustered"
    assert rows["t5"]["reason"] == "clustered"  # the tie: rank 1's log comes after rank 0's
    # Resume sees the same latest rows: every written tile is done, the skipped one is tried again.
    assert pm.completed_tiles(out, ids) == set(ids) - {"t7"}


def test_a_broken_file_fails_the_merge_and_keeps_the_old_manifest(tmp_path: Path) -> None:
    ids = ["t0", "t1"]
    write_logs(tmp_path, {0: [written(tmp_path, row(t, 1), b"abc") for t in ids]})
    (tmp_path / "manifest.csv").write_text("old\n")
    (tmp_path / "t1.tif").write_bytes(b"")
    with pytest.raises(pm.WeaksegError, match=r"1 tile\(s\) of .* have missing or incomplete files"):
        pm.finalize(tmp_path, SimpleNamespace(ids=ids), job(), elapsed=0.0, tiles_this_run=0)
    assert (tmp_path / "manifest.csv").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


@pytest.mark.parametrize("step", ["finalize", "completed_tiles", "repair_manifests"])
def test_merging_resuming_and_repairing_hold_no_row_per_tile(step: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """5,000 rows of ~0.4 kB each (~2 kB each as parsed dicts, ~11 MB together, what finalize held before): the
    manifest merge, the resume check and the repair of the logs stay within a few integers per tile."""
    ids = [f"t{k}" for k in range(5000)]
    write_logs(tmp_path, {0: [row(t, k) for k, t in enumerate(ids)]})
    monkeypatch.setattr(pm, "incomplete_reason", lambda out_dir, r, checksum=True: "")  # no files: rows only
    calls = {"finalize": lambda: pm.finalize(tmp_path, SimpleNamespace(ids=ids), job(), elapsed=0.0,
                                             tiles_this_run=0),
             "completed_tiles": lambda: pm.completed_tiles(tmp_path, ids),
             "repair_manifests": lambda: pm.repair_manifests(tmp_path)}
    tracemalloc.start()
    try:
        calls[step]()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * 2**20, f"{step}: peak {peak / 2**20:.1f} MB"
