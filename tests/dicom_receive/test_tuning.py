"""The listener's speed tweaks keep pynetdicom's semantics."""

from __future__ import annotations

import copy
import os
import queue
import socket
import threading
import time
import types
from pathlib import Path

import pytest
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


# --- P-DATA decoded as views of the read buffer -------------------------------------------


def _pdata_pdu(items: list[tuple[int, bytes]]) -> bytearray:
    """A P-DATA-TF PDU as read from the socket: header and PDV items (PS3.8 §9.3.5)."""
    import struct

    body = b"".join(struct.pack(">LB", len(value) + 1, cid) + value for cid, value in items)
    return bytearray(struct.pack(">BBL", 0x04, 0, len(body)) + body)


def _acceptor_dul():  # type: ignore[no-untyped-def]
    from pynetdicom.association import Association

    return Association(AE(), "acceptor").dul


def test_pdata_values_are_views_of_the_read_buffer_equal_to_pynetdicoms_bytes() -> None:
    from dicom_io.tuning import decode_pdu_fast

    dul = _acceptor_dul()
    items = [(1, b"\x03" + b"command"), (1, b"\x00" + bytes(range(256)) * 40), (3, b"\x02" + b"z")]
    buffer = _pdata_pdu(items)
    fast, event = decode_pdu_fast(dul, buffer)
    plain, plain_event = type(dul)._decode_pdu(dul, bytearray(buffer))
    assert event == plain_event == "Evt10"
    ours = fast.to_primitive().presentation_data_value_list
    theirs = plain.to_primitive().presentation_data_value_list
    assert [(cid, bytes(value)) for cid, value in ours] == theirs
    assert [(cid, value) for cid, value in theirs] == [(cid, value) for cid, value in items]
    for _, value in ours:  # no copy: a read-only window on the buffer read from the socket
        assert isinstance(value, memoryview) and value.readonly and value.obj is buffer
    # What the DIMSE layer does with a value: its first byte, the rest written out.
    assert ours[1][1][0] == 0x00 and bytes(ours[1][1][1:]) == items[1][1][1:]


def test_pdata_fast_path_gives_way_to_handlers_that_want_the_bytes() -> None:
    from pynetdicom import evt

    from dicom_io.tuning import decode_pdu_fast

    buffer = _pdata_pdu([(1, b"\x02payload")])
    dul = _acceptor_dul()
    seen: list[object] = []
    dul.assoc.bind(evt.EVT_DATA_RECV, lambda event: seen.append(event.data))
    pdu, event = decode_pdu_fast(dul, buffer)
    assert event == "Evt10" and seen == [bytes(buffer)]
    [(_, value)] = pdu.to_primitive().presentation_data_value_list
    assert isinstance(value, bytes)  # pynetdicom's own decoding

    dul = _acceptor_dul()
    dul.assoc.bind(evt.EVT_PDU_RECV, lambda event: seen.append(event.pdu))
    pdu, _ = decode_pdu_fast(dul, _pdata_pdu([(1, b"\x02payload")]))
    assert seen[-1] is pdu
    [(_, value)] = pdu.to_primitive().presentation_data_value_list
    assert isinstance(value, bytes)


def test_other_pdus_take_pynetdicoms_decoder() -> None:
    from pynetdicom.pdu import A_RELEASE_RQ

    from dicom_io.tuning import decode_pdu_fast

    pdu, event = decode_pdu_fast(_acceptor_dul(), bytearray(A_RELEASE_RQ().encode()))
    assert isinstance(pdu, A_RELEASE_RQ) and event == "Evt12"


def test_malformed_pdv_items_raise_as_pynetdicoms_decoder_does() -> None:
    import struct

    from dicom_io.tuning import decode_pdu_fast

    dul = _acceptor_dul()
    good = _pdata_pdu([(1, b"\x02abc")])
    too_long = bytearray(good)
    struct.pack_into(">L", too_long, 6, 50)  # the item claims more than the PDU holds
    too_short = bytearray(good[:6]) + struct.pack(">LB", 1, 1)  # no control header byte
    truncated = bytearray(good) + b"\x00\x00"  # half an item length after the last item
    for bad in (too_long, too_short, truncated):
        struct.pack_into(">L", bad, 2, len(bad) - 6)
        with pytest.raises(ValueError):
            decode_pdu_fast(dul, bad)


