"""A durable directory spool for received DICOM instances, between intake and the workers.

Intake (the C-STORE SCP, the STOW-RS endpoint) answers success only once an instance is in the
spool, so the spool, not memory, is what survives a crash. Layout under the state directory:

    pending/<SOP Instance UID>.entry     waiting for a worker
    claimed/<SOP Instance UID>.entry     taken by a worker (`claim`), removed by `done`
    pending/.tmp-*                       a `put` under way; never read, removed by `recover`

One entry is one file: a fixed magic, the length of a JSON metadata block, the block, then the
instance's bytes (PS3.10, as received). A single file is what makes `put` atomic: it is written
to a temporary name in `pending/`, flushed with fsync, renamed into place and the directory
fsynced, so after a crash an entry is either whole or absent (a leftover temporary file is swept
by `recover`). Files are created mode 0600: they hold patient data.

`claim` renames an entry from `pending/` to `claimed/`. rename(2) is atomic, so of two workers,
even in two processes, exactly one wins; the loser gets FileNotFoundError and tries the next one.
`recover` (at start-up, before any worker runs) returns every claimed entry to `pending/`: a
worker that died mid-job leaves its entry claimed, and it is processed again.

Duplicates: a `put` with a SOP Instance UID already pending replaces that entry (rename over
it). A router re-sends an instance after a failure or a correction, and the newer bytes are the
ones worth reading; one UID keeps one pending entry, so it yields one result, not two. An entry
already claimed is not touched: the re-sent instance waits in `pending/` and is processed again
after the running job, which is the honest outcome when the bytes may differ.

Admission control: the spool holds at most `max_entries` entries and `max_bytes` bytes (pending
and claimed together, since both occupy the disk). A `put` that would pass either raises
`SpoolFull`; intake turns that into C-STORE 0xA700 or STOW-RS FailureReason 0xA700 / HTTP 503.
The running totals are kept in memory under a lock (counted from the directories at start-up and
by `recover`), so the bound holds exactly within one process and approximately across several.

Order: `claim` takes the oldest pending entry by modification time (a scan of `pending/`, cheap
at the bounded sizes intended here, a few thousand entries).
"""

from __future__ import annotations

import json
import os
import struct
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.imaging.dicom.values import is_uid

MAGIC = b"CXRSPL01"
_HEADER = struct.Struct(">8sI")  # magic, length of the JSON metadata block
_SUFFIX = ".entry"
_TEMP_PREFIX = ".tmp-"


class SpoolFull(Exception):
    """The spool is at its bound (count or bytes): the sender should retry later."""


class SpoolCorrupt(Exception):
    """An entry file does not have the spool's format (it was not written by `put`)."""


@dataclass(frozen=True)
class SpoolEntry:
    """One spooled instance: its UID, where its file is now, and the metadata `put` stored."""

    sop_instance_uid: str
    path: Path
    size: int
    meta: dict[str, Any] = field(default_factory=dict)

    def read_data(self) -> bytes:
        """The instance's bytes exactly as they were given to `put`."""
        with self.path.open("rb") as handle:
            _, meta_length = _HEADER.unpack(handle.read(_HEADER.size))
            handle.seek(_HEADER.size + meta_length)
            return handle.read()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_entry(path: Path, uid: str) -> SpoolEntry:
    with path.open("rb") as handle:
        head = handle.read(_HEADER.size)
        if len(head) != _HEADER.size:
            raise SpoolCorrupt("spool entry shorter than its header")
        magic, meta_length = _HEADER.unpack(head)
        if magic != MAGIC:
            raise SpoolCorrupt("spool entry has the wrong magic")
        meta = json.loads(handle.read(meta_length))
        size = os.fstat(handle.fileno()).st_size
    return SpoolEntry(uid, path, size, meta)


