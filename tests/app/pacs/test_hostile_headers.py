"""A hostile header fails that instance, never the request or the association: STOW-RS parts and
C-STORE requests (a real pynetdicom association on 127.0.0.1) whose element VRs are corrupted,
and fuzzed instances from `app.testing.fuzz`, each get their own failure status while the good
instances around them are stored."""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, _config

from app.pacs.scp import (
    CR_IMAGE_STORAGE,
    DECODABLE_TRANSFER_SYNTAXES,
    DX_FOR_PRESENTATION,
    StorageListener,
)
from app.pacs.spool import Spool
from app.pacs.stow import read_instance_header, store_instances
from app.testing.fuzz import mutants, seed_files
from tests.app.pacs.intake_tools import LOOPBACK, chest_gate, instance, unique_uid, write
from tests.app.pacs.test_stow import CONTENT_TYPE, multipart, reasons

# (0018,0015) Body Part Examined is read by the intended-use gate; (0008,0018) SOP Instance UID
# identifies the instance. Corrupting either's VR used to surface in whoever read it first.
BODY_PART = b"\x18\x00\x15\x00CS"
SOP_INSTANCE = b"\x08\x00\x18\x00UI"
KNOWN_DETAILS = {
    "stored", "unreadable", "no_sop_uids", "no_study_uids", "study_mismatch", "not_intended_use",
    "gate_error", "queue_error", "spool_full", "part_not_application_dicom",
}  # fmt: skip


def with_vr(data: bytes, element: bytes, vr: bytes = b"QQ") -> bytes:
    """`data` with the VR of the element whose tag and VR are `element` replaced by `vr`."""
    position = data.find(element, 132 + 64)
    assert position > 0
    return data[: position + 4] + vr + data[position + 6 :]


def good(n: int) -> bytes:
    return instance("explicit_le", sop_instance_uid=unique_uid(40, n))


def test_the_intake_header_reader_refuses_a_header_it_cannot_fully_read() -> None:
    from app.pacs.stow import UnreadableInstance

    for element in (BODY_PART, SOP_INSTANCE):
        with pytest.raises(UnreadableInstance, match=r"\(NotImplementedError\)") as excinfo:
            read_instance_header(with_vr(good(1), element))
        assert "QQ" not in str(excinfo.value)  # the type only, never what the header said
    assert read_instance_header(good(1)).SOPInstanceUID == unique_uid(40, 1)


def test_stow_a_hostile_header_fails_that_instance_only() -> None:
    stored: list[bytes] = []
    parts = [good(1), with_vr(good(2), BODY_PART), with_vr(good(3), SOP_INSTANCE), good(4)]
    response = store_instances(
        multipart(parts), CONTENT_TYPE, gate=chest_gate,
        accept=lambda ds, data: stored.append(data),
    )  # fmt: skip
    assert response.status == 202
    assert [o.detail for o in response.outcomes] == ["stored", "unreadable", "unreadable", "stored"]
    assert reasons(response) == [0xC000, 0xC000]  # cannot understand: not a processing failure
    assert stored == [parts[0], parts[3]]


def test_stow_fuzzed_instances_each_get_their_own_outcome() -> None:
    seeds = seed_files()
    made = list(mutants(seeds, 404, 300))
    accepted: list[Dataset] = []
    response = store_instances(
        multipart([m.data for m in made]), CONTENT_TYPE, gate=chest_gate,
        accept=lambda ds, data: accepted.append(ds),
    )  # fmt: skip
    assert response.status in (200, 202, 409)
    assert len(response.outcomes) == len(made)
    details = collections.Counter(o.detail for o in response.outcomes)
    assert set(details) <= KNOWN_DETAILS, details
    assert details["stored"] > 50 and details["unreadable"] > 20, details
    assert details["gate_error"] == 0 and details["queue_error"] == 0, details


# -- C-STORE over a real association --------------------------------------------------------


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[StorageListener]:
    spool = Spool(tmp_path / "spool", max_entries=1000, max_bytes=10**9)
    scp = StorageListener(
        spool=spool, gate=chest_gate, port=0, host=LOOPBACK, allowed_calling_aets={"SENDER"}
    )
    scp.start()
    try:
        yield scp
    finally:
        scp.stop(drain_seconds=5)


@pytest.fixture
def sender(listener: StorageListener, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """An established association; files are sent as they are (pynetdicom reads only the file
    meta and streams the data set, so a corrupted element reaches the listener intact)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="SENDER")
    for sop_class in (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION):
        for syntax in DECODABLE_TRANSFER_SYNTAXES:
            ae.add_requested_context(sop_class, syntax)
    association = ae.associate(LOOPBACK, listener.port, ae_title="CXR_AI")
    assert association.is_established
    try:
        yield association
    finally:
        association.release()


def test_scp_a_hostile_header_fails_that_instance_and_the_association_goes_on(
    sender, listener: StorageListener, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    files = [
        write(tmp_path, "body_part.dcm", with_vr(good(11), BODY_PART)),
        write(tmp_path, "sop_instance.dcm", with_vr(good(12), SOP_INSTANCE)),
        write(tmp_path, "good.dcm", good(13)),
    ]
    with caplog.at_level(logging.DEBUG):
        statuses = [sender.send_c_store(path).Status for path in files]
    assert statuses == [0xC000, 0xC000, 0x0000]
    assert sender.is_established
    assert listener.stats.failed_unreadable == 2 and listener.stats.spooled == 1
    entry = listener.spool.claim()
    assert entry is not None and entry.sop_instance_uid == unique_uid(40, 13)
    # no handler blew up (pynetdicom logs a traceback, with the message, when one does)
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


def test_scp_fuzzed_instances_over_one_association(
    sender, listener: StorageListener, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    seeds = seed_files()
    statuses: collections.Counter[int] = collections.Counter()
    not_sent = 0
    for made in mutants(seeds, 405, 150):
        path = write(tmp_path, "mutant.dcm", made.data)
        try:
            status = sender.send_c_store(path)
        except Exception:  # the sender (pynetdicom) could not read the file meta: not sent
            not_sent += 1
            assert sender.is_established, made.id
            continue
        assert sender.is_established, made.id
        if "Status" in status:
            statuses[status.Status] += 1
    assert sum(statuses.values()) >= 60, (statuses, not_sent)
    assert set(statuses) <= {0x0000, 0xC000}, statuses
    assert statuses[0xC000] > 5 and statuses[0x0000] > 5, statuses
