"""Speed patches applied to pynetdicom/pydicom for our listener and sender.

Kept apart from :mod:`dicom_io.listener` because each one reaches into a
library's internals (pynetdicom 3.0: ``AssociationSocket.recv``, the DUL's
``_decode_pdu``, the deep copy of supported contexts, the reactors' polling
sleeps; glibc's ``mallopt``); when pynetdicom changes, this is the one module
to revisit. Each patch keeps pynetdicom's semantics and has a test in
``tests/dicom_receive/test_tuning.py``.

Latency of one C-STORE over one association (the sender waits for each
response): pynetdicom's two threads per association poll. The DUL reactor
sleeps 1 ms whenever it found nothing to do, so an arriving request and our
queued response each waited up to 1 ms, and on a busy machine every such
wake-up costs a scheduling delay on top; the association reactor sleeps 1 ms
per loop before it looks for a decoded message. :func:`tune_connection`
makes both wait on the thing they wait for: the DUL reactor in ``select()``
on its socket and on a wake-up pipe written when a PDU is queued for sending
(still at most its 1 ms, so its timers and kill flag are checked as often as
before), the association reactor in a blocking ``get`` on its message queue
(at most 10 ms, then it checks for release, abort and timeouts as before).

Received data: pynetdicom turns each P-DATA-TF PDU into bytes four times
before the DIMSE layer appends it to the data set (``bytes()`` of the read
buffer, a slice past the PDU header, a slice per PDV item, a slice past the
PDV's control byte): 6.95 ms of CPU for an 8 MB instance sent as one PDU, in
a one-off timing of the decoding alone (0.84 ms as views).
:func:`decode_pdu_fast` gives the DIMSE layer read-only views of the read
buffer instead, so the data set's only copy in Python is its write into the
message's buffer.

Large buffers: glibc serves allocations above a threshold (128 KiB at start,
raised to the size of a mapped block when one is freed) with fresh ``mmap``
pages and unmaps them at ``free``. Whether an 8 MB data set's buffers land
there depends on the order of allocations and frees, and without pynetdicom's
copies they did: in a one-off run of ``bench/ingest.py``'s no-write receiver
(no PDU limit, DCMTK ``storescu`` sending 2048² instances) each instance took
2 098 minor page faults and 10 ms of CPU, against 237 faults and 5.5 ms with
the copies, and 156 faults and 5.0 ms with the views and
:func:`tune_allocator`. That fixes the threshold at 32 MiB (``mallopt``), so
buffers up to that size are reused from the heap (up to 128 MiB of free heap
is kept rather than returned); larger ones are still mapped and unmapped.

C-STORE responses: pynetdicom builds each response's command set as a pydicom
data set and encodes it, per instance received. :func:`encode_store_response`
writes the same bytes directly for the common response, a status with no
Offending Element or Error Comment, and :func:`tune_connection` sends it
through the DUL as pynetdicom would; anything else takes pynetdicom's path.
"""

from __future__ import annotations

import copy
import ctypes
import os
import platform
import queue
import select
import socket
import struct
import threading
import time
import types
import weakref
from typing import Any

import pynetdicom.association
import pynetdicom.dul
from pynetdicom import AE, evt
from pynetdicom._handlers import standard_dimse_sent_handler, standard_pdu_recv_handler
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext

__all__ = [
    "decode_pdu_fast",
    "encode_store_response",
    "server_contexts",
    "set_nodelay",
    "tune_allocator",
    "tune_connection",
]

_IMMUTABLE = (str, int, float, bool, type(None))


class _CheaplyCopiedContext(PresentationContext):
    """A supported presentation context whose deep copy does not re-validate its UIDs.

    pynetdicom deep-copies the server's supported contexts for every accepted
    association. With every storage SOP class times every transfer syntax
    (~200 x 45 UIDs) that took ~120 ms of CPU per association, most of it
    pydicom re-validating each copied UID, and it holds the GIL while other
    associations wait. Every attribute of a context is an immutable value or a
    list of immutable UIDs, so copying the lists *is* a deep copy.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _CheaplyCopiedContext:
        new = self.__class__.__new__(self.__class__)
        for name, value in vars(self).items():
            if isinstance(value, list) and all(isinstance(v, _IMMUTABLE) for v in value):
                value = list(value)
            elif not isinstance(value, _IMMUTABLE):
                value = copy.deepcopy(value, memo)
            setattr(new, name, value)
        return new


def server_contexts(ae: AE) -> list[PresentationContext]:
    """The AE's supported contexts as given to ``start_server(contexts=...)``, cheap to copy."""
    contexts: list[PresentationContext] = []
    for cx in ae.supported_contexts:
        cheap = _CheaplyCopiedContext.__new__(_CheaplyCopiedContext)
        for name, value in vars(cx).items():
            setattr(cheap, name, list(value) if isinstance(value, list) else value)
        contexts.append(cheap)
    return contexts


