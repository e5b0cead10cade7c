"""A durable outbox of result objects waiting to reach their PACS destinations.

A row is committed before the answer is considered delivered anywhere. A result leaves when its
retention has passed (`purge_expired`): counted from when it was stored, and from when its last
delivery ended (delivered, or failed for good), never while one is still being tried; with no
destination at all, from when it was stored. An operator may remove one earlier (`delete_result`).
The store holds at most `max_results` results (`ResultsStoreFull` past it). Two backends with the
same schema and semantics:

- SQLite (the default, embedded): one file under the state directory, created with mode 0600, in
  WAL mode with `synchronous=FULL`, so that a committed row survives the process being killed,
  and with `secure_delete=ON`, so that a purged or deleted result's bytes are overwritten with
  zeros rather than left in free pages of the file.
  Several processes on one host may share it; writes are serialised by SQLite's lock.
- PostgreSQL (`postgresql://...`): for replicas sharing one queue. Claims use
  `SELECT ... FOR UPDATE SKIP LOCKED`, so two workers never claim the same delivery.

A claim is a lease: a worker that dies holding deliveries loses them when the lease expires, and
another worker sends them again. Result UIDs are deterministic and the objects carry no clock, so
such a re-send is the same instance byte for byte, never a second one; an archive that refuses the
second copy is handled by `app.pacs.delivery`.

Error summaries are short strings chosen by the delivery code (an HTTP status, a DIMSE status, an
exception class); `_summary` also truncates them and strips anything but a safe character set, so a
server's echoed body can never end up stored here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from app.errors import ResultsStoreFull

logger = logging.getLogger(__name__)

State = Literal["pending", "delivered", "failed"]
STATES: tuple[State, ...] = ("pending", "delivered", "failed")

SQLITE_FILE = "pacs-outbox.sqlite3"
DEFAULT_LEASE_S = 120.0
DEFAULT_GIVE_UP_AFTER_S = 7 * 24 * 3600.0

_SAFE = re.compile(r"[^A-Za-z0-9 _.:=/()\-]")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS pacs_results (
        result_key TEXT PRIMARY KEY,
        result_json TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS pacs_objects (
        sop_instance_uid TEXT PRIMARY KEY,
        result_key TEXT NOT NULL REFERENCES pacs_results(result_key),
        kind TEXT NOT NULL,
        sop_class_uid TEXT NOT NULL,
        payload {blob} NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS pacs_deliveries (
        id {serial},
        sop_instance_uid TEXT NOT NULL REFERENCES pacs_objects(sop_instance_uid),
        destination TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        lease_owner TEXT,
        lease_until DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        last_error TEXT,
        UNIQUE (sop_instance_uid, destination)
    )""",
    """CREATE INDEX IF NOT EXISTS pacs_deliveries_due
        ON pacs_deliveries (state, next_attempt_at)""",
)


@dataclass(frozen=True)
class ResultObject:
    """One encoded DICOM object of an answer."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    payload: bytes


@dataclass(frozen=True)
class Delivery:
    """One object for one destination, claimed by a worker until `lease_until`."""

    id: int
    destination: str
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    payload: bytes
    attempts: int
    created_at: float
    lease_owner: str


@dataclass(frozen=True)
class DeliveryState:
    destination: str
    kind: str
    sop_instance_uid: str
    state: State
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class StoredResult:
    result_key: str
    result_json: dict[str, Any]
    deliveries: list[DeliveryState]


@dataclass(frozen=True)
class OutboxStats:
    """Counts by (state, destination) and the age of the oldest undelivered row, in seconds."""

    counts: dict[tuple[str, str], int]
    oldest_pending_age_s: float | None


def _summary(text: str) -> str:
    return _SAFE.sub("?", text)[:200]


class OutboxUnavailable(Exception):
    """The outbox database cannot be reached or used. The message names the failure's class
    only: a driver's own message may quote the connection string, password included."""


class _Database(Protocol):
    dialect: Literal["sqlite", "postgresql"]

    @contextmanager
    def transaction(self) -> Iterator[_QmarkCursor]: ...

    def close(self) -> None: ...


