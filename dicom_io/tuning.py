"""Speed patches applied to pynetdicom/pydicom for our listener and sender.

Kept apart from :mod:`dicom_io.listener` because each one reaches into a
library's internals (pynetdicom 3.0: ``AssociationSocket.recv``, the deep
copy of supported contexts); when pynetdicom changes, this
is the one module to revisit. Each patch keeps pynetdicom's semantics and has
a test in ``tests/dicom_receive/test_tuning.py``.
"""

from __future__ import annotations

import copy
import socket
import types
from typing import Any

from pynetdicom import AE
from pynetdicom.presentation import PresentationContext

__all__ = [
    "server_contexts",
    "set_nodelay",
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


def set_nodelay(raw_socket: Any) -> None:
    """Disable Nagle's algorithm on ``raw_socket`` (a no-op for anything else).

    A C-STORE response is a small write the peer waits for, and Nagle plus
    delayed ACKs can hold it back for tens of ms.
    """
    try:
        raw_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


def tune_connection(assoc: Any) -> None:
    """Per-connection tweaks for an accepted association (bound to EVT_CONN_OPEN)."""
    sock = getattr(getattr(assoc, "dul", None), "socket", None)
    if sock is None:
        return
    if hasattr(sock, "recv"):
        sock.recv = types.MethodType(_recv_exact, sock)
    set_nodelay(getattr(sock, "socket", None))
