"""The intake spool on a real directory: atomic puts, exclusive claims across processes, crash
recovery, bounds, duplicates."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from app.pacs.spool import Spool, SpoolFull

REPO_ROOT = Path(__file__).resolve().parents[3]


def uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.10.1001.8.{n}"


def test_put_then_claim_returns_the_bytes_and_meta_and_done_removes(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_entries=10, max_bytes=10**6)
    entry = spool.put(uid(1), b"DICM-bytes" * 10, {"source": "stow", "n": 1})
    assert stat.S_IMODE(entry.path.stat().st_mode) == 0o600
    assert len(spool) == 1 and spool.pending_count() == 1
    claimed = spool.claim()
    assert claimed is not None
    assert claimed.sop_instance_uid == uid(1)
    assert claimed.meta == {"source": "stow", "n": 1}
    assert claimed.read_data() == b"DICM-bytes" * 10
    assert spool.pending_count() == 0 and spool.claimed_count() == 1
    assert spool.claim() is None
    spool.done(claimed)
    assert len(spool) == 0 and spool.total_bytes == 0
    assert not any(spool.pending_dir.iterdir()) and not any(spool.claimed_dir.iterdir())


def test_claims_come_oldest_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_entries=10, max_bytes=10**6)
    for n in range(5):
        entry = spool.put(uid(n), b"x", {})
        os.utime(entry.path, ns=(n * 10**9, n * 10**9))
    order = []
    for _ in range(5):
        claimed = spool.claim()
        assert claimed is not None
        order.append(claimed.sop_instance_uid)
    assert order == [uid(n) for n in range(5)]


@pytest.mark.parametrize("bad", ["../etc/passwd", "1.2.3/4", "", "1." + "2" * 70, "1..2"])
def test_a_string_that_is_not_a_uid_is_refused(tmp_path: Path, bad: str) -> None:
    spool = Spool(tmp_path, max_entries=10, max_bytes=10**6)
    with pytest.raises(ValueError):
        spool.put(bad, b"x", {})
    assert len(spool) == 0 and not list(spool.pending_dir.iterdir())


def test_the_count_bound_refuses_with_spool_full_until_an_entry_is_done(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_entries=3, max_bytes=10**6)
    for n in range(3):
        spool.put(uid(n), b"x", {})
    with pytest.raises(SpoolFull):
        spool.put(uid(3), b"x", {})
    assert len(spool) == 3 and spool.pending_count() == 3
    entry = spool.claim()
    assert entry is not None
    with pytest.raises(SpoolFull):  # a claimed entry still holds its place
        spool.put(uid(3), b"x", {})
    spool.done(entry)
    spool.put(uid(3), b"x", {})
    assert len(spool) == 3


def test_the_byte_bound_counts_the_whole_entry(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_entries=100, max_bytes=5000)
    spool.put(uid(1), b"a" * 2000, {})
    spool.put(uid(2), b"b" * 2000, {})
    with pytest.raises(SpoolFull):
        spool.put(uid(3), b"c" * 2000, {})
    assert spool.total_bytes == sum(p.stat().st_size for p in spool.pending_dir.iterdir())
    assert spool.total_bytes <= 5000
    assert spool.pending_count() == 2  # the refused put left nothing behind


def test_a_duplicate_uid_replaces_the_pending_entry(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_entries=2, max_bytes=10**6)
    spool.put(uid(1), b"old", {"v": 1})
    spool.put(uid(1), b"newer bytes", {"v": 2})
    assert len(spool) == 1 and spool.pending_count() == 1
    # replacing does not count against the bound a second time
    spool.put(uid(2), b"other", {})
    entries = [spool.claim(), spool.claim()]
    by_uid = {e.sop_instance_uid: e for e in entries if e is not None}
    assert by_uid[uid(1)].read_data() == b"newer bytes"
    assert by_uid[uid(1)].meta == {"v": 2}


def test_a_duplicate_of_a_claimed_entry_waits_in_pending(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_entries=10, max_bytes=10**6)
    spool.put(uid(1), b"first", {})
    running = spool.claim()
    assert running is not None
    spool.put(uid(1), b"second", {})
    assert spool.pending_count() == 1 and spool.claimed_count() == 1 and len(spool) == 2
    assert running.read_data() == b"first"  # the running job's bytes are untouched
    spool.done(running)
    again = spool.claim()
    assert again is not None and again.read_data() == b"second"


def test_recover_returns_claimed_entries_and_sweeps_temporary_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_entries=10, max_bytes=10**6)
    for n in range(3):
        spool.put(uid(n), b"data", {})
    first, second = spool.claim(), spool.claim()
    assert first is not None and second is not None
    (spool.pending_dir / ".tmp-leftover").write_bytes(b"half an entry")
    # a fresh process after a crash: totals come from the directories
    restarted = Spool(tmp_path, max_entries=10, max_bytes=10**6)
    assert len(restarted) == 3
    assert restarted.recover() == 2
    assert restarted.pending_count() == 3 and restarted.claimed_count() == 0
    assert not (spool.pending_dir / ".tmp-leftover").exists()
    claimed = {restarted.claim().sop_instance_uid for _ in range(3)}  # type: ignore[union-attr]
    assert claimed == {uid(0), uid(1), uid(2)}


_CRASHING_PUT = """
import os, sys
from app.pacs.spool import Spool
spool = Spool(sys.argv[1], max_entries=10, max_bytes=10**9)
def crash(fd):  # the process dies after writing, before the data is durable and renamed
    os._exit(9)
