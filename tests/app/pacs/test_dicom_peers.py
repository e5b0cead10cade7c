"""Who the C-STORE port admits (issue 26, item 1): (AE title, address) pairs from
CXR_DICOM_PEERS, checked against DCMTK's echoscu and pynetdicom requestors on loopback (a second
loopback address, 127.0.0.2, stands for a host that is not listed); a listener with no peer list
does not start unless CXR_DICOM_OPEN says so, and the HTTP API serves either way."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from pynetdicom import AE

from app.main import create_app
from app.pacs.scp import StorageListener
from app.pacs.spool import Spool
from app.settings import parse_dicom_peers
from tests.app.pacs.intake_tools import LOOPBACK, chest_gate, require_tool, run_tool, wait_until
from tests.support.testkit import encode, make_settings, xray_like

VERIFICATION = "1.2.840.10008.1.1"
OTHER_HOST = "127.0.0.2"  # on Linux the whole of 127.0.0.0/8 is this machine's loopback


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def echo_from(port: int, calling: str, source: str = LOOPBACK) -> tuple[bool, tuple[int, ...]]:
    """C-ECHO by pynetdicom from `source`: (accepted, A-ASSOCIATE-RJ result/source/reason)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(LOOPBACK, port, ae_title="CXR_AI", bind_address=(source, 0))
    try:
        if assoc.is_established:
            status = assoc.send_c_echo()
            return bool(status and status.Status == 0), ()
        answer = assoc.acceptor.primitive
        return False, () if answer is None else (
            answer.result,
            answer.result_source,
            answer.diagnostic,
        )
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[StorageListener]:
    scp = StorageListener(
        spool=Spool(tmp_path / "spool", 100, 10**8),
        gate=chest_gate,
        port=0,
        host="0.0.0.0",  # so that 127.0.0.2 reaches it too
        peers=parse_dicom_peers("MODALITY1@127.0.0.1,ROUTER@127.0.0.0/30,*@127.0.0.9"),
    )
    scp.start()
    try:
        yield scp
    finally:
        scp.stop(drain_seconds=2)


# -- the setting --------------------------------------------------------------------------------


