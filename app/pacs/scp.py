"""A DICOM C-STORE SCP (pynetdicom) that spools what it receives for the inference workers.

`StorageListener` runs pynetdicom's threaded association server. Its C-STORE handler does only
cheap work on the association's thread: it takes the instance as the peer encoded it
(`event.encoded_dataset()`, a PS3.10 file with the file meta pynetdicom builds from the
presentation context: no decode, no transcode), reads its header without the pixel data, asks the
injected intended-use `gate`, writes it to the spool and answers. Inference and the result's
return happen later, in workers, on associations of their own: pynetdicom users report stalls and
DIMSE timeouts when handlers open associations (pynetdicom#435).

Presentation contexts:
- Verification (C-ECHO).
- CR Image Storage and Digital X-Ray Image Storage - For Presentation with every transfer syntax
  the service's DICOM decoder is tested with (`DECODABLE_TRANSFER_SYNTAXES`, the syntaxes of
  `app/testing/dicom_files.py`): a router must not be pushed into transcoding (Orthanc 1.10 cannot
  transcode JPEG 2000 and fails the whole transfer), and pynetdicom does not transcode either.
  A CR/DX offered only in another syntax (HTJ2K, say) is refused at negotiation: the sender then
  knows, before sending, that we could not have read it.
- Every other storage SOP class (CT, MR, Secondary Capture, DX For Processing, ...), with any
  transfer syntax: accepted, answered 0x0000 and discarded (`ignored_sop_class`).

Why accept-and-ignore rather than refuse: routers forward whole studies, and a refused context
or a failure status makes them retry the study (Orthanc and most routers retry failed jobs, and
alert), which clogs their queues with instances we will never read and would never read on a
retry either. A success status says "delivered", which is true; the counters say what became of
it. The same holds for a CR/DX image the gate refuses (a lateral, a non-chest): 0x0000, not
spooled, counted as `ignored_not_intended_use`.

Statuses that ask the sender to act:
- 0xA700 (out of resources) when the spool is full or cannot be written: retry later.
- 0xC000 (cannot understand) when the header cannot be read, has no SOP Instance UID, or the
  gate raises on it: a retry would not help, and the sender should know.

Associations: the calling AE title must be in `allowed_calling_aets` (when given), or the
association is rejected; `max_associations` bounds concurrency (pynetdicom rejects the next one
as transient, "local limit exceeded"); `max_pdu`, and the ACSE, DIMSE and network timeouts are
pynetdicom's settings of the same names.

Patient data: nothing from a data set is logged; `start` turns pynetdicom's standard log
handlers off (they print DIMSE message contents at debug level), for every AE the process creates
afterwards, which is what the result-sending side wants too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import pynetdicom
import pynetdicom._config
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from app.imaging.dicom import DECODABLE_TRANSFER_SYNTAXES
from app.pacs.spool import Spool, SpoolFull
from app.pacs.stow import UnreadableInstance, read_instance_header

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
INTAKE_SOP_CLASSES = (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

Gate = Callable[[Dataset], "str | None"]


@dataclass
class IntakeStats:
    """Counters the service can export (plain ints; read them with `snapshot`)."""

    associations_accepted: int = 0
    associations_rejected: int = 0
    associations_aborted: int = 0
    echoes: int = 0
    spooled: int = 0
    ignored_sop_class: int = 0
    ignored_not_intended_use: int = 0
    refused_spool_full: int = 0
    failed_storage: int = 0
    failed_unreadable: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}


class StorageListener:
    """The C-STORE SCP of the service (see the module docstring for what it accepts)."""

    def __init__(
        self,
        *,
        spool: Spool,
        gate: Gate,
        port: int,
        ae_title: str = "CXR_AI",
        host: str = "0.0.0.0",
        allowed_calling_aets: set[str] | None = None,
        max_associations: int = 10,
        max_pdu: int = 65536,
        acse_timeout: float = 30.0,
        dimse_timeout: float = 60.0,
        network_timeout: float = 60.0,
    ):
        if allowed_calling_aets is not None and not allowed_calling_aets:
            # pynetdicom reads an empty list as "anyone": refuse the ambiguity.
            raise ValueError("allowed_calling_aets must be None (anyone) or name at least one AE")
        self.spool = spool
        self.gate = gate
        self.host = host
        self.requested_port = port
        self.stats = IntakeStats()
        self._server: ThreadedAssociationServer | None = None

        ae = AE(ae_title=ae_title)
        ae.maximum_associations = max_associations
        ae.maximum_pdu_size = max_pdu
        ae.acse_timeout = acse_timeout
        ae.dimse_timeout = dimse_timeout
        ae.network_timeout = network_timeout
        if allowed_calling_aets is not None:
            ae.require_calling_aet = sorted(allowed_calling_aets)
        ae.add_supported_context(VERIFICATION)
        for sop_class in INTAKE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(DECODABLE_TRANSFER_SYNTAXES))
        for context in AllStoragePresentationContexts:
            other = str(context.abstract_syntax)
            if other not in INTAKE_SOP_CLASSES:
                ae.add_supported_context(other, ALL_TRANSFER_SYNTAXES)
        self.ae = ae

    @property
    def port(self) -> int:
        """The port listened on (the one the OS chose when constructed with port 0)."""
        if self._server is None:
            raise RuntimeError("the listener is not running")
        return int(self._server.server_address[1])

    def supported_contexts(self) -> dict[str, list[str]]:
        """SOP class UID -> accepted transfer syntaxes (for a conformance statement)."""
        return {
            str(c.abstract_syntax): [str(t) for t in c.transfer_syntax]
            for c in self.ae.supported_contexts
        }

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Listen in background threads; returns at once."""
        if self._server is not None:
            raise RuntimeError("the listener is already running")
        # pynetdicom's standard handlers log DIMSE contents; nothing of a data set may be logged.
        pynetdicom._config.LOG_HANDLER_LEVEL = "none"
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._count("associations_accepted")),
            (evt.EVT_REJECTED, self._count("associations_rejected")),
            (evt.EVT_ABORTED, self._count("associations_aborted")),
        ]
        self._server = self.ae.start_server(
            (self.host, self.requested_port), block=False, evt_handlers=handlers
        )

    def stop(self, drain_seconds: float = 10.0) -> bool:
        """Stop taking associations, give running ones `drain_seconds` to finish, then abort
        the rest. True when every association ended on its own."""
        server = self._server
        if server is None:
            return True
        self._server = None
        server.shutdown()  # stops accepting and closes the listening socket
        deadline = time.monotonic() + max(drain_seconds, 0.0)
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        drained = not server.active_associations
        for association in server.active_associations:
            association.abort()
        return drained

    # -- handlers ----------------------------------------------------------------------------

    def _count(self, name: str) -> Callable[[evt.Event], None]:
        def handler(event: evt.Event) -> None:
            self.stats.add(name)

        return handler

    def _on_echo(self, event: evt.Event) -> int:
        self.stats.add("echoes")
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        sop_class = str(event.context.abstract_syntax)
        if sop_class not in INTAKE_SOP_CLASSES:
            self.stats.add("ignored_sop_class")
            return SUCCESS
        data = event.encoded_dataset()
        try:
            header = read_instance_header(data)
        except UnreadableInstance:
            self.stats.add("failed_unreadable")
            return CANNOT_UNDERSTAND
        uid = str(header.get("SOPInstanceUID", "") or "").strip()
        try:
            refusal = self.gate(header)
        except Exception as exc:  # its message could quote a header value: the type only
            logger.error(
                "intended-use gate failed", extra={"fields": {"error": type(exc).__name__}}
            )
            self.stats.add("failed_unreadable")
            return CANNOT_UNDERSTAND
        if refusal is not None:
            self.stats.add("ignored_not_intended_use")
            return SUCCESS
        meta: dict[str, Any] = {
            "source": "dimse",
            "calling_ae": str(event.assoc.requestor.ae_title),
            "sop_class_uid": sop_class,
            "transfer_syntax": str(event.context.transfer_syntax),
            "received_at": datetime.now(UTC).isoformat(),
        }
        try:
            self.spool.put(uid, data, meta)
        except SpoolFull:
            self.stats.add("refused_spool_full")
            return OUT_OF_RESOURCES
        except ValueError:  # not a UID: the instance cannot be identified
            self.stats.add("failed_unreadable")
            return CANNOT_UNDERSTAND
        except OSError as exc:
            logger.error("spool write failed", extra={"fields": {"error": type(exc).__name__}})
            self.stats.add("failed_storage")
            return OUT_OF_RESOURCES
        self.stats.add("spooled")
        return SUCCESS