def _recv_exact(self: Any, nr_bytes: int) -> bytearray:
    """Read exactly ``nr_bytes`` (fewer only if the peer closed) into one buffer.

    Replaces pynetdicom's ``AssociationSocket.recv`` for our associations:
    upstream reads in 4 KiB ``recv()`` calls and grows a bytearray, i.e. about
    2000 system calls and copies per 8 MB instance; ``recv_into`` a
    preallocated buffer takes a handful. Same contract: returns what was read.
    """
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    sock = self.socket
    while got < nr_bytes:
        n = sock.recv_into(view[got:], nr_bytes - got)
        if not n:
            del view
            return buf[:got]
        got += n
    del view
    return buf


_P_DATA_TF = 0x04  # PDU type (PS3.8 Table 9-22)
_PDU_HEADER = 6  # PDU type (1), reserved (1), PDU length (4)
_PDV_LENGTH = struct.Struct(">L")


def _pdv_items(buffer: memoryview) -> list[PresentationDataValueItem]:
    """The PDV items of a P-DATA-TF PDU (header included) as views of ``buffer``.

    Raises:
        ValueError: an item's length runs past the PDU, or is too short to
            hold its context ID and control header (PS3.8 §9.3.5.1).
    """
    items = []
    offset, end = _PDU_HEADER, len(buffer)
    while offset < end:
        if end - offset < 4:
            raise ValueError("truncated PDV item length")
        (length,) = _PDV_LENGTH.unpack_from(buffer, offset)
        if length < 2 or offset + 4 + length > end:
            raise ValueError("PDV item length out of range")
        item = PresentationDataValueItem()
        item.presentation_context_id = buffer[offset + 4]
        # A view where pynetdicom has bytes: the DIMSE layer only indexes, slices and writes it.
        item.presentation_data_value = buffer[offset + 5 : offset + 4 + length]  # type: ignore[assignment]
        items.append(item)
        offset += 4 + length
    return items


def decode_pdu_fast(self: Any, bytestream: bytearray) -> tuple[Any, str]:
    """DUL ``_decode_pdu`` whose P-DATA-TF values are views of the read buffer, not copies.

    The PDV values are read-only ``memoryview`` slices of ``bytestream``
    (the DIMSE layer indexes, slices and writes them as it would bytes). Only
    when nobody but pynetdicom's logging handler (which logs nothing for a
    P-DATA-TF) listens for EVT_PDU_RECV and nobody listens for EVT_DATA_RECV,
    since those handlers are promised bytes; any other PDU, or other handlers,
    take pynetdicom's path. A malformed item raises, as pynetdicom's
    decoder does, and the DUL answers it as an invalid PDU (Evt19).
    """
    assoc = self.assoc
    if (
        not bytestream
        or bytestream[0] != _P_DATA_TF
        or assoc.get_handlers(evt.EVT_DATA_RECV)
        or any(h[0] is not standard_pdu_recv_handler for h in assoc.get_handlers(evt.EVT_PDU_RECV))
    ):
        return type(self)._decode_pdu(self, bytestream)  # type: ignore[no-any-return]
    pdu = P_DATA_TF()
    pdu.presentation_data_value_items = _pdv_items(memoryview(bytestream).toreadonly())
    return pdu, "Evt10"


_C_STORE_RSP = 0x8001  # Command Field (PS3.7 E.1-1)
_NO_DATA_SET = 0x0101  # Command Data Set Type: no data set follows
_LAST_COMMAND_FRAGMENT = b"\x03"  # PDV message control header (PS3.8 E.2)
_PDV_OVERHEAD = 6  # PDV item length (4) + context id (1) + control header (1)


