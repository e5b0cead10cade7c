"""The outbox on both backends (SQLite file, real PostgreSQL): idempotent enqueue, leases, retry and
give-up, purge, look-up, statistics, and two workers racing on PostgreSQL."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from app.pacs.delivery import DeliveryWorker, Outcome
from app.pacs.outbox import SQLITE_FILE, Delivery, Outbox
from tests.app.pacs.pacs_results import enqueue_answer, factory_source, make_facts

DEST = "stow:pacs-a"
OTHER = "dimse:PACS_B"
T0 = 1_800_000_000.0

OutboxFactory = Callable[..., Outbox]


def test_enqueue_is_idempotent_per_instance_and_destination(outbox_factory: OutboxFactory) -> None:
    box = outbox_factory()
    source, facts = factory_source(index=1), make_facts()
    objects = enqueue_answer(box, source, facts, [DEST, OTHER], now=T0)
    again = enqueue_answer(box, source, make_facts(probability=0.5), [DEST], now=T0 + 5)
    assert [o.sop_instance_uid for o in objects] == [o.sop_instance_uid for o in again]
    assert box.stats(now=T0).counts == {("pending", DEST): 2, ("pending", OTHER): 2}
    claimed = box.claim("w1", now=T0 + 10, limit=10)
    assert len(claimed) == 4
    # the bytes first stored are the ones sent, so every re-send is identical
    by_uid = {o.sop_instance_uid: o.payload for o in objects}
    assert all(d.payload == by_uid[d.sop_instance_uid] for d in claimed)
    stored = box.result(objects[0].sop_instance_uid)
    assert stored is not None and stored.result_json["probabilities"]["PNEUMONIA"] == 0.8731


def test_claim_leases_and_an_expired_lease_is_claimed_again(outbox_factory: OutboxFactory) -> None:
    box = outbox_factory(lease_s=60.0)
    enqueue_answer(box, factory_source(index=2), make_facts(), [DEST], now=T0)
    first = box.claim("w1", now=T0, limit=10)
    assert len(first) == 2 and all(d.attempts == 1 for d in first)
    assert box.claim("w2", now=T0 + 59, limit=10) == []
    second = box.claim("w2", now=T0 + 61, limit=10)
    assert sorted(d.id for d in second) == sorted(d.id for d in first)
    assert all(d.attempts == 2 and d.lease_owner == "w2" for d in second)
    # the first worker's late answer must not settle a row it no longer holds
    assert box.mark_delivered(first[0], now=T0 + 62) is False
    assert box.mark_delivered(second[0], now=T0 + 62) is True
    states = Counter(d.state for d in box.result(first[0].sop_instance_uid).deliveries)  # type: ignore[union-attr]
    assert states == {"delivered": 1, "pending": 1}


def test_retry_waits_then_gives_up_and_keeps_the_failure(outbox_factory: OutboxFactory) -> None:
    box = outbox_factory(give_up_after_s=100.0)
    objects = enqueue_answer(box, factory_source(index=3), make_facts(), [DEST], now=T0)
    for delivery in box.claim("w1", now=T0, limit=10):
        assert box.mark_retry(delivery, 30.0, "http 503", now=T0) == "pending"
    assert box.claim("w1", now=T0 + 29, limit=10) == []
    retried = box.claim("w1", now=T0 + 31, limit=10)
    assert len(retried) == 2
    assert box.mark_retry(retried[0], 30.0, "ConnectError", now=T0 + 101) == "failed"
    box.mark_failed(retried[1], "http 409 failure reason 0x0110", now=T0 + 101)
    stored = box.result(objects[0].sop_instance_uid)
    assert stored is not None
    assert {(d.state, d.last_error) for d in stored.deliveries} == {
        ("failed", "gave up: ConnectError"),
        ("failed", "http 409 failure reason 0x0110"),
    }
    # failed rows are never claimed, and stay visible for the retention after they failed
    assert box.claim("w1", now=T0 + 10_000, limit=10) == []
    assert box.purge_expired(1000.0, now=T0 + 1000) == 0
    assert box.stats(now=T0 + 200).counts == {("failed", DEST): 2}
    assert box.purge_expired(1000.0, now=T0 + 1102) == 1
    assert box.result(objects[0].sop_instance_uid) is None and box.stats().counts == {}


def test_error_summaries_cannot_carry_arbitrary_text(outbox_factory: OutboxFactory) -> None:
    box = outbox_factory()
    enqueue_answer(box, factory_source(index=4), make_facts(), [DEST], now=T0)
    delivery = box.claim("w1", now=T0, limit=1)[0]
    box.mark_failed(delivery, "x" * 500 + "<Patient Name>\nHeader: a,b;c", now=T0)
    stored = box.result(delivery.sop_instance_uid)
    assert stored is not None
    error = next(d.last_error for d in stored.deliveries if d.state == "failed")
    assert error is not None and len(error) == 200 and set(error) == {"x"}


def test_purge_drops_only_old_delivered_rows(outbox_factory: OutboxFactory) -> None:
    box = outbox_factory()
    old = enqueue_answer(box, factory_source(index=5), make_facts(), [DEST], now=T0)
    new = enqueue_answer(box, factory_source(index=6), make_facts(), [DEST], now=T0)
    for delivery in box.claim("w1", now=T0, limit=10):
        when = T0 if delivery.sop_instance_uid in {o.sop_instance_uid for o in old} else T0 + 500
        box.mark_delivered(delivery, now=when)
    assert box.purge_expired(1000.0, now=T0 + 1200) == 1
    assert box.result(old[0].sop_instance_uid) is None
    kept = box.result(new[0].sop_instance_uid)
    assert kept is not None and {d.state for d in kept.deliveries} == {"delivered"}


def test_stats_count_by_state_and_age_the_oldest_pending(outbox_factory: OutboxFactory) -> None:
    box = outbox_factory()
    enqueue_answer(box, factory_source(index=7), make_facts(), [DEST, OTHER], now=T0)
    enqueue_answer(box, factory_source(index=8), make_facts(), [DEST], now=T0 + 50)
    for delivery in box.claim("w1", now=T0 + 60, limit=10):
        if delivery.destination == OTHER:
            box.mark_delivered(delivery, now=T0 + 60)
    stats = box.stats(now=T0 + 100)
    assert stats.counts == {("pending", DEST): 4, ("delivered", OTHER): 2}
    assert stats.oldest_pending_age_s == pytest.approx(100.0)


def test_sqlite_outbox_file_is_private_and_survives_reopening(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "state")
    objects = enqueue_answer(box, factory_source(index=9), make_facts(), [DEST], now=T0)
    box.close()
    path = tmp_path / "state" / SQLITE_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for side in path.parent.glob(SQLITE_FILE + "-*"):
        assert stat.S_IMODE(os.stat(side).st_mode) == 0o600, side.name
    reopened = Outbox.open(tmp_path / "state")
    try:
        assert len(reopened.claim("w", now=T0, limit=10)) == len(objects)
    finally:
        reopened.close()


class RecordingDestination:
    """A destination that stores into a list, slowly enough that racing workers overlap."""

    def __init__(self, name: str, log: list[str], lock: threading.Lock) -> None:
        self.name = name
        self._log, self._lock = log, lock

    def send(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        time.sleep(0.01)
        with self._lock:
            self._log.extend(d.sop_instance_uid for d in deliveries)
        return [Outcome("stored", "test") for _ in deliveries]


def test_two_workers_racing_on_postgresql_deliver_each_object_once(postgres_url: str) -> None:
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("DROP TABLE IF EXISTS pacs_deliveries, pacs_objects, pacs_results")
    boxes = [Outbox.open(url=postgres_url) for _ in range(3)]
    try:
        expected = set()
        for index in range(40):
            objects = enqueue_answer(
                boxes[0], factory_source(index=100 + index), make_facts(), [DEST]
            )
            expected |= {o.sop_instance_uid for o in objects}
        log: list[str] = []
        lock = threading.Lock()
        workers = [
            DeliveryWorker(
                box,
                [RecordingDestination(DEST, log, lock)],
                batch_size=3,
                poll_interval_s=0.01,
                worker_id=f"w{i}",
            )
            for i, box in enumerate(boxes[1:])
        ]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(set(log)) < len(expected):
            time.sleep(0.05)
        for worker in workers:
            assert worker.stop(timeout_s=10)
        assert Counter(log) == Counter(dict.fromkeys(expected, 1))
        # both really worked: each took part of the queue
        assert all(worker.counts["delivered"] > 0 for worker in workers), [
            w.counts for w in workers
        ]
        assert boxes[0].stats().counts == {("delivered", DEST): len(expected)}
    finally:
        for box in boxes:
            box.close()


def test_worker_settles_and_purges_after_the_retention(outbox_factory: OutboxFactory) -> None:
    box = outbox_factory()
    objects = enqueue_answer(box, factory_source(index=60), make_facts(), [DEST], now=T0)
    log: list[str] = []
    clock = [T0]
    worker = DeliveryWorker(
        box,
        [RecordingDestination(DEST, log, threading.Lock())],
        retention_s=3600.0,
        purge_every_s=60.0,
        clock=lambda: clock[0],
    )
    assert worker.run_once() == 2
    assert sorted(log) == sorted(o.sop_instance_uid for o in objects)
    assert box.stats(now=T0).counts == {("delivered", DEST): 2}
    clock[0] = T0 + 1800  # within the retention: kept
    assert worker.run_once() == 0
    assert box.result(objects[0].sop_instance_uid) is not None
    clock[0] = T0 + 3700
    assert worker.run_once() == 0
    assert box.result(objects[0].sop_instance_uid) is None
    assert box.stats(now=clock[0]).counts == {}


def test_postgresql_outbox_reconnects_after_its_connection_is_cut(postgres_url: str) -> None:
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("DROP TABLE IF EXISTS pacs_deliveries, pacs_objects, pacs_results")
    box = Outbox.open(url=postgres_url)
    try:
        enqueue_answer(box, factory_source(index=70), make_facts(), [DEST], now=T0)
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND datname = current_database()"
            )
        with pytest.raises(psycopg.OperationalError):
            box.stats(now=T0)
        assert box.stats(now=T0).counts == {("pending", DEST): 2}
    finally:
        box.close()