os.fsync = crash
spool.put(sys.argv[2], b"\\x00" * 5_000_000, {"source": "test"})
"""


def test_a_process_killed_inside_put_leaves_no_entry(tmp_path: Path) -> None:
    state = tmp_path / "state"
    done = subprocess.run(
        [sys.executable, "-c", _CRASHING_PUT, str(state), uid(7)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 9, done.stderr
    leftovers = list((state / "pending").iterdir())
    assert [p.name.startswith(".tmp-") for p in leftovers] == [True]  # the half-written temp
    spool = Spool(state, max_entries=10, max_bytes=10**9)
    assert len(spool) == 0 and spool.claim() is None
    spool.recover()
    assert list((state / "pending").iterdir()) == []


def _claim_all(state: str) -> list[str]:
    spool = Spool(state, max_entries=1000, max_bytes=10**9)
    taken = []
    for _ in range(1000):  # bounded: there are 200 entries
        entry = spool.claim()
        if entry is None:
            break
        taken.append(entry.sop_instance_uid)
    return taken


def test_four_processes_never_claim_the_same_entry(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_entries=1000, max_bytes=10**9)
    for n in range(200):
        spool.put(uid(n), b"x" * 100, {})
    with ProcessPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(_claim_all, [str(tmp_path)] * 4, timeout=120))
    taken = [u for result in results for u in result]
    assert len(taken) == 200
    assert set(taken) == {uid(n) for n in range(200)}
    assert spool.pending_count() == 0 and spool.claimed_count() == 200


def test_concurrent_puts_of_one_uid_keep_the_totals_exact(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_entries=1000, max_bytes=10**9)

    def put_many(worker: int) -> None:
        for n in range(50):
            spool.put(uid(n % 5), bytes([worker]) * 1000, {})

    threads = [threading.Thread(target=put_many, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    on_disk = sorted(spool.pending_dir.iterdir())
    assert len(on_disk) == 5 and len(spool) == 5
    assert spool.total_bytes == sum(p.stat().st_size for p in on_disk)


def test_a_failed_write_gives_its_reservation_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, max_entries=1, max_bytes=10**6)

    def failing_fsync(fd: int) -> None:  # the disk reports an I/O error
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(OSError):
            spool.put(uid(1), b"x", {})
    assert len(spool) == 0 and spool.total_bytes == 0
    assert list(spool.pending_dir.iterdir()) == []  # the temporary file is gone too
    spool.put(uid(1), b"x", {})  # the bound of one is free again
