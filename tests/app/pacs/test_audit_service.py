"""The service's audit trail end to end (issue 26, item 7): with CXR_AUDIT_SYSLOG set, Debian's
rsyslog on loopback receives parseable RFC 5424 DICOM audit messages for a refused API key, a
refused DICOM peer, an instance received over STOW-RS, its result exported to an archive and the
result read; the access
log names the key by its id (never the key) and the UID read."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.pacs import test_pacs_duplicates
from tests.app.pacs.intake_tools import unique_uid, wait_until
from tests.app.pacs.test_content_keys import _image, _stow
from tests.app.pacs.test_dicom_peers import echo_from, free_port
from tests.app.pacs.test_pacs_duplicates import ArchiveServer
from tests.support.syslog_peer import audit_messages, rsyslog_collector
from tests.support.testkit import make_settings

archive = test_pacs_duplicates.archive
KEY = "audit-test-key-0123456789abcdef"
UID = unique_uid(26, 7, 1)


def test_refused_keys_received_images_exported_and_read_results_reach_the_collector(
    model_path: Path, archive: ArchiveServer, tmp_path: Path
) -> None:
    with rsyslog_collector(tmp_path / "syslog") as (port, out):
        settings = make_settings(
            model_path,
            state_dir=tmp_path / "state",
            api_keys=KEY,
            audit_syslog=f"127.0.0.1:{port}",
            audit_source_id="CXR_AI@test",
            log_level="INFO",
            results_dicomweb_url=archive.dicomweb,
            results_max_backoff_s=1,
            dicom_port=free_port(),
            dicom_peers="MODALITY1@127.0.0.2",
        )
        auth = {"authorization": f"Bearer {KEY}"}
        with TestClient(create_app(settings)) as client:
            refused = client.get(f"/results/{UID}", headers={"authorization": "Bearer nope"})
            assert refused.status_code == 401
            # a caller the peer list does not name, on the DICOM port
            assert settings.dicom_port is not None
            accepted, _ = echo_from(settings.dicom_port, "ROGUE", "127.0.0.1")
            assert not accepted
            client.headers.update(auth)
            assert _stow(client, _image(0.5, UID)).status_code == 200
            assert wait_until(lambda: client.get(f"/results/{UID}").status_code == 200, 20)
            stored = client.get(f"/results/{UID}").json()
            (sr,) = [o["sop_instance_uid"] for o in stored["result"]["objects"]]
            assert wait_until(lambda: sr in archive.archive.held, 20)
            assert wait_until(lambda: client.get("/metrics").text.count("cxr_audit") > 0, 5)
            access = _Records()
            logging.getLogger("app.access").addHandler(access)
            try:
                assert client.get(f"/results/{sr}/sr").status_code == 200
            finally:
                logging.getLogger("app.access").removeHandler(access)
        # the client's exit closed the trail: everything queued was sent
        messages = audit_messages(out, 6)
    by_code: dict[str, list[tuple[int, ET.Element]]] = {}
    for pri, msgid, root in messages:
        assert msgid == "IHE+DICOM"
        event_id = root.find("EventIdentification/EventID")
        assert event_id is not None
        by_code.setdefault(str(event_id.get("csd-code")), []).append((pri % 8, root))
        source = root.find("AuditSourceIdentification")
        assert source is not None and source.get("AuditSourceID") == "CXR_AI@test"
        assert KEY not in ET.tostring(root, encoding="unicode")  # a key id, never the key
    assert {"110114", "110104", "110106", "110103", "110113"} <= set(by_code)
    _, alert = by_code["110113"][0]
    description = alert.find("EventIdentification/EventOutcomeDescription")
    assert description is not None and description.text == "rejected_calling_ae"
    (caller,) = alert.iter("ActiveParticipant")
    assert caller.get("UserID") == "ROGUE" and caller.get("NetworkAccessPointID") == "127.0.0.1"
    severity, refusal = by_code["110114"][0]
    outcome = refusal.find("EventIdentification")
    assert severity == 4 and outcome is not None and outcome.get("EventOutcomeIndicator") == "4"
    assert UID in _objects(by_code["110104"])
    assert sr in _objects(by_code["110106"])
    readers = [p.get("UserID") for _, r in by_code["110103"] for p in r.iter("ActiveParticipant")]
    assert readers and all(str(u).startswith("key-") for u in readers)
    # the access log names the key by the same id, and the UID read
    (read,) = [r.fields for r in access.records]  # type: ignore[attr-defined]
    assert read["uid"] == sr and read["key_id"] == readers[-1]


def _objects(messages: list[tuple[int, ET.Element]]) -> list[str | None]:
    return [
        o.get("ParticipantObjectID")
        for _, root in messages
        for o in root.iter("ParticipantObjectIdentification")
    ]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