class _Sqlite:
    dialect: Literal["sqlite", "postgresql"] = "sqlite"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            # created 0600 before SQLite opens it: result JSON and DICOM objects carry patient data
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(path, 0o600)
        self._connection = sqlite3.connect(
            path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.Lock()
        with self._lock:
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=FULL")
            self._connection.execute("PRAGMA foreign_keys=ON")
            # patient data must not outlive its deletion in free pages (SQLite's default is a
            # compile-time option: set it, whatever this build's is)
            self._connection.execute("PRAGMA secure_delete=ON")
        for side_file in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if side_file.exists():
                os.chmod(side_file, 0o600)

    @contextmanager
    def transaction(self) -> Iterator[_QmarkCursor]:
        with self._lock:
            cursor = self._connection.cursor()
            # IMMEDIATE: take the write lock up front, so that two processes claiming at once
            # serialise instead of both reading the same due rows.
            cursor.execute("BEGIN IMMEDIATE")
            try:
                yield _QmarkCursor(cursor)
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._connection.close()


class _QmarkCursor:
    """The SQL in this module is written with `?` placeholders; SQLite takes them as they are."""

    def __init__(self, cursor: Any, style: str = "?") -> None:
        self._cursor = cursor
        self._style = style

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _QmarkCursor:
        if self._style != "?":
            sql = sql.replace("?", self._style)
        self._cursor.execute(sql, tuple(params))
        return self

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self._cursor.fetchall())

    def fetchone(self) -> tuple[Any, ...] | None:
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)


