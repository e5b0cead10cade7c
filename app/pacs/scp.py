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
- 0xA700 (out of resources) when the spool is full or cannot be written, or the results store
  holds its limit (`room`): retry later.
- 0xC000 (cannot understand) when the header cannot be read, has no SOP Instance UID, or the
  gate raises on it: a retry would not help, and the sender should know.

Associations: with `peers`, a caller is admitted only when its calling AE title and the address
its connection comes from match one listed (AE title, network) pair; any other is rejected
(A-ASSOCIATE-RJ: rejected permanent, service user, calling AE title not recognised) as soon as
its A-ASSOCIATE-RQ is read, before presentation contexts are negotiated, logged (address, AE
title and which check failed: nothing of a data set) and counted (`rejected_calling_ae`: the AE
title is listed for no address; `rejected_source_address`: it is, but not for this one). A title is
only what the caller says it is; the address is what the network says, which is why both are
checked. Without `peers` the listener admits anyone: `listener_from_settings` builds it that way
only when the site says so (`CXR_DICOM_OPEN`). `max_associations` bounds concurrency (pynetdicom
rejects the next one as transient, "local limit exceeded"); `max_pdu`, and the ACSE, DIMSE and
network timeouts are pynetdicom's settings of the same names.

Bounded before trust (`app.pacs.transport`): a connection takes an association slot only once its
A-ASSOCIATE-RQ is read; at most `max_associations + max_pending` connections are open (the next is
closed at once, without a thread); a PDU declaring more than the listener's maximum PDU (or, before
negotiation, a sane bound) aborts the association before its body is read; every PDU must arrive
within `read_deadline` seconds of its first byte; the data set of an ignored SOP class is read and
dropped as it arrives, and a kept one past `max_instance_bytes` aborts the association, as does one
that would take what the data sets being received hold in memory, all associations together, past
`max_buffered_bytes`. Reading the
header of a deflated instance inflates at most `HEADER_INFLATE_BYTES`, and at most
`DEFLATED_HEADER_READS` such reads run at once in the whole process. Each abort and refusal is
logged (reason, address, calling AE title, declared length; nothing of a data set) and counted
(`aborted_*`, `refused_too_many_connections`, `rejected_by_negotiation`).

Patient data: nothing from a data set is logged; `start` turns pynetdicom's standard log
handlers off (they print DIMSE message contents at debug level), for every AE the process creates
afterwards, which is what the result-sending side wants too.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

import pynetdicom
import pynetdicom._config
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE

