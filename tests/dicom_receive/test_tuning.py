"""The listener's speed tweaks keep pynetdicom's semantics."""

from __future__ import annotations

import copy
import os
import queue
import socket
import threading
import time
import types

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES
from pynetdicom.presentation import PresentationContext

from dicom_io.listener import storage_sop_classes
from dicom_io.tuning import server_contexts


def _ae() -> AE:
    ae = AE()
    for uid in storage_sop_classes():
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    return ae


def test_server_contexts_deep_copy_like_the_originals():
    """pynetdicom deep-copies these per association: the copy must be independent and equal."""
    ae = _ae()
    originals = ae.supported_contexts
    ours = server_contexts(ae)
    copies = copy.deepcopy(ours)
    assert len(copies) == len(originals) > 100
    for original, mine, copied in zip(originals, ours, copies, strict=True):
        assert isinstance(copied, PresentationContext)
        assert copied == original  # pynetdicom's own equality
        assert vars(copied) == vars(original)
        assert copied.transfer_syntax == list(ALL_TRANSFER_SYNTAXES)
        # Independent lists: mutating one association's copy changes nothing else.
        assert copied._transfer_syntax is not mine._transfer_syntax
    copies[0].transfer_syntax = [ALL_TRANSFER_SYNTAXES[0]]
    assert ours[0].transfer_syntax == list(ALL_TRANSFER_SYNTAXES)


def test_server_contexts_copy_is_much_cheaper_than_pynetdicoms():
    ae = _ae()
    ours = server_contexts(ae)
    plain = ae.supported_contexts
    t = time.perf_counter()
    copy.deepcopy(plain)
    plain_s = time.perf_counter() - t
    t = time.perf_counter()
    copy.deepcopy(ours)
    ours_s = time.perf_counter() - t
    assert ours_s * 5 < plain_s