class _Postgres:
    dialect: Literal["sqlite", "postgresql"] = "postgresql"

    def __init__(self, url: str) -> None:
        self._url = url
        self._connection = self._connect()
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        import psycopg

        try:
            return psycopg.connect(self._url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            # `from None`: the driver's message (and a logged traceback) may quote the URL
            raise OutboxUnavailable(
                f"the PostgreSQL outbox cannot be reached ({type(exc).__name__})"
            ) from None

    @contextmanager
    def transaction(self) -> Iterator[_QmarkCursor]:
        with self._lock:
            # after a database restart or a network cut the connection is broken for good: the
            # failed call raised to its caller, the next one gets a new connection
            if self._connection.closed or self._connection.broken:
                self._connection = self._connect()
            with self._connection.transaction():
                yield _QmarkCursor(self._connection.cursor(), "%s")

    def close(self) -> None:
        with self._lock:
            self._connection.close()


class Outbox:
    """The queue of result objects per destination. Thread-safe; one instance per process."""

    def __init__(
        self,
        database: _Database,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        give_up_after_s: float = DEFAULT_GIVE_UP_AFTER_S,
        max_results: int | None = None,
    ) -> None:
        self._db = database
        self.lease_s = lease_s
        self.give_up_after_s = give_up_after_s
        # Most results the store holds; None: no bound. A result already stored may always be
        # stored again (`enqueue` is idempotent), even when the store is full.
        self.max_results = max_results
        blob, serial = (
            ("BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT")
            if database.dialect == "sqlite"
            else ("BYTEA", "BIGSERIAL PRIMARY KEY")
        )
        with self._db.transaction() as cursor:
            if database.dialect == "postgresql":
                # replicas starting together must not race on CREATE TABLE IF NOT EXISTS
                cursor.execute("SELECT pg_advisory_xact_lock(734120931)")
            for statement in _SCHEMA:
                cursor.execute(statement.format(blob=blob, serial=serial))

    @classmethod
    def open(
        cls,
        state_dir: Path | None = None,
        url: str | None = None,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        give_up_after_s: float = DEFAULT_GIVE_UP_AFTER_S,
        max_results: int | None = None,
    ) -> Outbox:
        """PostgreSQL when `url` is given, otherwise SQLite in `state_dir`."""
        database: _Database
        if url is not None:
            if not url.startswith(("postgresql://", "postgres://")):
                raise ValueError("the outbox URL must be a postgresql:// URL")
            database = _Postgres(url)
        elif state_dir is not None:
            database = _Sqlite(Path(state_dir) / SQLITE_FILE)
        else:
            raise ValueError("the outbox needs a state directory or a PostgreSQL URL")
        return cls(
            database, lease_s=lease_s, give_up_after_s=give_up_after_s, max_results=max_results
        )

    def close(self) -> None:
        self._db.close()

    def enqueue(
        self,
        result_key: str,
        objects: Sequence[ResultObject],
        destinations: Sequence[str],
        result_json: dict[str, Any],
        *,
        now: float | None = None,
        routes: Mapping[str, Sequence[str]] | None = None,
    ) -> int:
        """Store an answer's objects for each destination; returns the deliveries added.

        `routes` maps an object kind to the destinations that take it instead (the HL7 message
        goes to the RIS only, the SR to the PACS only); kinds it does not name go to all of
        `destinations`. One transaction: the result, its objects and every delivery, or nothing.

        Idempotent: an object already queued for a destination (same SOP Instance UID) is left as
        it is, in whatever state, with the bytes first stored, so every re-send is byte-identical.
        """
        at = time.time() if now is None else now
        added = 0
        document = json.dumps(result_json, separators=(",", ":"), sort_keys=True)
        with self._db.transaction() as cursor:
            if self.max_results is not None:
                self._check_room(cursor, result_key)
            cursor.execute(
                "INSERT INTO pacs_results (result_key, result_json, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (result_key) DO NOTHING",
                (result_key, document, at),
            )
            for obj in objects:
                cursor.execute(
                    "INSERT INTO pacs_objects "
                    "(sop_instance_uid, result_key, kind, sop_class_uid, payload) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (sop_instance_uid) DO NOTHING",
                    (obj.sop_instance_uid, result_key, obj.kind, obj.sop_class_uid, obj.payload),
                )
                targets = destinations if routes is None else routes.get(obj.kind, destinations)
                for destination in targets:
                    cursor.execute(
                        "INSERT INTO pacs_deliveries "
                        "(sop_instance_uid, destination, created_at, next_attempt_at) "
                        "VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (sop_instance_uid, destination) DO NOTHING",
                        (obj.sop_instance_uid, destination, at, at),
                    )
                    added += cursor.rowcount
        return added

    def _check_room(self, cursor: _QmarkCursor, result_key: str) -> None:
        """ResultsStoreFull when `max_results` are stored and `result_key` is not one of them."""
        row = cursor.execute("SELECT COUNT(*) FROM pacs_results").fetchone()
        stored = int(row[0]) if row else 0
        if self.max_results is None or stored < self.max_results:
            return
        known = cursor.execute(
            "SELECT 1 FROM pacs_results WHERE result_key = ?", (result_key,)
        ).fetchone()
        if known is None:
            raise ResultsStoreFull(
                f"the results store holds its limit of {self.max_results} results "
                "(CXR_RESULTS_MAX_STORED); results leave after CXR_RESULTS_RETENTION_S, or an "
                "operator removes them (DELETE /results/...)"
            )

    def count_results(self) -> int:
        with self._db.transaction() as cursor:
            row = cursor.execute("SELECT COUNT(*) FROM pacs_results").fetchone()
        return int(row[0]) if row else 0

    def is_full(self) -> bool:
        """Whether a new result would be refused now (`max_results` reached)."""
        return self.max_results is not None and self.count_results() >= self.max_results

    def require_room(self) -> None:
        """ResultsStoreFull when a new result would be refused: for intakes that take an image
        now and store its result later (STOW-RS), so that they refuse it while they still can."""
        if self.is_full():
            with self._db.transaction() as cursor:
                self._check_room(cursor, "")

    def claim(self, worker_id: str, now: float | None = None, limit: int = 16) -> list[Delivery]:
        """Lease up to `limit` due deliveries (oldest first) to `worker_id` for `lease_s`."""
        at = time.time() if now is None else now
        due = (
            "SELECT id FROM pacs_deliveries WHERE state = 'pending' AND next_attempt_at <= ? "
            "AND (lease_until IS NULL OR lease_until <= ?) ORDER BY next_attempt_at, id LIMIT ?"
        )
        if self._db.dialect == "postgresql":
            due += " FOR UPDATE SKIP LOCKED"
        with self._db.transaction() as cursor:
            ids = [row[0] for row in cursor.execute(due, (at, at, limit)).fetchall()]
            if not ids:
                return []
            marks = ", ".join("?" for _ in ids)
            cursor.execute(
                "UPDATE pacs_deliveries SET lease_owner = ?, lease_until = ?, "
                f"attempts = attempts + 1 WHERE id IN ({marks})",
                (worker_id, at + self.lease_s, *ids),
            )
            rows = cursor.execute(
                "SELECT d.id, d.destination, o.kind, o.sop_class_uid, o.sop_instance_uid, "
                "o.payload, d.attempts, d.created_at FROM pacs_deliveries d "
                "JOIN pacs_objects o ON o.sop_instance_uid = d.sop_instance_uid "
                f"WHERE d.id IN ({marks}) ORDER BY d.next_attempt_at, d.id",
                ids,
            ).fetchall()
        return [
            Delivery(
                id=int(row[0]),
                destination=str(row[1]),
                kind=str(row[2]),
                sop_class_uid=str(row[3]),
                sop_instance_uid=str(row[4]),
                payload=bytes(row[5]),
                attempts=int(row[6]),
                created_at=float(row[7]),
                lease_owner=worker_id,
            )
            for row in rows
        ]

    def _finish(self, delivery: Delivery, sets: str, params: Sequence[Any]) -> bool:
        # Only the lease holder may settle a delivery: after its lease expired and another
        # worker claimed the row, a late answer from the first one must not overwrite it.
        with self._db.transaction() as cursor:
            cursor.execute(
                f"UPDATE pacs_deliveries SET {sets}, lease_owner = NULL, lease_until = NULL "
                "WHERE id = ? AND lease_owner = ? AND state = 'pending'",
                (*params, delivery.id, delivery.lease_owner),
            )
            return cursor.rowcount == 1

    def mark_delivered(self, delivery: Delivery, now: float | None = None) -> bool:
        at = time.time() if now is None else now
        return self._finish(
            delivery, "state = 'delivered', finished_at = ?, last_error = NULL", (at,)
        )

    def mark_failed(self, delivery: Delivery, reason: str, now: float | None = None) -> bool:
        """Permanent failure: never retried; kept, visible in `result` and `stats`, until the
        retention has passed from now (`purge_expired`)."""
        at = time.time() if now is None else now
        return self._finish(
            delivery,
            "state = 'failed', finished_at = ?, last_error = ?",
            (at, _summary(reason)),
        )

    def mark_retry(
        self, delivery: Delivery, delay_s: float, error_summary: str, now: float | None = None
    ) -> State:
        """Retry after `delay_s`; past the give-up age the delivery becomes failed instead."""
        at = time.time() if now is None else now
        if at - delivery.created_at >= self.give_up_after_s:
            self.mark_failed(delivery, f"gave up: {error_summary}", now=at)
            return "failed"
        self._finish(
            delivery,
            "next_attempt_at = ?, last_error = ?",
            (at + max(0.0, delay_s), _summary(error_summary)),
        )
        return "pending"

    def purge_expired(self, retention_s: float, now: float | None = None) -> int:
        """Remove every result stored more than `retention_s` ago whose deliveries all ended
        (delivered or failed) more than `retention_s` ago, or that has none (no destination):
        the result, its objects and their deliveries. A result with a delivery still pending
        stays (it becomes failed after the give-up age, and is purged a retention later).
        Returns how many results were removed."""
        cutoff = (time.time() if now is None else now) - retention_s
        with self._db.transaction() as cursor:
            rows = cursor.execute(
                "SELECT r.result_key FROM pacs_results r WHERE r.created_at <= ? AND NOT EXISTS ("
                "SELECT 1 FROM pacs_objects o JOIN pacs_deliveries d "
                "ON d.sop_instance_uid = o.sop_instance_uid WHERE o.result_key = r.result_key "
                "AND (d.state = 'pending' OR d.finished_at IS NULL OR d.finished_at > ?))",
                (cutoff, cutoff),
            ).fetchall()
            for (key,) in rows:
                self._remove(cursor, str(key))
        return len(rows)

    def delete_result(self, result_key: str) -> list[str]:
        """Remove one result now, whatever its deliveries' state (a pending one is cancelled:
        a worker holding it finds it gone when it settles); returns the SOP Instance UIDs of the
        objects removed (empty when there was no such result)."""
        with self._db.transaction() as cursor:
            return self._remove(cursor, result_key)

    @staticmethod
    def _remove(cursor: _QmarkCursor, result_key: str) -> list[str]:
        uids = [
            str(row[0])
            for row in cursor.execute(
                "SELECT sop_instance_uid FROM pacs_objects WHERE result_key = ? "
                "ORDER BY sop_instance_uid",
                (result_key,),
            ).fetchall()
        ]
        cursor.execute(
            "DELETE FROM pacs_deliveries WHERE sop_instance_uid IN (SELECT sop_instance_uid "
            "FROM pacs_objects WHERE result_key = ?)",
            (result_key,),
        )
        cursor.execute("DELETE FROM pacs_objects WHERE result_key = ?", (result_key,))
        cursor.execute("DELETE FROM pacs_results WHERE result_key = ?", (result_key,))
        return uids

    def result(self, uid: str) -> StoredResult | None:
        """The stored answer and its delivery states, by result key or by the SOP Instance UID
        of one of its objects."""
        with self._db.transaction() as cursor:
            row = cursor.execute(
                "SELECT r.result_key, r.result_json FROM pacs_results r WHERE r.result_key = ? "
                "UNION SELECT r.result_key, r.result_json FROM pacs_results r "
                "JOIN pacs_objects o ON o.result_key = r.result_key WHERE o.sop_instance_uid = ?",
                (uid, uid),
            ).fetchone()
            if row is None:
                return None
            states = cursor.execute(
                "SELECT d.destination, o.kind, o.sop_instance_uid, d.state, d.attempts, "
                "d.last_error FROM pacs_deliveries d JOIN pacs_objects o "
                "ON o.sop_instance_uid = d.sop_instance_uid WHERE o.result_key = ? "
                "ORDER BY d.destination, o.kind",
                (row[0],),
            ).fetchall()
        return StoredResult(
            result_key=str(row[0]),
            result_json=json.loads(row[1]),
            deliveries=[
                DeliveryState(
                    destination=str(s[0]),
                    kind=str(s[1]),
                    sop_instance_uid=str(s[2]),
                    state=s[3],
                    attempts=int(s[4]),
                    last_error=None if s[5] is None else str(s[5]),
                )
                for s in states
            ],
        )

    def latest_result(self, key_prefix: str) -> StoredResult | None:
        """The result recorded last among those whose key starts with `key_prefix` (the results
        of one source UID under one reading, one per image content)."""
        # keys are UIDs, hex digests and fixed words (app.pacs.uids): no LIKE wildcard in them
        with self._db.transaction() as cursor:
            row = cursor.execute(
                "SELECT result_key FROM pacs_results WHERE result_key LIKE ? "
                "ORDER BY created_at DESC, result_key LIMIT 1",
                (key_prefix + "%",),
            ).fetchone()
        return None if row is None else self.result(str(row[0]))

    def objects(self, result_key: str) -> list[ResultObject]:
        """The encoded objects stored for a result, in the order they were enqueued."""
        with self._db.transaction() as cursor:
            rows = cursor.execute(
                "SELECT kind, sop_class_uid, sop_instance_uid, payload FROM pacs_objects "
                "WHERE result_key = ? ORDER BY kind DESC",
                (result_key,),
            ).fetchall()
        return [ResultObject(str(k), str(c), str(u), bytes(p)) for k, c, u, p in rows]

    def stats(self, now: float | None = None) -> OutboxStats:
        at = time.time() if now is None else now
        with self._db.transaction() as cursor:
            counts = cursor.execute(
                "SELECT state, destination, COUNT(*) FROM pacs_deliveries "
                "GROUP BY state, destination"
            ).fetchall()
            oldest = cursor.execute(
                "SELECT MIN(created_at) FROM pacs_deliveries WHERE state = 'pending'"
            ).fetchone()
        first = None if oldest is None or oldest[0] is None else float(oldest[0])
        return OutboxStats(
            counts={(str(s), str(d)): int(n) for s, d, n in counts},
            oldest_pending_age_s=None if first is None else max(0.0, at - first),
        )


class RetentionSweeper:
    """A thread that purges expired results (`Outbox.purge_expired`) at start and every
    `every_s`, for a process whose results have no delivery worker to do it (no destination
    configured): results with patient data are not kept past their retention either way."""

    def __init__(self, outbox: Outbox, retention_s: float, every_s: float = 600.0) -> None:
        self.outbox = outbox
        self.retention_s = retention_s
        self.every_s = every_s
        self.purged = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> int:
        removed = self.outbox.purge_expired(self.retention_s)
        self.purged += removed
        if removed:
            logger.info("expired results purged", extra={"fields": {"results": removed}})
        return removed

    def _loop(self) -> None:
        while True:
            try:
                self.sweep()
            except Exception as error:  # the database briefly unreachable: next round
                logger.warning(
                    "retention sweep failed", extra={"fields": {"error": type(error).__name__}}
                )
            if self._stop.wait(self.every_s):
                return

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the sweeper is already started")
        self._thread = threading.Thread(target=self._loop, name="results-retention", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