from app.imaging.dicom import DECODABLE_TRANSFER_SYNTAXES
from app.pacs.spool import Spool, SpoolFull
from app.pacs.stow import UnreadableInstance, read_instance_header
from app.pacs.transport import (
    BoundedAE,
    BoundedAssociationServer,
    BoundedDUL,
    BoundedRequestHandler,
    BufferBudget,
)
from app.settings import DicomPeer, Settings

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
INTAKE_SOP_CLASSES = (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected permanent, by the service user, calling AE title not
# recognised; said to an unlisted peer whichever of its title or its address failed the check.
REJECT_UNLISTED = (0x01, 0x01, 0x03)

Gate = Callable[[Dataset], "str | None"]

# Reading a deflated instance's header inflates at most this much of its data set (a header is
# kilobytes; the pixel data after it is inflated later, by the decoder under the decode budget):
# a 200 kB deflate bomb no longer costs hundreds of MiB to have its header read.
HEADER_INFLATE_BYTES = 4 * 1024 * 1024
# Header reads of deflated instances at once, in the whole process (every listener together);
# the next waits up to its association's read deadline, then gets 0xA700.
DEFLATED_HEADER_READS = 2
_deflated_header_reads = threading.BoundedSemaphore(DEFLATED_HEADER_READS)


class ListenerRefused(Exception):
    """The settings ask for a C-STORE listener but list no peer, and do not say to run it open:
    it is not started (the rest of the service serves), and the message says what to set."""


def listener_from_settings(
    settings: Settings, spool: Spool, gate: Gate, room: Callable[[], bool] | None = None
) -> StorageListener:
    """The service's C-STORE listener (`CXR_DICOM_PORT`), admitting the peers the site lists
    (`CXR_DICOM_PEERS`, or the deprecated `CXR_DICOM_ALLOWED_AETS`), or anyone when
    `CXR_DICOM_OPEN` says so (a WARNING). ListenerRefused when neither is set."""
    if settings.dicom_port is None:
        raise ValueError("no CXR_DICOM_PORT: no listener")
    peers = settings.dicom_peer_list
    if peers is None and not settings.dicom_open:
        raise ListenerRefused(
            "the DICOM C-STORE listener admits only listed peers and none is listed: set "
            "CXR_DICOM_PEERS to AE@address pairs (e.g. MODALITY1@10.1.2.0/24,PACS@192.168.5.7), "
            "or CXR_DICOM_OPEN=true to admit any caller, or leave CXR_DICOM_PORT empty for no "
            "listener"
        )
    tls = None
    if settings.dicom_tls_cert is not None and settings.dicom_tls_key is not None:
        try:
            tls = server_tls_context(
                settings.dicom_tls_cert, settings.dicom_tls_key, settings.dicom_tls_client_ca
            )
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ListenerRefused(
                "the DICOM TLS certificate, key or client CA cannot be used (CXR_DICOM_TLS_CERT, "
                f"CXR_DICOM_TLS_KEY, CXR_DICOM_TLS_CLIENT_CA): {type(exc).__name__}: {reason}"[:300]
            ) from None
    if settings.dicom_allowed_aets is not None:
        logger.warning(
            "CXR_DICOM_ALLOWED_AETS is deprecated",
            extra={
                "fields": {
                    "read_as": [str(p) for p in peers or ()],
                    "instead": "CXR_DICOM_PEERS=AE@address,...: an AE title alone is only what "
                    "a caller says it is",
                }
            },
        )
    if peers is None:
        logger.warning(
            "dicom listener open to any caller",
            extra={
                "fields": {
                    "setting": "CXR_DICOM_OPEN=true",
                    "effect": "any host that reaches the port can store images and have "
                    "results written into the PACS; list callers in CXR_DICOM_PEERS",
                }
            },
        )
    return StorageListener(
        spool=spool,
        gate=gate,
        port=settings.dicom_port,
        ae_title=settings.dicom_ae_title,
        host=settings.dicom_host,
        peers=peers,
        max_associations=settings.dicom_max_associations,
        max_pending=settings.dicom_max_pending_connections,
        read_deadline=settings.dicom_read_deadline_s,
        # A connection's A-ASSOCIATE-RQ must be in within the read deadline too.
        acse_timeout=settings.dicom_read_deadline_s,
        max_instance_bytes=settings.dicom_max_instance_bytes,
        max_buffered_bytes=settings.dicom_max_buffered_bytes,
        room=room,
        tls=tls,
    )


class _HandshakeOnFirstRead(ssl.SSLContext):
    """pynetdicom wraps each accepted socket in its accept loop; with the handshake done there, one
    caller that never finishes its handshake would hold up every other. This context leaves the
    handshake to the association's own thread, where OpenSSL makes it on the first read."""

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_tls_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """The listener's TLS: TLS 1.2 or later with the certificate chain and key; with `client_ca`,
    a caller must present a certificate that CA signed (the handshake fails otherwise)."""
    context = _HandshakeOnFirstRead(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    return context


@dataclass
class IntakeStats:
    """Counters the service can export (plain ints; read them with `snapshot`)."""

    associations_accepted: int = 0
    associations_rejected: int = 0
    associations_aborted: int = 0
    aborted_pdu_too_long: int = 0
    aborted_read_deadline: int = 0
    aborted_instance_too_large: int = 0
    aborted_buffers_full: int = 0
    aborted_malformed_pdu: int = 0
    refused_too_many_connections: int = 0
    rejected_by_negotiation: int = 0
    rejected_calling_ae: int = 0
    rejected_source_address: int = 0
    echoes: int = 0
    spooled: int = 0
    ignored_sop_class: int = 0
    ignored_not_intended_use: int = 0
    refused_spool_full: int = 0
    refused_results_full: int = 0
    refused_header_reads_busy: int = 0
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
        peers: Sequence[DicomPeer] | None = None,
        allowed_calling_aets: set[str] | None = None,
        room: Callable[[], bool] | None = None,
        tls: ssl.SSLContext | None = None,
        max_associations: int = 10,
        max_pending: int = 32,
        read_deadline: float = 30.0,
        max_instance_bytes: int = 128 * 1024 * 1024,
        max_buffered_bytes: int = 256 * 1024 * 1024,
        max_pdu: int = 65536,
        acse_timeout: float = 30.0,
        dimse_timeout: float = 60.0,
        network_timeout: float = 60.0,
    ):
        if allowed_calling_aets is not None and not allowed_calling_aets:
            # pynetdicom reads an empty list as "anyone": refuse the ambiguity.
            raise ValueError("allowed_calling_aets must be None (anyone) or name at least one AE")
        if peers is not None and not peers:
            raise ValueError("peers must be None (anyone) or name at least one peer")
        if allowed_calling_aets is not None:
            # AE titles alone (the deprecated form): each from any address.
            anywhere = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
            listed = [DicomPeer(t, n) for t in sorted(allowed_calling_aets) for n in anywhere]
            peers = [*(peers or ()), *listed]
        self.peers: tuple[DicomPeer, ...] | None = None if peers is None else tuple(peers)
        self.ae_title = ae_title
        # Whether the results store can take another result (`Outbox.is_full`); without room an
        # image is refused as the full spool refuses it, rather than read into nowhere.
        self.room = room
        # DICOM TLS (`server_tls_context`); None: plain TCP.
        self.tls = tls
        self.spool = spool
        self.gate = gate
        self.host = host
        self.requested_port = port
        self.stats = IntakeStats()
        # Told of every refused or aborted association (the audit trail's security alerts):
        # the reason (a counter's name), the calling AE title and the address, when known.
        self.on_security_alert: Callable[[str, str | None, str | None], None] | None = None
        self._server: BoundedAssociationServer | None = None
        self.max_connections = max_associations + max_pending
        self.read_deadline = read_deadline
        self.max_instance_bytes = max_instance_bytes
        self.buffer_budget = BufferBudget(max_buffered_bytes)

        ae = BoundedAE(ae_title=ae_title)
        ae.maximum_associations = max_associations
        ae.maximum_pdu_size = max_pdu
        ae.acse_timeout = acse_timeout
        ae.dimse_timeout = dimse_timeout
        ae.network_timeout = network_timeout
        ae.add_supported_context(VERIFICATION)
        for sop_class in INTAKE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(DECODABLE_TRANSFER_SYNTAXES))
        for context in AllStoragePresentationContexts:
            other = str(context.abstract_syntax)
            if other not in INTAKE_SOP_CLASSES:
                ae.add_supported_context(other, ALL_TRANSFER_SYNTAXES)
        self.ae = ae

    @property
    def tls_mode(self) -> Literal["none", "server", "mutual"]:
        if self.tls is None:
            return "none"
        return "mutual" if self.tls.verify_mode == ssl.CERT_REQUIRED else "server"

    @property
    def running(self) -> bool:
        return self._server is not None

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
            (evt.EVT_REQUESTED, self._admit),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._count("associations_accepted")),
            (evt.EVT_REJECTED, self._on_negotiation_reject),
            (evt.EVT_ABORTED, self._count("associations_aborted")),
            (evt.EVT_CONN_CLOSE, self._release_buffer),
        ]
        # ae.start_server, with the bounded server and request handler (app.pacs.transport)
        server = cast(
            BoundedAssociationServer,
            self.ae.make_server(
                (self.host, self.requested_port),
                evt_handlers=handlers,
                ssl_context=self.tls,
                server_class=BoundedAssociationServer,
                request_handler=BoundedRequestHandler,
            ),
        )
        server.max_connections = self.max_connections
        server.read_deadline = self.read_deadline
        server.max_instance_bytes = self.max_instance_bytes
        server.kept_sop_classes = frozenset(INTAKE_SOP_CLASSES)
        server.buffer_budget = self.buffer_budget
        server.report = self._on_bounded  # type: ignore[method-assign]
        thread = threading.Thread(
            target=server.serve_forever, name="AcceptorServer@cxr", daemon=True
        )
        thread.start()
        self.ae._servers.append(server)
        self._server = server

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

    def _on_bounded(self, reason: str, fields: dict[str, Any]) -> None:
        """An association aborted or a connection refused by a bound (app.pacs.transport)."""
        counter = {
            "pdu_too_long": "aborted_pdu_too_long",
            "read_deadline": "aborted_read_deadline",
            "instance_too_large": "aborted_instance_too_large",
            "buffers_full": "aborted_buffers_full",
            "too_many_connections": "refused_too_many_connections",
        }.get(reason, "aborted_malformed_pdu")
        self.stats.add(counter)
        if counter.startswith("aborted_"):
            self.stats.add("associations_aborted")
            message = "dicom association aborted"
        else:
            message = "dicom connection refused"
        logger.warning(message, extra={"fields": {"reason": reason, **fields}})
        self._alert(counter, fields.get("calling_ae"), fields.get("address"))

    def _alert(self, reason: str, calling_ae: object, address: object) -> None:
        if self.on_security_alert is not None:
            self.on_security_alert(
                reason,
                str(calling_ae)[:16] if calling_ae else None,
                str(address) if address else None,
            )

    def _on_negotiation_reject(self, event: evt.Event) -> None:
        """EVT_REJECTED: pynetdicom's own rejection (no association slot free, a called AE title
        that is not ours); the peer list's rejections are logged by `_admit`."""
        self.stats.add("associations_rejected")
        self.stats.add("rejected_by_negotiation")
        request = event.assoc.requestor.primitive
        logger.warning(
            "dicom association rejected",
            extra={
                "fields": {
                    "reason": "negotiation",
                    "detail": "association limit reached or called AE title not ours",
                    "calling_ae": str(request.calling_ae_title).strip()[:16] if request else "",
                    "address": str(event.assoc.requestor.address),
                }
            },
        )

    def refusal(self, ae_title: str, address: str) -> str | None:
        """None when the peer list admits `ae_title` calling from `address`; otherwise the
        counter that names why not (`rejected_calling_ae`, `rejected_source_address`)."""
        if self.peers is None:
            return None
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return "rejected_source_address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 caller
        if any(peer.admits(ae_title, ip) for peer in self.peers):
            return None
        titles = {peer.ae_title for peer in self.peers}
        return "rejected_source_address" if ae_title in titles else "rejected_calling_ae"

    def _admit(self, event: evt.Event) -> None:
        """EVT_REQUESTED: the A-ASSOCIATE-RQ has been read and nothing negotiated yet; a caller the
        peer list does not admit gets its A-ASSOCIATE-RJ here (pynetdicom then skips the
        negotiation and closes the connection)."""
        requestor = event.assoc.requestor
        request = requestor.primitive  # set by pynetdicom before EVT_REQUESTED
        if not isinstance(request, A_ASSOCIATE):
            # A bound aborted the connection before its request was read (app.pacs.transport
            # woke the association with an A-P-ABORT, already logged and counted): end it here.
            event.assoc.kill()
            return
        # The request's own titles: pynetdicom copies them to `requestor.ae_title` only later.
        ae_title = str(request.calling_ae_title).strip() if request else ""
        called = str(request.called_ae_title).strip() if request else ""
        address = str(requestor.address)
        reason = self.refusal(ae_title, address)
        if reason is None:
            return
        self.stats.add("associations_rejected")
        self.stats.add(reason)
        logger.warning(
            "dicom association rejected",
            extra={
                "fields": {
                    "reason": reason,
                    "calling_ae": ae_title[:16],
                    "address": address,
                    "called_ae": called[:16],
                }
            },
        )
        self._alert(reason, ae_title, address)
        event.assoc.acse.send_reject(*REJECT_UNLISTED)
        event.assoc.kill()

    def _on_echo(self, event: evt.Event) -> int:
        self.stats.add("echoes")
        return SUCCESS

    def _release_buffer(self, event: evt.Event) -> None:
        if isinstance(event.assoc.dul, BoundedDUL):
            event.assoc.dul.release_buffer()

    def _on_store(self, event: evt.Event) -> int:
        try:
            return self._store(event)
        finally:
            # the data set's bytes are the spool's (or nobody's) now
            self._release_buffer(event)

    def _store(self, event: evt.Event) -> int:
        sop_class = str(event.context.abstract_syntax)
        if sop_class not in INTAKE_SOP_CLASSES:
            self.stats.add("ignored_sop_class")
            return SUCCESS
        data = event.encoded_dataset()
        try:
            if str(event.context.transfer_syntax) == DeflatedExplicitVRLittleEndian:
                if not _deflated_header_reads.acquire(timeout=self.read_deadline):
                    self.stats.add("refused_header_reads_busy")
                    return OUT_OF_RESOURCES
                try:
                    header = read_instance_header(_inflated_header_view(event))
                finally:
                    _deflated_header_reads.release()
            else:
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
        if self.room is not None and not self.room():
            self.stats.add("refused_results_full")
            return OUT_OF_RESOURCES
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


def _inflated_header_view(event: evt.Event) -> bytes:
    """A deflated C-STORE instance as an Explicit VR Little Endian PS3.10 file holding the first
    `HEADER_INFLATE_BYTES` of its inflated data set: enough to read its header, never the whole
    of a deflate bomb. A header that does not end within them is unreadable."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(
            event.encoded_dataset(include_meta=False), HEADER_INFLATE_BYTES
        )
    except zlib.error:
        raise UnreadableInstance("the deflated data set does not inflate") from None
    meta = event.file_meta
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    view = DicomBytesIO()
    view.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(view, meta, enforce_standard=False)
    view.write(inflated)
    return view.getvalue()
