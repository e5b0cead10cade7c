"""pynetdicom's DICOM upper layer, bounded before the peer is trusted.

pynetdicom 3.0 reads a PDU of whatever length its header declares (up to 4 GiB) into memory
before decoding it, gives every accepted TCP connection its threads before any limit, counts a
connection that has not yet sent its A-ASSOCIATE-RQ against `maximum_associations`, and bounds a
read only per `recv` (a byte every `network_timeout` keeps a read going for ever). The C-STORE
listener (`app.pacs.scp`) runs it through the classes here instead, which change only how bytes
come off the socket and when a connection counts:

- `BoundedDUL._read_pdu_data` (replacing pynetdicom's) reads the 6-byte PDU header first and
  aborts the association, before reading the body, when the declared length is over the bound:
  the listener's negotiated maximum PDU for a P-DATA-TF, `MAX_REQUEST_PDU` for an
  A-ASSOCIATE-RQ, `MAX_CONTROL_PDU` for the rest. The whole PDU must arrive within
  `read_deadline` seconds of its first byte (one deadline per PDU, not per `recv`).
- A P-DATA-TF is read item by item: a data set fragment of a presentation context whose SOP
  class the listener does not keep (`kept_sop_classes`) is read and dropped in small chunks, so
  an ignored instance of any size is never held; the data set of a kept one may grow to
  `max_instance_bytes`, past which the association is aborted. What kept data sets hold in
  memory, all associations together, is charged to one `BufferBudget` as it arrives and given
  back when the C-STORE handler is done with it (`BoundedDUL.release_buffer`) or the association
  ends; a fragment that does not fit aborts its association.
- `BoundedAssociationServer` accepts a connection only while fewer than `max_connections` are
  open (otherwise the socket is closed at once: no thread), and starts the association on the
  accepting thread (pynetdicom's threading server starts a thread to start the association's
  two). `BoundedAE.active_associations` leaves out an acceptor whose A-ASSOCIATE-RQ has not been
  read, so a connection takes an association slot only once its request is in.

Every abort and refusal goes to the server's `report(reason, fields)`; the listener logs it
(address, AE title, declared length: never a data set) and counts it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_P_ABORT
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

# An A-ASSOCIATE-RQ carries at most 128 presentation contexts; with every context offering ten
# 64-character transfer syntaxes it is about 100 kB.
MAX_REQUEST_PDU = 256 * 1024
# A-RELEASE-RQ/RP and A-ABORT are 4 bytes long; an A-ASSOCIATE-AC/RJ has no business arriving at
# an acceptor, but pynetdicom answers it itself, so it is read when it is short.
MAX_CONTROL_PDU = 64 * 1024
# A P-DATA-TF when the listener announced no maximum (0: unlimited in PS3.8).
MAX_UNLIMITED_PDU = 1024 * 1024
_CHUNK = 64 * 1024
_PDU_TYPES = frozenset(range(1, 8))
_A_ASSOCIATE_RQ = 0x01
_P_DATA_TF = 0x04

Report = Callable[[str, dict[str, Any]], None]


class _PeerGone(Exception):
    """The peer closed the connection, or the PDU missed its deadline (`deadline` True)."""

    def __init__(self, deadline: bool):
        self.deadline = deadline


class _Abort(Exception):
    """The PDU breaks a bound: the association is aborted with `reason`."""

    def __init__(self, reason: str, **fields: Any):
        self.reason = reason
        self.fields = fields


class BufferBudget:
    """Bytes of received data sets held in memory, all associations of a listener together,
    charged to the association (its DUL) that holds them."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._held: dict[int, int] = {}
        self._lock = threading.Lock()

    def take(self, holder: object, amount: int) -> bool:
        with self._lock:
            if self.used + amount > self.limit:
                return False
            self.used += amount
            self._held[id(holder)] = self._held.get(id(holder), 0) + amount
            return True

    def release(self, holder: object) -> None:
        with self._lock:
            self.used -= self._held.pop(id(holder), 0)