@pytest.mark.parametrize("max_pdu", [0, 16384])
def test_listener_stores_the_bytes_sent_in_one_pdu_or_in_many(make_listener, max_pdu) -> None:  # type: ignore[no-untyped-def]
    """One 2 MB instance arrives whole (no PDU limit) or in 128 PDUs; the spool holds the same bytes."""
    from pydicom.uid import generate_uid

    from tests.dicom_receive.dicom_receive_helpers import (
        dataset_bytes,
        encode_wire,
        make_instance,
        scu_store,
    )

    listener, collector = make_listener(max_pdu=max_pdu)
    ds = make_instance(generate_uid(), rows=1024, cols=1024, seed=max_pdu)
    assert scu_store(listener.port, [ds]) == [0]
    [ready] = collector.wait(1)
    [instance] = ready.instances
    assert dataset_bytes(instance.path) == encode_wire(ds)


def test_a_malformed_pdata_pdu_aborts_its_association_and_the_listener_serves_on(
    make_listener,
) -> None:  # type: ignore[no-untyped-def]
    import struct

    from pydicom.uid import generate_uid

    from tests.dicom_receive.dicom_receive_helpers import eventually, make_instance, scu_store

    listener, collector = make_listener()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PNEUMO")
    assert assoc.is_established
    bad = _pdata_pdu([(1, b"\x02abc")])
    struct.pack_into(">L", bad, 6, 4096)  # a PDV item longer than its PDU
    assoc.dul.socket.socket.sendall(bytes(bad))
    assert eventually(lambda: not assoc.is_established, timeout=10)
    assert assoc.is_aborted
    ds = make_instance(generate_uid())
    assert scu_store(listener.port, [ds]) == [0]
    assert collector.wait(1)[0].study_uid == ds.StudyInstanceUID


_RECEIVER = """
import sys
from pynetdicom import AE, evt
from dicom_io.tuning import server_contexts, tune_allocator, tune_connection
if sys.argv[2] == "tuned":
    assert tune_allocator() and tune_allocator()  # glibc here; idempotent
ae = AE(ae_title="PNEUMO")
ae.maximum_pdu_size = 0
ae.add_supported_context("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
ae.add_supported_context("1.2.840.10008.1.1", "1.2.840.10008.1.2")
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True, contexts=server_contexts(ae),
                evt_handlers=[(evt.EVT_CONN_OPEN, lambda e: tune_connection(e.assoc)),
                              (evt.EVT_C_STORE, lambda e: 0)])
"""


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


def _faults_per_instance(allocator: str, files: list[Path]) -> float:
    """The receiver's minor page faults per instance storescu sends over one association.

    A warm-up association first. A new association's threads may still grow
    the heap once or twice by an instance's size (about 2 000 pages each).
    """
    import subprocess
    import sys

    from tests.conftest import free_port
    from tests.dicom_receive.dicom_receive_helpers import run_dcmtk
    from tests.paths import REPO

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _RECEIVER, str(port), allocator],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )

    def send(paths: list[Path]) -> None:
        args = ["/usr/bin/storescu", "-aec", "PNEUMO", "-R", "127.0.0.1", str(port)]
        done = run_dcmtk(*args, *map(str, paths))
        assert done.returncode == 0, done.stderr

    try:
        deadline = time.monotonic() + 30
        while run_dcmtk("/usr/bin/echoscu", "-aec", "PNEUMO", "127.0.0.1", str(port)).returncode:
            assert time.monotonic() < deadline, "receiver did not start"
            time.sleep(0.2)
        send(files[:1])  # warm-up: imports, first buffers
        before = _minor_faults(proc.pid)
        send(files[1:])
        return (_minor_faults(proc.pid) - before) / (len(files) - 1)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_tuned_allocator_keeps_8_mb_data_sets_from_faulting_in_fresh_pages(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Without it each 2048² data set (8 MB) storescu sends faults in about 2 000 fresh pages."""
    from pydicom.uid import generate_uid

    from tests.conftest import need_dcmtk
    from tests.dicom_receive.dicom_receive_helpers import make_instance, write_instance

    need_dcmtk("storescu", "echoscu")
    study = generate_uid()
    files = [
        write_instance(make_instance(study, rows=2048, cols=2048, seed=i), tmp_path)
        for i in range(17)
    ]
    default = _faults_per_instance("default", files)
    tuned = _faults_per_instance("tuned", files)
    pages = 2048 * 2048 * 2 // 4096
    # 16 instances: the heap's growth for the association's threads is at most ~250 per instance.
    assert tuned < pages / 4, (tuned, default)
    assert default > 3 * tuned, (tuned, default)
