"""Retention and deletion of results (issue 26, item 5), on both outbox backends (SQLite file,
real PostgreSQL): results leave after the retention whether or not a destination is configured
(they used to stay for ever without one, and failed deliveries for ever), the store is bounded
(and the C-STORE listener refuses while it is full), an operator can remove a result at once,
and SQLite overwrites what it deletes. The HTTP side is in tests/app/http/test_key_roles.py."""

from __future__ import annotations

import io
import sqlite3
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE

from app.errors import ResultsStoreFull
from app.pacs import outbox as outbox_module
from app.pacs.outbox import SQLITE_FILE, Outbox, RetentionSweeper
from app.pacs.scp import StorageListener
from app.pacs.spool import Spool
from app.settings import parse_dicom_peers
from tests.app.pacs.intake_tools import LOOPBACK, chest_gate, instance, unique_uid
from tests.app.pacs.pacs_results import enqueue_answer, factory_source, make_facts
from tests.app.pacs.test_pacs_outbox import OutboxFactory

DEST = "stow:pacs-a"
T0 = 1_800_000_000.0
DAY = 24 * 3600.0


def test_results_with_no_destination_leave_after_the_retention(
    outbox_factory: OutboxFactory,
) -> None:
    box = outbox_factory()
    old = enqueue_answer(box, factory_source(index=11), make_facts(), [], now=T0)
    new = enqueue_answer(box, factory_source(index=12), make_facts(), [], now=T0 + DAY)
    assert box.purge_expired(7 * DAY, now=T0 + 7 * DAY - 1) == 0
    assert box.result(old[0].sop_instance_uid) is not None
    assert box.purge_expired(7 * DAY, now=T0 + 7 * DAY) == 1
    assert box.result(old[0].sop_instance_uid) is None
    assert box.objects(old[0].sop_instance_uid) == []
    assert box.result(new[0].sop_instance_uid) is not None
    assert box.count_results() == 1


def test_a_failed_delivery_leaves_a_retention_after_it_failed_and_a_pending_one_never(
    outbox_factory: OutboxFactory,
) -> None:
    box = outbox_factory(give_up_after_s=DAY)
    failed = enqueue_answer(box, factory_source(index=13), make_facts(), [DEST], now=T0)
    pending = enqueue_answer(box, factory_source(index=14), make_facts(), [DEST], now=T0)
    failed_uids = {o.sop_instance_uid for o in failed}
    for delivery in box.claim("w1", now=T0 + DAY, limit=10):
        if delivery.sop_instance_uid in failed_uids:
            assert box.mark_retry(delivery, 1.0, "http 503", now=T0 + DAY) == "failed"
        else:
            box.mark_retry(delivery, 10 * DAY, "http 503", now=T0 + 10)  # retried much later
    assert box.purge_expired(7 * DAY, now=T0 + 8 * DAY - 1) == 0  # failed a day in: kept 7 more
    assert box.purge_expired(7 * DAY, now=T0 + 8 * DAY) == 1
    assert box.result(failed[0].sop_instance_uid) is None
    # the other is still being tried: stored long ago, never purged while pending
    assert box.purge_expired(7 * DAY, now=T0 + 30 * DAY) == 0
    kept = box.result(pending[0].sop_instance_uid)
    assert kept is not None and {d.state for d in kept.deliveries} == {"pending"}


def test_the_store_is_bounded_and_a_stored_result_can_be_stored_again(
    outbox_factory: OutboxFactory,
) -> None:
    box = outbox_factory(max_results=2)
    first = factory_source(index=15)
    enqueue_answer(box, first, make_facts(), [DEST], now=T0)
    assert not box.is_full()
    enqueue_answer(box, factory_source(index=16), make_facts(), [DEST], now=T0)
    assert box.is_full()
    with pytest.raises(ResultsStoreFull, match="CXR_RESULTS_MAX_STORED"):
        enqueue_answer(box, factory_source(index=17), make_facts(), [DEST], now=T0)
    with pytest.raises(ResultsStoreFull):
        box.require_room()
    enqueue_answer(box, first, make_facts(), [DEST], now=T0 + 1)  # idempotent: no new result
    assert box.count_results() == 2 and box.stats().counts == {("pending", DEST): 4}
    # a purge makes room again
    assert box.purge_expired(0.0, now=T0 + 10) == 0  # pending deliveries: nothing expires
    for delivery in box.claim("w1", now=T0 + 10, limit=10):
        box.mark_delivered(delivery, now=T0 + 10)
    assert box.purge_expired(5.0, now=T0 + 20) == 2
    enqueue_answer(box, factory_source(index=17), make_facts(), [DEST], now=T0 + 20)