def _command_element(element: int, value: bytes) -> bytes:
    """One group 0000 element, implicit VR little endian (PS3.7 §6.3.1)."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw  # UI pads to even length with NUL


def encode_store_response(primitive: Any) -> bytes | None:
    """The C-STORE-RSP command set of ``primitive``, or None when it is not the plain kind.

    Plain: a response (Message ID Being Responded To set) with Affected SOP
    Class and Instance UIDs and a Status, no Offending Element, no Error
    Comment. The bytes equal pynetdicom's own encoding of that message
    (``tests/dicom_receive/test_tuning.py``).
    """
    if not isinstance(primitive, C_STORE):
        return None
    responded_to = primitive.MessageIDBeingRespondedTo
    status = getattr(primitive, "Status", None)
    sop_class = primitive.AffectedSOPClassUID
    sop_instance = primitive.AffectedSOPInstanceUID
    if None in (responded_to, status, sop_class, sop_instance):
        return None
    if primitive.OffendingElement is not None or primitive.ErrorComment is not None:
        return None
    body = b"".join(
        (
            _command_element(0x0002, _uid_value(str(sop_class))),
            _command_element(0x0100, struct.pack("<H", _C_STORE_RSP)),
            _command_element(0x0120, struct.pack("<H", responded_to)),
            _command_element(0x0800, struct.pack("<H", _NO_DATA_SET)),
            _command_element(0x0900, struct.pack("<H", status)),
            _command_element(0x1000, _uid_value(str(sop_instance))),
        )
    )
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


def _send_msg_fast(self: Any, primitive: Any, context_id: int) -> None:
    """DIMSE ``send_msg`` with plain C-STORE responses encoded by :func:`encode_store_response`.

    Only when nobody but pynetdicom's logging handler (which logs nothing for
    a C-STORE-RSP) listens for EVT_DIMSE_SENT, since that event is not raised
    here, and only when the command fits one PDV.
    """
    command = encode_store_response(primitive)
    limit = self.maximum_pdu_size
    if (
        command is not None
        and (not limit or len(command) <= limit - _PDV_OVERHEAD)
        and all(
            h[0] is standard_dimse_sent_handler for h in self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        )
    ):
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, _LAST_COMMAND_FRAGMENT + command))
        self.dul.send_pdu(pdata)
        return
    type(self).send_msg(self, primitive, context_id)


_M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for it on 64-bit systems
_TRIM_THRESHOLD = 128 << 20  # free heap kept before it is given back to the system


def tune_allocator() -> bool:
    """Keep blocks up to 32 MiB on glibc's heap between uses (module docstring).

    Process-wide and idempotent; called by the listener before it receives.
    Returns whether the allocator took the settings (False on a C library
    other than glibc, which has no ``mallopt``).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


def set_nodelay(raw_socket: Any) -> None:
    """Disable Nagle's algorithm on ``raw_socket`` (a no-op for anything else).

    A C-STORE response is a small write the peer waits for, and Nagle plus
    delayed ACKs can hold it back for tens of ms.
    """
    try:
        raw_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


# How long the association reactor blocks waiting for a decoded message before it
# checks for release, abort and timeouts again (pynetdicom polls every 1 ms).
_MESSAGE_WAIT_SECONDS = 0.01

# The sleep at the top of each loop of pynetdicom's ``Association._run_reactor``
# (its only sleep of this length).
_ASSOCIATION_LOOP_SLEEP = 0.001


class _ReactorClock:
    """Stands in for the ``time`` module inside ``pynetdicom.dul`` and ``pynetdicom.association``.

    ``sleep`` on a reactor thread that :func:`tune_connection` prepared calls
    that thread's ``_pneumo_wait`` instead: the DUL reactor waits for its
    socket or its wake-up pipe (never longer than asked), the association
    reactor skips its per-loop sleep (its message poll waits instead). Every
    other thread, and every other attribute, is the real ``time``.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        wait = getattr(threading.current_thread(), "_pneumo_wait", None)
        if wait is None:
            time.sleep(seconds)
        else:
            wait(seconds)


_clock_lock = threading.Lock()


def _install_reactor_clock() -> None:
    with _clock_lock:
        for module in (pynetdicom.dul, pynetdicom.association):
            namespace = vars(module)
            if not isinstance(namespace.get("time"), _ReactorClock):
                namespace["time"] = _ReactorClock()


def _association_wait(seconds: float) -> None:
    """The association reactor's sleeps, minus the per-loop one (see :func:`_blocking_get_msg`)."""
    if seconds != _ASSOCIATION_LOOP_SLEEP:
        time.sleep(seconds)