def test_peers_parse_addresses_networks_ipv6_and_any_title() -> None:
    peers = parse_dicom_peers(" MODALITY1@10.1.2.0/24 , PACS@192.168.5.7,*@fd00::/64,VIEW@[::1]")
    assert [str(p) for p in peers] == [
        "MODALITY1@10.1.2.0/24",
        "PACS@192.168.5.7",
        "*@fd00::/64",
        "VIEW@::1",
    ]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("MODALITY1", "write each peer as AE@address"),
        ("@10.0.0.1", "write each peer as AE@address"),
        ("PACS@pacs.hospital.org", "host names are not accepted"),
        ("PACS@10.1.2.5/24", "has host bits set"),
        ("A_TITLE_OF_17_CHR@10.0.0.1", "1-16 printable ASCII"),
        ("BACK\\SLASH@10.0.0.1", "without a backslash"),
        (" , ", "names no peer"),
    ],
)
def test_a_malformed_peer_list_stops_the_start_with_the_entry_named(
    value: str, fragment: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        make_settings(Path("m.json"), dicom_peers=value)
    assert "dicom_peers" in str(raised.value) and fragment in str(raised.value)


def test_the_peer_list_and_the_open_switch_or_the_old_list_exclude_each_other() -> None:
    with pytest.raises(ValidationError, match="set only CXR_DICOM_PEERS"):
        make_settings(Path("m.json"), dicom_peers="A@10.0.0.1", dicom_allowed_aets="A")
    with pytest.raises(ValidationError, match="set one"):
        make_settings(Path("m.json"), dicom_peers="A@10.0.0.1", dicom_open=True)


def test_the_deprecated_ae_list_reads_as_those_titles_from_any_address() -> None:
    settings = make_settings(Path("m.json"), dicom_allowed_aets="ORTHANC, PACS")
    assert [str(p) for p in settings.dicom_peer_list or ()] == [
        "ORTHANC@0.0.0.0/0",
        "ORTHANC@::/0",
        "PACS@0.0.0.0/0",
        "PACS@::/0",
    ]


# -- the listener -------------------------------------------------------------------------------


def test_a_listed_pair_is_admitted_by_dcmtk_and_pynetdicom(listener: StorageListener) -> None:
    require_tool("echoscu")
    done = run_tool(
        ["echoscu", "-aet", "MODALITY1", "-aec", "CXR_AI", LOOPBACK, str(listener.port)]
    )
    assert done.returncode == 0, done.stderr
    assert echo_from(listener.port, "ROUTER", OTHER_HOST) == (True, ())  # inside 127.0.0.0/30
    assert listener.stats.echoes == 2 and listener.stats.associations_rejected == 0


def test_an_unlisted_ae_title_is_rejected_as_not_recognised(
    listener: StorageListener, caplog: pytest.LogCaptureFixture
) -> None:
    require_tool("echoscu")
    with caplog.at_level(logging.WARNING, logger="app.pacs.scp"):
        done = run_tool(["echoscu", "-aet", "ANYONE_AT_ALL", LOOPBACK, str(listener.port)])
    assert done.returncode != 0
    assert "Rejected Permanent" in done.stderr
    assert "Calling AE Title Not Recognized" in done.stderr
    assert listener.stats.rejected_calling_ae == 1 and listener.stats.echoes == 0
    (record,) = [r for r in caplog.records if r.getMessage() == "dicom association rejected"]
    assert record.fields == {  # type: ignore[attr-defined]
        "reason": "rejected_calling_ae",
        "calling_ae": "ANYONE_AT_ALL",
        "address": LOOPBACK,
        "called_ae": "ANY-SCP",
    }


def test_a_listed_ae_title_from_an_unlisted_address_is_rejected(
    listener: StorageListener,
) -> None:
    # MODALITY1 is listed for 127.0.0.1 only; calling itself that from 127.0.0.2 does not help.
    assert echo_from(listener.port, "MODALITY1", OTHER_HOST) == (False, (1, 1, 3))
    # ROUTER is listed for 127.0.0.0/30, which 127.0.0.5 is not in.
    assert echo_from(listener.port, "ROUTER", "127.0.0.5") == (False, (1, 1, 3))
    assert wait_until(lambda: listener.stats.rejected_source_address == 2, timeout=5)
    assert listener.stats.echoes == 0 and listener.stats.associations_accepted == 0
    # and the same title from its own address still gets in
    assert echo_from(listener.port, "MODALITY1", LOOPBACK) == (True, ())


def test_any_title_is_admitted_from_an_address_listed_with_star(listener: StorageListener) -> None:
    assert echo_from(listener.port, "WHATEVER", "127.0.0.9") == (True, ())
    assert echo_from(listener.port, "WHATEVER", OTHER_HOST) == (False, (1, 1, 3))
    assert listener.stats.rejected_calling_ae == 1


# -- the service --------------------------------------------------------------------------------


def _served(client: TestClient) -> None:
    jpeg = client.post(
        "/predict", content=encode(xray_like(), "JPEG"), headers={"Content-Type": "image/jpeg"}
    )
    assert jpeg.status_code == 200, jpeg.text


def test_no_peer_list_leaves_the_listener_off_and_the_http_api_serving(
    model_path: Path, tmp_path: Path
) -> None:
    port = free_port()
    settings = make_settings(
        model_path, state_dir=tmp_path / "state", dicom_port=port, log_level="INFO"
    )
    records: list[logging.LogRecord] = []
    keeper = logging.Handler(logging.ERROR)
    keeper.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("app.lifecycle").addHandler(keeper)
    try:
        with TestClient(create_app(settings)) as client:
            _served(client)
            ready = client.get("/health/ready")
            assert ready.status_code == 200
            down = ready.json()["dicom_listener_down"]
            assert "CXR_DICOM_PEERS" in down and "CXR_DICOM_OPEN" in down
            model = client.get("/model").json()
            assert model["dicom_listener_down"] == down and "dicom_listener" not in model
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((LOOPBACK, port), timeout=2).close()
    finally:
        logging.getLogger("app.lifecycle").removeHandler(keeper)
    (logged,) = [r for r in records if r.getMessage() == "dicom listener not started"]
    assert logged.fields["reason"] == down  # type: ignore[attr-defined]


def test_open_mode_admits_anyone_and_says_so_in_the_log_and_model(
    model_path: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        model_path,
        state_dir=tmp_path / "state",
        dicom_port=free_port(),
        dicom_open=True,
        log_level="INFO",
    )
    records: list[logging.LogRecord] = []
    keeper = logging.Handler(logging.WARNING)
    keeper.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("app.pacs.scp").addHandler(keeper)
    try:
        with TestClient(create_app(settings)) as client:
            _served(client)
            described = client.get("/model").json()["dicom_listener"]
            assert described["admits"] == "anyone" and described["peers"] == []
            assert "CXR_DICOM_OPEN=true" in described["warning"]
            assert echo_from(described["port"], "ANYONE_AT_ALL") == (True, ())
    finally:
        logging.getLogger("app.pacs.scp").removeHandler(keeper)
    (warned,) = [r for r in records if r.getMessage() == "dicom listener open to any caller"]
    assert warned.levelname == "WARNING"


def test_the_service_admits_its_peers_lists_them_and_counts_the_others(
    model_path: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        model_path,
        state_dir=tmp_path / "state",
        dicom_port=free_port(),
        dicom_peers="MODALITY1@127.0.0.1",
    )
    with TestClient(create_app(settings)) as client:
        described = client.get("/model").json()["dicom_listener"]
        assert described == {
            "ae_title": "CXR_AI",
            "port": settings.dicom_port,
            "admits": "listed_peers",
            "peers": ["MODALITY1@127.0.0.1"],
            "tls": "none",
        }
        assert echo_from(described["port"], "MODALITY1") == (True, ())
        assert echo_from(described["port"], "ANYONE_AT_ALL") == (False, (1, 1, 3))
        assert echo_from(described["port"], "MODALITY1", OTHER_HOST) == (False, (1, 1, 3))
        metrics = client.get("/metrics").text
    assert 'cxr_intake_instances_total{intake="dimse",outcome="rejected_calling_ae"} 1.0' in metrics
    assert (
        'cxr_intake_instances_total{intake="dimse",outcome="rejected_source_address"} 1.0'
        in metrics
    )