class Spool:
    """A bounded, crash-safe queue of DICOM instances in `state_dir` (see the module docstring)."""

    def __init__(self, state_dir: str | os.PathLike[str], max_entries: int, max_bytes: int):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("the spool bounds must be positive")
        self.root = Path(state_dir)
        self.pending_dir = self.root / "pending"
        self.claimed_dir = self.root / "claimed"
        for directory in (self.root, self.pending_dir, self.claimed_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._count, self._bytes = self._scan_totals()
        # Told of every instance once it is on disk (the audit trail's "instances received"): the
        # SOP Instance UID and the entry's coded metadata (source, calling AE title).
        self.on_stored: Callable[[str, dict[str, Any]], None] | None = None

    # -- totals ------------------------------------------------------------------------------

    def _scan_totals(self) -> tuple[int, int]:
        count = total = 0
        for directory in (self.pending_dir, self.claimed_dir):
            for item in os.scandir(directory):
                if not self._is_entry(item.name):
                    continue
                try:  # another process may claim or finish it meanwhile
                    total += item.stat().st_size
                except FileNotFoundError:
                    continue
                count += 1
        return count, total

    def __len__(self) -> int:
        """Entries held: pending plus claimed."""
        with self._lock:
            return self._count

    @property
    def total_bytes(self) -> int:
        """Bytes held by the entries, pending plus claimed."""
        with self._lock:
            return self._bytes

    def pending_count(self) -> int:
        """Entries waiting for a worker (a directory scan, not the running total)."""
        return sum(1 for name in os.listdir(self.pending_dir) if self._is_entry(name))

    def claimed_count(self) -> int:
        """Entries a worker has claimed and not yet finished."""
        return sum(1 for name in os.listdir(self.claimed_dir) if self._is_entry(name))

    def oldest_arrival(self) -> float | None:
        """When the oldest entry still held (pending or claimed) was put, in epoch seconds (its
        file's modification time, which `claim`'s rename keeps); None when none is held."""
        oldest: float | None = None
        for directory in (self.pending_dir, self.claimed_dir):
            for item in os.scandir(directory):
                if not self._is_entry(item.name):
                    continue
                try:  # claimed or finished meanwhile
                    when = item.stat().st_mtime
                except FileNotFoundError:
                    continue
                oldest = when if oldest is None else min(oldest, when)
        return oldest

    @staticmethod
    def _is_entry(name: str) -> bool:
        return name.endswith(_SUFFIX) and not name.startswith(_TEMP_PREFIX)

    # -- put ---------------------------------------------------------------------------------

    def put(self, sop_instance_uid: str, data: bytes, meta: dict[str, Any]) -> SpoolEntry:
        """Store `data` durably under its SOP Instance UID; replaces a pending entry of that UID.

        Raises `SpoolFull` when the entry would pass the count or byte bound, `ValueError` for a
        string that is not a DICOM UID. Returns once the entry is on disk (fsynced).
        """
        # the UID is also the file name: digits and dots only (no path separator, no "..")
        if not is_uid(sop_instance_uid):
            raise ValueError("not a DICOM UID")
        meta_block = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
        size = _HEADER.size + len(meta_block) + len(data)
        final = self.pending_dir / f"{sop_instance_uid}{_SUFFIX}"
        with self._lock:
            existing = final.stat().st_size if final.exists() else 0
            count = self._count + (0 if existing else 1)
            if count > self.max_entries or self._bytes - existing + size > self.max_bytes:
                raise SpoolFull(
                    f"the spool holds {self._count} entries / {self._bytes} bytes; its bound is "
                    f"{self.max_entries} entries / {self.max_bytes} bytes"
                )
            # Reserve a whole new entry before the slow write, so concurrent puts cannot
            # overshoot; a replaced entry is given back when the rename happens.
            self._count += 1
            self._bytes += size
        temp = self.pending_dir / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        committed = False
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb", closefd=False) as handle:
                    handle.write(_HEADER.pack(MAGIC, len(meta_block)))
                    handle.write(meta_block)
                    handle.write(data)
                    handle.flush()
                os.fsync(fd)
            finally:
                os.close(fd)
            with self._lock:
                try:
                    replaced: int | None = final.stat().st_size
                except FileNotFoundError:
                    replaced = None
                os.replace(temp, final)
                committed = True
                if replaced is not None:
                    self._count -= 1
                    self._bytes -= replaced
            _fsync_dir(self.pending_dir)
        except BaseException:
            if not committed:
                temp.unlink(missing_ok=True)
                with self._lock:
                    self._count -= 1
                    self._bytes -= size
            raise
        if self.on_stored is not None:
            self.on_stored(sop_instance_uid, dict(meta))
        return SpoolEntry(sop_instance_uid, final, size, dict(meta))

    # -- claim / done ------------------------------------------------------------------------

    def claim(self) -> SpoolEntry | None:
        """Move the oldest pending entry to `claimed/` and return it; None when none is pending."""
        candidates: list[tuple[int, str]] = []
        for item in os.scandir(self.pending_dir):
            if self._is_entry(item.name):
                try:
                    candidates.append((item.stat().st_mtime_ns, item.name))
                except FileNotFoundError:  # claimed by another worker meanwhile
                    continue
        for _, name in sorted(candidates):
            target = self.claimed_dir / name
            try:
                # under the lock: a `put` replacing this UID sees it pending or claimed, not both
                with self._lock:
                    os.rename(self.pending_dir / name, target)
            except FileNotFoundError:
                continue
            return _read_entry(target, name.removesuffix(_SUFFIX))
        return None

    def done(self, entry: SpoolEntry) -> None:
        """Remove a claimed entry: its instance has been dealt with."""
        try:
            size = entry.path.stat().st_size
            entry.path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(entry.path.parent)
        with self._lock:
            self._count -= 1
            self._bytes -= size

    # -- start-up ----------------------------------------------------------------------------

    def recover(self) -> int:
        """Crash recovery, before any worker runs: delete leftover temporary files and return
        claimed entries to `pending/`. Returns how many entries went back to pending.

        A claimed entry whose UID is pending again (re-sent meanwhile) is dropped in favour of the
        newer pending one, as `put` would have done.
        """
        for item in os.scandir(self.pending_dir):
            if item.name.startswith(_TEMP_PREFIX):
                os.unlink(item.path)
        returned = 0
        for item in os.scandir(self.claimed_dir):
            if not self._is_entry(item.name):
                continue
            target = self.pending_dir / item.name
            if target.exists():
                os.unlink(item.path)
            else:
                os.rename(item.path, target)
                returned += 1
        _fsync_dir(self.pending_dir)
        _fsync_dir(self.claimed_dir)
        with self._lock:
            self._count, self._bytes = self._scan_totals()
        return returned
