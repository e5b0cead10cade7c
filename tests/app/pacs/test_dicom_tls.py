"""DICOM TLS (issue 26, item 1). On the C-STORE listener: DCMTK's storescu `+tls` with a client
certificate of a test CA (made here by openssl) stores through it; without a certificate, with
one of another CA, or without TLS at all, it does not get in, and the peer list still applies.
On the C-STORE results: delivered to DCMTK's storescp `+tls` with the client certificate, and
not without it, nor to a peer whose certificate another CA signed, nor over plain TCP."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.main import create_app
from app.pacs.delivery import DimseDestination, client_tls_context
from app.pacs.outbox import Outbox
from app.pacs.scp import StorageListener, server_tls_context
from app.pacs.spool import Spool
from app.settings import parse_dicom_peers
from tests.app.pacs.intake_tools import (
    LOOPBACK,
    chest_gate,
    instance,
    require_tool,
    run_tool,
    unique_uid,
    write,
)
from tests.app.pacs.pacs_results import enqueue_answer, factory_source, make_facts
from tests.app.pacs.test_dicom_peers import free_port
from tests.support.testkit import make_settings


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # signed by a CA the listener does not trust
    stranger_key: Path
    other_ca: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _issue(directory: Path, name: str, ca: tuple[Path, Path], subject: str, san: str) -> None:
    key, csr, cert = (directory / f"{name}.{x}" for x in ("key", "csr", "crt"))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", subject)  # fmt: skip
    extensions = directory / f"{name}.ext"
    extensions.write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(extensions),
             "-out", str(cert))  # fmt: skip


def _authority(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
             str(cert), "-days", "2", "-subj", f"/CN={name}")  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require_tool("openssl")
    directory = tmp_path_factory.mktemp("pki")
    ca = _authority(directory, "site-ca")
    other = _authority(directory, "other-ca")
    _issue(directory, "server", ca, "/CN=cxr-ai", "IP:127.0.0.1")
    _issue(directory, "client", ca, "/CN=modality1", "DNS:modality1")
    _issue(directory, "stranger", other, "/CN=modality1", "DNS:modality1")
    return Pki(
        ca=ca[0],
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        stranger_cert=directory / "stranger.crt",
        stranger_key=directory / "stranger.key",
        other_ca=other[0],
    )


@pytest.fixture
def tls_listener(tmp_path: Path, pki: Pki) -> Iterator[StorageListener]:
    listener = StorageListener(
        spool=Spool(tmp_path / "spool", 100, 10**8),
        gate=chest_gate,
        port=0,
        host=LOOPBACK,
        peers=parse_dicom_peers(f"MODALITY1@{LOOPBACK}"),
        tls=server_tls_context(pki.server_cert, pki.server_key, pki.ca),
    )
    listener.start()
    try:
        yield listener
    finally:
        listener.stop(drain_seconds=2)


def storescu(port: int, image: Path, *tls: str, calling: str = "MODALITY1") -> str:
    require_tool("storescu")
    done = run_tool(
        ["storescu", *tls, "-aet", calling, "-aec", "CXR_AI", LOOPBACK, str(port), str(image)],
        timeout=30,
    )
    return f"rc={done.returncode}\n{done.stdout}{done.stderr}"


def test_a_client_certificate_of_the_site_ca_stores_over_tls(
    tls_listener: StorageListener, pki: Pki, tmp_path: Path
) -> None:
    image = write(tmp_path, "chest.dcm", instance(sop_instance_uid=unique_uid(26, 1, 50)))
    trust = ("+cf", str(pki.ca))  # storescu checks the listener's certificate against the CA
    # a caller that connects and never starts its handshake holds up no one else
    with socket.create_connection((LOOPBACK, tls_listener.port), timeout=5):
        stored = storescu(
            tls_listener.port, image, "+tls", str(pki.client_key), str(pki.client_cert), *trust
        )
    assert stored.startswith("rc=0"), stored
    assert tls_listener.stats.spooled == 1
    # with TLS the peer list still applies: a listed certificate does not make another title ok
    other_title = storescu(
        tls_listener.port,
        image,
        "+tls",
        str(pki.client_key),
        str(pki.client_cert),
        *trust,
        calling="INTRUDER",
    )
    assert not other_title.startswith("rc=0") and "Calling AE Title Not Recognized" in other_title
    # no certificate, another CA's certificate, or no TLS: not stored
    anonymous = storescu(tls_listener.port, image, "+tla", *trust)
    stranger = storescu(
        tls_listener.port, image, "+tls", str(pki.stranger_key), str(pki.stranger_cert), *trust
    )
    plain = storescu(tls_listener.port, image)
    for refused in (anonymous, stranger, plain):
        assert not refused.startswith("rc=0"), refused
    assert tls_listener.stats.spooled == 1 and tls_listener.stats.associations_accepted == 1


def test_the_service_runs_its_listener_over_tls_and_says_so(
    model_path: Path, tmp_path: Path, pki: Pki
) -> None:
    settings = make_settings(
        model_path,
        state_dir=tmp_path / "state",
        dicom_port=free_port(),
        dicom_peers=f"MODALITY1@{LOOPBACK}",
        dicom_tls_cert=pki.server_cert,
        dicom_tls_key=pki.server_key,
        dicom_tls_client_ca=pki.ca,
    )
    with TestClient(create_app(settings)) as client:
        described = client.get("/model").json()["dicom_listener"]
        assert described["tls"] == "mutual"


def test_an_unusable_certificate_leaves_the_listener_off_and_http_serving(
    model_path: Path, tmp_path: Path, pki: Pki
) -> None:
    settings = make_settings(
        model_path,
        state_dir=tmp_path / "state",
        dicom_port=free_port(),
        dicom_peers=f"MODALITY1@{LOOPBACK}",
        dicom_tls_cert=pki.server_cert,
        dicom_tls_key=pki.client_key,  # not the certificate's key
    )
    with TestClient(create_app(settings)) as client:
        ready = client.get("/health/ready")
        assert ready.status_code == 200
        assert "CXR_DICOM_TLS_KEY" in ready.json()["dicom_listener_down"]


def test_tls_settings_go_together() -> None:
    with pytest.raises(ValidationError, match="go together"):
        make_settings(Path("m.json"), dicom_tls_cert=Path("server.crt"))
    with pytest.raises(ValidationError, match="set CXR_DICOM_TLS_CERT"):
        make_settings(Path("m.json"), dicom_tls_client_ca=Path("ca.crt"))


@pytest.fixture
def tls_archive(tmp_path: Path, pki: Pki) -> Iterator[tuple[int, Path]]:
    """DCMTK's storescp as a TLS archive (AE ARCHIVE): the site CA's server certificate, and a
    client certificate of the site CA required (its default)."""
    require_tool("storescp")
    port, received = free_port(), tmp_path / "received"
    received.mkdir()
    command = ["storescp", "+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca)]
    command += ["-aet", "ARCHIVE", "-od", str(received), str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((LOOPBACK, port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, "no storescp"
                time.sleep(0.05)
        yield port, received
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_results_are_delivered_over_tls_with_the_client_certificate_only(
    tls_archive: tuple[int, Path], pki: Pki, tmp_path: Path
) -> None:
    port, received = tls_archive
    box = Outbox.open(tmp_path / "state")
    objects = enqueue_answer(box, factory_source(index=41), make_facts(), ["dimse"])
    deliveries = box.claim("w1", limit=10)
    assert len(deliveries) == len(objects)

    def send(tls: ssl.SSLContext | None) -> set[str]:
        destination = DimseDestination(
            "ARCHIVE", LOOPBACK, port, calling_ae_title="CXR_AI", tls=tls
        )
        return {outcome.verdict for outcome in destination.send(deliveries)}

    assert send(client_tls_context(pki.ca)) == {"retry"}  # no client certificate
    assert send(client_tls_context(pki.other_ca, pki.client_cert, pki.client_key)) == {"retry"}
    assert send(None) == {"retry"}  # plain TCP to a TLS port
    assert list(received.iterdir()) == []
    assert send(client_tls_context(pki.ca, pki.client_cert, pki.client_key)) == {"stored"}
    assert len(list(received.iterdir())) == len(objects)
    box.close()


def test_results_tls_settings_go_together() -> None:
    with pytest.raises(ValidationError, match="go together"):
        make_settings(Path("m.json"), results_dimse_tls_cert=Path("client.crt"))
    with pytest.raises(ValidationError, match="needs CXR_RESULTS_DIMSE_TLS_CA"):
        make_settings(
            Path("m.json"),
            results_dimse_tls_cert=Path("client.crt"),
            results_dimse_tls_key=Path("client.key"),
        )


def test_the_service_delivers_its_results_over_tls(
    tls_archive: tuple[int, Path], pki: Pki, model_path: Path, tmp_path: Path
) -> None:
    port, received = tls_archive
    settings = make_settings(
        model_path,
        state_dir=tmp_path / "state",
        results_dimse=f"ARCHIVE@{LOOPBACK}:{port}",
        results_dimse_tls_ca=pki.ca,
        results_dimse_tls_cert=pki.client_cert,
        results_dimse_tls_key=pki.client_key,
    )
    with TestClient(create_app(settings)) as client:
        answer = client.post(
            "/predict",
            params={"deliver": "true"},
            content=instance(sop_instance_uid=unique_uid(26, 1, 60)),
            headers={"content-type": "application/dicom"},
        )
        assert answer.status_code == 200, answer.text
        uid = unique_uid(26, 1, 60)
        deadline = time.monotonic() + 20
        states: set[str] = set()
        while time.monotonic() < deadline:
            states = {
                d["state"] for d in client.get(f"/results/{uid}").json()["result"]["deliveries"]
            }
            if states == {"delivered"}:
                break
            time.sleep(0.2)
    assert states == {"delivered"}
    assert len(list(received.iterdir())) == len(answer.json()["result"]["objects"])
