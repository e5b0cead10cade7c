"""The RIS side of the results tests, on 127.0.0.1: an MLLP receiver built on the `hl7` package's
asyncio MLLP server, and a FHIR receiver that validates every Bundle with the official models
(`fhir.resources`, R4B) and carries out transactions with conditional creates.

No FHIR server installable here (Debian, PyPI, npm) runs without the internet and a database at run
time within a test's budget; the receiver below is small and follows the R4 transaction rules that
matter to a sender: `ifNoneExist` (no match: create, 201; one: 200 with the existing resource;
several: 412), `urn:uuid:` references rewritten to what an entry created or found, every reference
resolvable, the whole transaction or nothing, and errors as OperationOutcome.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hl7
import hl7.mllp
from fhir.resources.R4B.bundle import Bundle
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from tests.app.pacs.pacs_servers import free_port

# (MSA-1, ERR-3 code, ERR-8 text), or None: do not answer at all
Answer = tuple[str, str, str] | None


def validate_oru(text: str) -> Any:
    """hl7apy's strict v2.5.1 parse and structure validation of an ORU^R01; returns the message."""
    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert message.validate() is True
    return message


@dataclass
class MllpReceiver:
    """An MLLP listener that ACKs (or as `answer` decides), records every message it got, and can
    go away and come back on the same port."""

    port: int = field(default_factory=free_port)
    answer: Callable[[hl7.Message], Answer] = lambda message: ("AA", "", "")
    received: list[str] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def address(self) -> str:
        return f"mllp://127.0.0.1:{self.port}"

    def control_ids(self) -> list[str]:
        return [str(hl7.parse(m).segment("MSH")(10)) for m in self.received]

    async def _client(
        self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter
    ) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            while True:
                message = await reader.readmessage()
                self.received.append(str(message))
                answer = self.answer(message)
                if answer is None:
                    continue
                code, error_code, text = answer
                ack = str(message.create_ack(code, application="RIS", facility="HOSPITAL"))
                if error_code or text:
                    ack += f"\rERR|||{error_code}^Error^HL70357|E||||{text}"
                writer.writeblock(ack.encode("utf-8"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _start(self) -> None:
        self._server = await hl7.mllp.start_hl7_server(
            self._client, "127.0.0.1", self.port, encoding="utf-8"
        )

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            self._writers.clear()
            await self._server.wait_closed()
            self._server = None

    def start(self) -> MllpReceiver:
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _outcome(status: int, code: str, text: str) -> tuple[int, dict[str, Any]]:
    return status, {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }


class FhirReceiver:
    """A FHIR R4 endpoint on 127.0.0.1 taking transaction Bundles at its base URL."""

    def __init__(self) -> None:
        self.port = free_port()
        self.resources: dict[str, dict[str, dict[str, Any]]] = {}
        self.transactions: list[dict[str, Any]] = []
        self.requests: list[dict[str, str]] = []
        # set to (status, OperationOutcome) to answer every request that way
        self.fail_with: tuple[int, dict[str, Any]] | None = None
        self.delay_s = 0.0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def of_type(self, resource_type: str) -> list[dict[str, Any]]:
        return list(self.resources.get(resource_type, {}).values())

    def start(self) -> FhirReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests.append({k.lower(): v for k, v in self.headers.items()})
                if receiver.delay_s:
                    threading.Event().wait(receiver.delay_s)
                if self.path.rstrip("/") != "/fhir":
                    status, answer = _outcome(404, "not-found", "no such endpoint")
                elif receiver.fail_with is not None:
                    status, answer = receiver.fail_with
                else:
                    status, answer = receiver.transaction(body)
                data = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a sender that timed out and hung up

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def transaction(self, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            document = json.loads(body)
            Bundle.model_validate(document)  # every resource against the official models
        except ValueError as error:
            return _outcome(400, "structure", f"not a valid R4 Bundle: {error}"[:2000])
        if document.get("type") != "transaction":
            return _outcome(400, "invalid", "only transactions are taken here")
        with self._lock:
            staged = {t: dict(r) for t, r in self.resources.items()}
            resolved: dict[str, str] = {}
            answers = []
            for entry in document["entry"]:
                request, resource = entry["request"], entry["resource"]
                kind = resource["resourceType"]
                if request.get("method") != "POST" or request.get("url") != kind:
                    return _outcome(400, "not-supported", "only POST of a resource type")
                matches = self._search(staged.get(kind, {}), request.get("ifNoneExist", ""))
                if len(matches) > 1:
                    return _outcome(412, "multiple-matches", "ifNoneExist matched several")
                if matches:
                    resolved[entry["fullUrl"]] = f"{kind}/{matches[0]}"
                    answers.append({"response": {"status": "200 OK"}})
                    continue
                new_id = str(sum(len(r) for r in staged.values()) + 1)
                staged.setdefault(kind, {})[new_id] = {**resource, "id": new_id}
                resolved[entry["fullUrl"]] = f"{kind}/{new_id}"
                answers.append(
                    {
                        "response": {
                            "status": "201 Created",
                            "location": f"{kind}/{new_id}/_history/1",
                        }
                    }
                )
            text = json.dumps(staged)
            for full_url, local in resolved.items():
                text = text.replace(json.dumps(full_url), json.dumps(local))
            staged = json.loads(text)
            for reference in re.findall(r'"reference": "([^"]+)"', text):
                kind, _, identity = reference.partition("/")
                if identity not in staged.get(kind, {}):
                    return _outcome(400, "not-found", "a reference does not resolve")
            self.resources = staged
            self.transactions.append(document)
        return 200, {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}

    @staticmethod
    def _search(resources: dict[str, dict[str, Any]], query: str) -> list[str]:
        """Resource ids matching `identifier=system|value` (the only search this server knows)."""
        name, _, value = query.partition("=")
        if name != "identifier" or not value:
            return []
        unquoted = urllib.parse.unquote(value)
        parts = re.split(r"(?<!\\)\|", unquoted)
        system, wanted = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
        system, wanted = (re.sub(r"\\(.)", r"\1", p) for p in (system, wanted))
        return [
            identity
            for identity, resource in resources.items()
            for identifier in resource.get("identifier", [])
            if identifier.get("value") == wanted and identifier.get("system", "") == system
        ]
