"""Transport and credentials (issue 26, item 6): STOW-RS deliveries to a site-CA archive with a
client certificate, credentials over http:// warned about or refused, HTTPS on the service."""

from __future__ import annotations

import http.server
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.pacs.outbox import Delivery
from app.pacs.pipeline import destinations_from
from app.settings import Settings
from app.testing.server import ServiceProcess
from tests.app.pacs import test_dicom_tls
from tests.app.pacs.test_dicom_tls import Pki
from tests.app.pacs.test_pacs_duplicates import Archive, ArchiveHandler
from tests.support.testkit import make_settings

pki = test_dicom_tls.pki


class _TlsArchive(http.server.ThreadingHTTPServer):
    def __init__(self, archive: Archive, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), ArchiveHandler)
        self.archive = archive
        self.socket = context.wrap_socket(self.socket, server_side=True)

    @property
    def dicomweb(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}/dicom-web"


@pytest.fixture
def tls_archive(pki: Pki) -> Iterator[_TlsArchive]:
    """A STOW-RS archive on 127.0.0.1 over TLS, its certificate from the site CA, asking every
    client for a certificate of that CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    server = _TlsArchive(Archive(), context)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(5)


def _delivery(uid: str) -> Delivery:
    from tests.app.pacs.test_content_keys import _image

    return Delivery(1, "dicomweb", "sr", "1.2.840.10008.5.1.4.1.1.88.22", uid, _image(0.5, uid),
                    0, time.time(), "w")  # fmt: skip


def test_results_reach_a_site_ca_archive_with_the_client_certificate(
    tls_archive: _TlsArchive, pki: Pki, model_path: Path, tmp_path: Path
) -> None:
    uid = "1.2.826.0.1.3680043.10.543.26.6.1"
    settings = make_settings(
        model_path,
        state_dir=tmp_path,
        results_dicomweb_url=tls_archive.dicomweb,
        results_dicomweb_ca_file=pki.ca,
        results_dicomweb_client_cert=pki.client_cert,
        results_dicomweb_client_key=pki.client_key,
    )
    (stow,) = destinations_from(settings)
    (outcome,) = stow.send([_delivery(uid)])
    assert outcome.verdict == "stored", outcome
    assert uid in tls_archive.archive.held
    # without the client certificate the archive refuses the handshake: retried, nothing held
    plain = make_settings(
        model_path,
        state_dir=tmp_path,
        results_dicomweb_url=tls_archive.dicomweb,
        results_dicomweb_ca_file=pki.ca,
    )
    (stow,) = destinations_from(plain)
    (outcome,) = stow.send([_delivery(uid + ".2")])
    assert outcome.verdict == "retry" and uid + ".2" not in tls_archive.archive.held
    # a server certificate of another CA is not trusted
    stranger = make_settings(
        model_path,
        state_dir=tmp_path,
        results_dicomweb_url=tls_archive.dicomweb,
        results_dicomweb_ca_file=pki.other_ca,
        results_dicomweb_client_cert=pki.client_cert,
        results_dicomweb_client_key=pki.client_key,
    )
    (stow,) = destinations_from(stranger)
    (outcome,) = stow.send([_delivery(uid + ".3")])
    assert outcome.verdict == "retry" and uid + ".3" not in tls_archive.archive.held


def test_credentials_over_http_are_named_and_refused_when_asked(
    model_path: Path, tmp_path: Path
) -> None:
    clear = make_settings(
        model_path,
        state_dir=tmp_path,
        results_dicomweb_url="http://pacs:8042/dicom-web",
        results_dicomweb_auth="Bearer secret-token",
        results_fhir_url="https://fhir.example/r4",
        results_fhir_auth="Bearer other-token",
    )
    assert clear.clear_credentials == ["CXR_RESULTS_DICOMWEB_AUTH"]
    with pytest.raises(ValueError, match="CXR_RESULTS_DICOMWEB_AUTH") as refused:
        make_settings(
            model_path,
            state_dir=tmp_path,
            results_dicomweb_url="http://pacs:8042/dicom-web",
            results_dicomweb_auth="Bearer secret-token",
            refuse_clear_credentials=True,
        )
    assert "secret-token" not in str(refused.value)
    https = make_settings(
        model_path,
        state_dir=tmp_path,
        results_dicomweb_url="https://pacs/dicom-web",
        results_dicomweb_auth="Bearer t",
        refuse_clear_credentials=True,
    )
    assert https.clear_credentials == []
    with pytest.raises(ValueError, match="go together"):
        Settings(_env_file=None, tls_cert_file=Path("a.pem"))  # type: ignore[call-arg]


def test_the_service_serves_https_with_its_certificate(pki: Pki, model_path: Path) -> None:
    settings = {
        "CXR_MODEL_METADATA": str(model_path),
        "CXR_PROVIDER": "cpu",
        "CXR_TLS_CERT_FILE": str(pki.server_cert),
        "CXR_TLS_KEY_FILE": str(pki.server_key),
    }
    service = ServiceProcess.start(None, settings)
    try:
        url = f"https://127.0.0.1:{service.port}/health/ready"
        deadline = time.monotonic() + 60
        while True:
            try:
                answer = httpx.get(url, verify=ssl.create_default_context(cafile=str(pki.ca)))
                if answer.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert service.process.poll() is None, service.log_path.read_text()
            assert time.monotonic() < deadline, service.log_path.read_text()
            time.sleep(0.2)
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served on that port
            httpx.get(f"http://127.0.0.1:{service.port}/health/ready", timeout=5).raise_for_status()
    finally:
        service.process.terminate()
        service.process.wait(15)