def test_set_nodelay_sets_the_option_and_ignores_non_sockets():
    import socket

    from dicom_io.tuning import set_nodelay

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        set_nodelay(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    set_nodelay(None)  # no socket (e.g. a closed association): nothing happens


class _FakeDUL:
    """What ``_wake_on_send`` touches on a DUL: socket, ``send_pdu``, the unstarted thread target."""

    def __init__(self, raw_socket: object) -> None:
        self.socket = types.SimpleNamespace(socket=raw_socket)
        self.sent: list[object] = []
        self._target = lambda: None
        self._started = threading.Event()

    def send_pdu(self, primitive: object) -> None:
        self.sent.append(primitive)


def _timed_wait(dul: _FakeDUL, seconds: float) -> tuple[threading.Thread, list[float]]:
    took: list[float] = []

    def run() -> None:
        start = time.monotonic()
        dul._pneumo_wait(seconds)  # type: ignore[attr-defined]
        took.append(time.monotonic() - start)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, took


def test_dul_idle_wait_ends_when_a_pdu_is_queued_or_data_arrive() -> None:
    """The DUL reactor's idle sleep returns at once for a queued response or an incoming PDU."""
    from dicom_io.tuning import _wake_on_send

    ours, peer = socket.socketpair()
    with ours, peer:
        dul = _FakeDUL(ours)
        assert _wake_on_send(dul)
        thread, took = _timed_wait(dul, 20.0)
        time.sleep(0.05)
        dul.send_pdu("response")  # what the association thread does after our handler
        thread.join(10)
        assert dul.sent == ["response"]  # still queued, by pynetdicom's own send_pdu
        assert took and took[0] < 5.0

        thread, took = _timed_wait(dul, 20.0)
        time.sleep(0.05)
        peer.send(b"\x04")  # the first byte of the next P-DATA-TF
        thread.join(10)
        assert took and took[0] < 5.0
        assert ours.recv(1) == b"\x04"  # the reactor reads the PDU

        thread, took = _timed_wait(dul, 0.05)  # nothing happens: sleeps as long as asked
        thread.join(10)
        assert took and took[0] >= 0.04


def test_reactor_clock_is_plain_time_outside_tuned_reactors() -> None:
    from dicom_io.tuning import _ReactorClock

    clock = _ReactorClock()
    assert clock.monotonic is time.monotonic
    start = time.monotonic()
    clock.sleep(0.05)
    assert time.monotonic() - start >= 0.04


def test_reactor_message_poll_waits_for_a_message_instead_of_sleeping() -> None:
    from dicom_io.tuning import _blocking_get_msg

    dimse = types.SimpleNamespace(msg_queue=queue.Queue(), dimse_timeout=None)
    get_msg = types.MethodType(_blocking_get_msg, dimse)
    assert get_msg(block=False) == (None, None)  # nothing within the short wait
    threading.Timer(0.005, dimse.msg_queue.put, args=[(1, "C-STORE-RQ")]).start()
    assert get_msg(block=False) == (1, "C-STORE-RQ")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_wake_pipe_is_closed_when_the_reactor_ends_and_not_installed_once_started() -> None:
    from dicom_io.tuning import _wake_on_send

    ours, peer = socket.socketpair()
    with ours, peer:
        before = _open_fds()
        dul = _FakeDUL(ours)
        assert _wake_on_send(dul)
        assert _open_fds() == before + 2
        dul._target()  # the reactor thread's body returns: the association ended
        assert _open_fds() == before
        dul.send_pdu("late A-ABORT")  # a late send writes to no reused descriptor
        assert dul.sent == ["late A-ABORT"]

        running = _FakeDUL(ours)
        running._started.set()  # too late to wrap its thread: pynetdicom's polling stays
        assert not _wake_on_send(running)
        assert not hasattr(running, "_pneumo_wait")


def test_tuned_associations_leave_no_descriptors_behind(make_listener) -> None:  # type: ignore[no-untyped-def]
    from pydicom.uid import generate_uid

    from tests.dicom_receive.dicom_receive_helpers import eventually, make_instance, scu_store

    listener, _ = make_listener()
    study = generate_uid()
    assert scu_store(listener.port, [make_instance(study)]) == [0]  # warm-up: imports, logging
    time.sleep(0.3)
    before = _open_fds()
    for _ in range(20):
        assert scu_store(listener.port, [make_instance(study)]) == [0]
    assert eventually(lambda: _open_fds() <= before + 2, timeout=10)


def _pynetdicom_store_response(primitive) -> bytes:
    from pynetdicom.dimse_messages import C_STORE_RSP

    msg = C_STORE_RSP()
    msg.primitive_to_message(primitive)
    [pdata] = list(msg.encode_msg(1, 0))
    [(context_id, pdv)] = pdata.presentation_data_value_list
    assert context_id == 1 and pdv[:1] == b"\x03"
    return pdv[1:]


def test_store_response_bytes_equal_pynetdicoms_encoding():
    from pydicom.uid import generate_uid
    from pynetdicom.dimse_primitives import C_STORE

    from dicom_io.tuning import encode_store_response

    for status, sop_class, message_id in [
        (0x0000, "1.2.840.10008.5.1.4.1.1.1.1", 1),  # odd-length UID: NUL padded
        (0xB000, "1.2.840.10008.5.1.4.1.1.7", 65535),  # even length, a warning
        (0xA700, "1.2.840.10008.5.1.4.1.1.88.22", 300),
    ]:
        primitive = C_STORE()
        primitive.MessageIDBeingRespondedTo = message_id
        primitive.AffectedSOPClassUID = sop_class
        primitive.AffectedSOPInstanceUID = generate_uid()
        primitive.Status = status
        assert encode_store_response(primitive) == _pynetdicom_store_response(primitive)

    primitive.ErrorComment = "spool write failed"  # not the plain kind: pynetdicom's path
    assert encode_store_response(primitive) is None
    request = C_STORE()
    request.MessageID = 1
    assert encode_store_response(request) is None