class BoundedDUL(DULServiceProvider):
    """pynetdicom's DUL with a bounded PDU reader (the module docstring says what it bounds).
    An acceptor's DUL is made one by `BoundedRequestHandler` (class swap: pynetdicom builds the
    DUL inside `Association.__init__`); its bounds live on the server."""

    _dataset_bytes = 0

    def release_buffer(self) -> None:
        """Give back to the budget what this association's data sets were charged (the C-STORE
        handler is done with them, or the connection closed)."""
        self._bounds.buffer_budget.release(self)

    @property
    def _bounds(self) -> BoundedAssociationServer:
        return self.assoc._server  # type: ignore[return-value]

    def _read_pdu_data(self) -> None:
        bounds = self._bounds
        deadline = time.monotonic() + bounds.read_deadline
        try:
            header = self._recv_exact(6, deadline)
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type not in _PDU_TYPES:
                raise _Abort("unknown_pdu_type", pdu_type=pdu_type)
            limit = self._limit(pdu_type)
            if length > limit:
                raise _Abort("pdu_too_long", pdu_type=pdu_type, declared=length, limit=limit)
            if pdu_type == _P_DATA_TF:
                body = self._read_p_data(length, deadline)
            else:
                body = self._recv_exact(length, deadline)
        except _PeerGone as gone:
            if gone.deadline:
                self._abort("read_deadline", {"seconds": bounds.read_deadline})
            else:
                self.event_queue.put("Evt17")  # transport connection closed
            return
        except _Abort as abort:
            self._abort(abort.reason, abort.fields)
            return
        finally:
            self._restore_timeout()
        data = header[:2] + struct.pack(">L", len(body)) + body
        try:
            pdu, event = self._decode_pdu(bytearray(data))
        except Exception:
            self.event_queue.put("Evt19")  # unrecognised or invalid PDU: pynetdicom aborts
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _limit(self, pdu_type: int) -> int:
        if pdu_type == _P_DATA_TF:
            announced = int(self.assoc.acceptor.maximum_length or 0)
            return announced if announced > 0 else MAX_UNLIMITED_PDU
        if pdu_type == _A_ASSOCIATE_RQ:
            return MAX_REQUEST_PDU
        return MAX_CONTROL_PDU

    def _read_p_data(self, length: int, deadline: float) -> bytes:
        """A P-DATA-TF's items, with the data set fragments of SOP classes the listener does not
        keep read and dropped (their item left with its control header only)."""
        kept = self._bounds.kept_sop_classes
        max_instance = self._bounds.max_instance_bytes
        items = bytearray()
        left = length
        while left > 0:
            if left < 6:
                raise _Abort("malformed_pdv")
            item_length, context_id, control = struct.unpack(">LBB", self._recv_exact(6, deadline))
            if item_length < 2 or item_length + 4 > left:
                raise _Abort("malformed_pdv")
            left -= 4 + item_length
            payload = item_length - 2
            context = self.assoc._accepted_cx.get(context_id)
            is_dataset = not control & 1
            if is_dataset and context is not None and context.abstract_syntax not in kept:
                self._discard(payload, deadline)
                items += struct.pack(">LBB", 2, context_id, control)
                continue
            if is_dataset:
                self._dataset_bytes += payload
                if self._dataset_bytes > max_instance:
                    raise _Abort("instance_too_large", limit=max_instance)
                budget = self._bounds.buffer_budget
                if not budget.take(self, payload):
                    raise _Abort("buffers_full", limit=budget.limit)
                if control & 2:
                    self._dataset_bytes = 0
            items += struct.pack(">LBB", item_length, context_id, control)
            items += self._recv_exact(payload, deadline)
        return bytes(items)

    def _restore_timeout(self) -> None:
        sock = self.socket.socket if self.socket is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.settimeout(self.assoc.network_timeout)

    def _raw(self) -> socket.socket:
        sock = self.socket.socket if self.socket is not None else None
        if sock is None:
            raise _PeerGone(deadline=False)
        return sock

    def _recv_exact(self, count: int, deadline: float) -> bytes:
        sock = self._raw()
        chunks = bytearray()
        try:
            while len(chunks) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _PeerGone(deadline=True)
                sock.settimeout(remaining)
                chunk = sock.recv(min(count - len(chunks), _CHUNK))
                if not chunk:
                    raise _PeerGone(deadline=False)
                chunks += chunk
        except TimeoutError:
            raise _PeerGone(deadline=True) from None
        except OSError:
            raise _PeerGone(deadline=False) from None
        return bytes(chunks)

    def _discard(self, count: int, deadline: float) -> None:
        while count > 0:
            step = min(count, _CHUNK)
            self._recv_exact(step, deadline)
            count -= step

    def _abort(self, reason: str, fields: dict[str, Any]) -> None:
        """Report, send an A-ABORT (service provider, invalid PDU parameter value), close the
        connection and let the association end without reading more."""
        assoc = self.assoc
        request = assoc.requestor.primitive
        self._bounds.report(
            reason,
            {
                **fields,
                "address": str(assoc.requestor.address),
                "calling_ae": str(request.calling_ae_title).strip()[:16] if request else "",
                "state": self.state_machine.current_state,
            },
        )
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = 0x06
        if self.socket is not None:
            # the peer may be gone already; closing is what matters
            with contextlib.suppress(Exception):
                self.socket.send(abort.encode())
            # Evt17: the state machine ends the association (an established one hears A-P-ABORT)
            self.socket.close()
        if request is None:
            # Still waiting for the A-ASSOCIATE-RQ: the association thread listens to its queue for
            # it, so it is woken with an abort instead of waiting out the ACSE timeout.
            assoc.is_aborted = True
            self.to_user_queue.put(A_P_ABORT())


class BoundedRequestHandler(RequestHandler):
    """Builds each acceptor association with a `BoundedDUL`."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assoc.dul.__class__ = BoundedDUL
        return assoc


class BoundedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's association server with a connection bound and the bounds its DULs read."""

    max_connections: int = 32
    # The kernel's queue of connections not yet accepted (socketserver's default is 5).
    request_queue_size = 128
    read_deadline: float = 30.0
    max_instance_bytes: int = 32 * 1024 * 1024
    kept_sop_classes: frozenset[str] = frozenset()
    buffer_budget: BufferBudget = BufferBudget(256 * 1024 * 1024)

    @staticmethod
    def report(reason: str, fields: dict[str, Any]) -> None:
        """Replaced by the listener: log and count an abort or refusal."""

    def process_request(self, request: Any, client_address: Any) -> None:
        # The accept loop's thread starts the association (two threads of pynetdicom's own); no
        # thread is started for a connection over the bound.
        if len(self.active_associations) >= self.max_connections:
            self.report(
                "too_many_connections",
                {"address": str(client_address[0]), "limit": self.max_connections},
            )
            self.shutdown_request(request)
            return
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)


class BoundedAE(AE):
    """An AE whose acceptors count against `maximum_associations` only once their
    A-ASSOCIATE-RQ has been read."""

    @property
    def active_associations(self) -> list[Association]:
        return [
            assoc
            for assoc in super().active_associations
            if not assoc.is_acceptor or assoc.requestor.primitive is not None
        ]