def test_delete_removes_the_result_and_cancels_its_pending_deliveries(
    outbox_factory: OutboxFactory,
) -> None:
    box = outbox_factory()
    objects = enqueue_answer(box, factory_source(index=18), make_facts(), [DEST], now=T0)
    other = enqueue_answer(box, factory_source(index=19), make_facts(), [DEST], now=T0)
    claimed = box.claim("w1", now=T0, limit=10)
    stored = box.result(objects[0].sop_instance_uid)
    assert stored is not None
    assert box.delete_result(stored.result_key) == sorted(o.sop_instance_uid for o in objects)
    assert box.result(objects[0].sop_instance_uid) is None
    assert box.delete_result(stored.result_key) == []
    # a worker that held a deleted delivery finds nothing to settle; the other result is intact
    settled = [box.mark_delivered(d, now=T0 + 1) for d in claimed]
    assert settled.count(True) == len(other)
    assert box.stats().counts == {("delivered", DEST): len(other)}


@pytest.fixture
def sqlite_keeping_deleted_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite as builds without SQLITE_SECURE_DELETE come (Debian's has it on): deleted rows'
    bytes stay in free pages unless the outbox asks otherwise."""
    connect = sqlite3.connect

    def off_by_default(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connection = connect(*args, **kwargs)
        connection.execute("PRAGMA secure_delete=OFF")
        return connection

    monkeypatch.setattr(outbox_module.sqlite3, "connect", off_by_default)


@pytest.mark.usefixtures("sqlite_keeping_deleted_bytes")
def test_sqlite_overwrites_what_it_deletes(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "state")
    source = factory_source(index=20)
    source.PatientName = "UNIQUE^PATIENTNAMEFORSECUREDELETE"
    objects = enqueue_answer(box, source, make_facts(), [], now=T0)
    marker = b"UNIQUE^PATIENTNAMEFORSECUREDELETE"
    assert any(marker in o.payload for o in objects)
    stored = box.result(objects[0].sop_instance_uid)
    assert stored is not None
    box.delete_result(stored.result_key)
    box.close()
    path = tmp_path / "state" / SQLITE_FILE
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    files = [p for p in path.parent.iterdir() if p.name.startswith(SQLITE_FILE)]
    assert all(marker not in f.read_bytes() for f in files), [f.name for f in files]


@pytest.mark.usefixtures("sqlite_keeping_deleted_bytes")
def test_secure_delete_is_set_whatever_the_build_default(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "state")
    try:
        with box._db.transaction() as cursor:  # the outbox's own connection
            assert cursor.execute("PRAGMA secure_delete").fetchone() == (1,)
    finally:
        box.close()


def test_the_sweeper_purges_at_start_and_then_periodically(tmp_path: Path) -> None:
    box = Outbox.open(tmp_path / "state")
    now = time.time()
    old = enqueue_answer(box, factory_source(index=21), make_facts(), [], now=now - 10 * DAY)
    sweeper = RetentionSweeper(box, retention_s=7 * DAY, every_s=0.2)
    sweeper.start()
    try:
        deadline = time.monotonic() + 5
        while box.result(old[0].sop_instance_uid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert box.result(old[0].sop_instance_uid) is None
        later = enqueue_answer(box, factory_source(index=22), make_facts(), [], now=now - 8 * DAY)
        deadline = time.monotonic() + 5
        while box.result(later[0].sop_instance_uid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert box.result(later[0].sop_instance_uid) is None and sweeper.purged == 2
    finally:
        sweeper.stop()
        box.close()


def test_the_c_store_listener_refuses_with_0xa700_while_the_store_is_full(
    tmp_path: Path,
) -> None:
    room = {"left": False}
    listener = StorageListener(
        spool=Spool(tmp_path / "spool", 100, 10**8),
        gate=chest_gate,
        port=0,
        host=LOOPBACK,
        peers=parse_dicom_peers(f"SENDER@{LOOPBACK}"),
        room=lambda: room["left"],
    )
    listener.start()
    try:
        data = instance(sop_instance_uid=unique_uid(26, 5, 30))
        dataset = pydicom.dcmread(io.BytesIO(data))
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        assoc = ae.associate(LOOPBACK, listener.port, ae_title="CXR_AI")
        assert assoc.is_established
        try:
            assert assoc.send_c_store(dataset).Status == 0xA700
            room["left"] = True
            assert assoc.send_c_store(dataset).Status == 0x0000
        finally:
            assoc.release()
        assert listener.stats.refused_results_full == 1 and listener.stats.spooled == 1
    finally:
        listener.stop(drain_seconds=2)