class _WakePipe:
    """A pipe a DUL reactor waits on beside its socket; written when a PDU is queued.

    Closed once, under a lock, so a late :meth:`wake` never writes to a
    descriptor number the process has since reused for another file.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._closed = False

    def fileno(self) -> int:
        return self._read

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._write, b"\0")
            except OSError:  # full: a wake-up is pending anyway
                pass

    def drain(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.read(self._read, 4096)
            except OSError:  # nothing to read
                pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._read)
            os.close(self._write)


def _wake_on_send(dul: Any) -> bool:
    """Make ``dul``'s idle sleep return when its socket is readable or a PDU is queued.

    Only before the DUL thread starts (EVT_CONN_OPEN comes first): its thread
    target is wrapped so that the wake-up pipe is closed when the reactor
    ends. Returns whether it was installed.
    """
    target = getattr(dul, "_target", None)
    started = getattr(dul, "_started", None)
    if target is None or started is None or started.is_set():
        return False
    pipe = _WakePipe()
    weakref.finalize(dul, pipe.close)  # a reactor that never ran
    provider = weakref.ref(dul)
    send_pdu = type(dul).send_pdu

    def run_then_close() -> None:
        try:
            target()
        finally:
            pipe.close()

    def send_and_wake(primitive: Any) -> None:
        owner = provider()
        if owner is None:
            return
        send_pdu(owner, primitive)
        pipe.wake()

    def wait(seconds: float) -> None:
        owner = provider()
        watched: list[Any] = [getattr(getattr(owner, "socket", None), "socket", None), pipe]
        try:
            readable, _, _ = select.select(watched, [], [], seconds)
        except (OSError, TypeError, ValueError):  # no socket any more, or it closed
            time.sleep(seconds)
            return
        if pipe in readable:
            pipe.drain()

    dul._target = run_then_close
    dul.send_pdu = send_and_wake
    dul._pneumo_wait = wait
    return True


def _blocking_get_msg(self: Any, block: bool = False) -> tuple[Any, Any]:
    """DIMSE ``get_msg``: the reactor's non-blocking poll waits briefly for a message instead."""
    try:
        if block:
            return self.msg_queue.get(block=True, timeout=self.dimse_timeout)  # type: ignore[no-any-return]
        return self.msg_queue.get(block=True, timeout=_MESSAGE_WAIT_SECONDS)  # type: ignore[no-any-return]
    except queue.Empty:
        return None, None


def tune_connection(assoc: Any) -> None:
    """Per-connection tweaks for an accepted association (bound to EVT_CONN_OPEN).

    Reads whole PDUs with few system calls and decodes P-DATA without copies,
    disables Nagle, replaces the reactors' polling sleeps with waits on what
    they poll for and encodes plain C-STORE responses directly (module
    docstring).
    """
    dul = getattr(assoc, "dul", None)
    sock = getattr(dul, "socket", None)
    if sock is None:
        return
    if hasattr(sock, "recv"):
        sock.recv = types.MethodType(_recv_exact, sock)
    if dul is not None and hasattr(dul, "_decode_pdu"):
        dul._decode_pdu = types.MethodType(decode_pdu_fast, dul)
    set_nodelay(getattr(sock, "socket", None))
    _install_reactor_clock()
    _wake_on_send(dul)  # else the DUL reactor keeps pynetdicom's 1 ms polling
    dimse = getattr(assoc, "dimse", None)
    if dimse is not None and hasattr(dimse, "send_msg"):
        dimse.send_msg = types.MethodType(_send_msg_fast, dimse)
    if dimse is not None and hasattr(dimse, "msg_queue"):
        # Both or neither: without a waiting poll, skipping the loop sleep would spin.
        dimse.get_msg = types.MethodType(_blocking_get_msg, dimse)
        assoc._pneumo_wait = _association_wait
