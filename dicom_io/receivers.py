"""Receiving processes: several processes accept associations on the listener's port.

One Python process decodes PDUs, checks headers and writes the spool under one
interpreter lock, so on a multi-core host a single listener stops short of
what the disks and the network allow once several associations arrive at once
(bench/ingest.py, four associations). With
``ListenerConfig.receiving_processes`` = N > 1 the :class:`~dicom_io.listener.Listener`
becomes a supervisor:

* it binds the listening socket itself (so ``port`` 0 still works) and starts
  N child processes (``python -m dicom_io.receivers``), each given the socket
  and one end of a control socket pair. Every child runs the listener's own
  C-ECHO/C-STORE code (AE titles, peer addresses, TLS, free-space checks,
  spool writes through ``.pool`` with one flush each) and accepts from the
  shared socket: whichever child is free takes the next association (a child
  already serving some defers its accept by a few milliseconds, so
  associations that arrive together spread over the children);
* study assembly stays in the parent, in one place: a child reports each
  durably spooled instance over the control socket and waits for the answer
  before it answers C-STORE, so Success still comes only after the instance
  *and* its study journal are durable (a journal write failure is refused with
  0xA700, as in one process). Association releases and closes, counters and
  log records travel the same way, in order;
* the parent recovered the spool's pool before starting any child. A child
  never recovers it (other children are writing there); one SOP Instance UID
  arriving in two children at once is serialised by the spool's lock files;
* a child that dies is started again (:func:`restart_delay`: after 1 s, twice
  as long each time it dies again within 30 s, at most once a minute). Its
  unanswered C-STOREs were never acknowledged, so the sender retries them; its
  open associations are closed in the assembler, so their studies complete by
  the quiet window, and the empty files of its pool are removed (a written
  one stays for the next start's recovery). A child whose parent dies stops
  by itself.

The control protocol is pickled tuples over a private socket pair between a
process and the children it started (``multiprocessing.connection``).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from dicom_io.assembly import AssemblySink, JournalWriteError, ReadyStudy
from dicom_io.config import ListenerConfig
from dicom_io.durable import remove_unused_pool_files
from dicom_io.listener import Listener, build_ssl_context
from dicom_io.spool import Spool, StoreOutcome, StoreResult
from dicom_io.tuning import server_contexts

if TYPE_CHECKING:
    import ssl

__all__ = ["ReceivingProcesses", "restart_delay"]

log = logging.getLogger(__name__)

_READY_TIMEOUT = 60.0  # a child imports pydicom and pynetdicom, then reports ready
_STOP_TIMEOUT = 15.0
_RESTART_DELAY = 1.0  # before the first restart of a child that ran a while
_RESTART_DELAY_MAX = 60.0  # a child that keeps dying is started at most once a minute
_STABLE_AFTER = 30.0  # a child that ran this long restarts at the first delay again
_BACKLOG = 64
_ACCEPT_DEFERRAL = 0.003  # seconds per association a child serves already

# Replies to a "stored" report.
_OK, _JOURNAL_FAILED, _ASSEMBLY_FAILED = "ok", "journal-failed", "assembly-failed"


# --------------------------------------------------------------------------- parent side


class _Child:
    """One receiving process as its supervisor sees it."""

    def __init__(self, index: int, proc: subprocess.Popen[bytes], conn: Connection) -> None:
        self.index = index
        self.proc = proc
        self.conn = conn
        self.ready = threading.Event()  # set when it accepts, or when it ended before
        self.exit_code: int | None = None  # set when it ended
        self.open_associations: set[int] = set()
        self.stored = 0  # instances reported by this process
        self.started_at = time.monotonic()


class ReceivingProcesses:
    """The children of one listener and the threads that serve their reports."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self.count = listener.config.receiving_processes
        self._socket: socket.socket | None = None
        self._children: dict[int, _Child] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._started = False  # children that die after this are started again
        self._delays: dict[int, float] = {}  # index -> delay of its last restart

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("receiving processes not started")
        return int(self._socket.getsockname()[1])

    @property
    def pids(self) -> list[int]:
        """Process ids of the children running now."""
        with self._lock:
            return [c.proc.pid for c in self._children.values() if c.proc.poll() is None]

    def stored_by_process(self) -> dict[int, int]:
        """Instances each running child has reported since it started, by process id."""
        with self._lock:
            return {c.proc.pid: c.stored for c in self._children.values()}

    def start(self) -> None:
        """Bind the port and start every child; return once all of them accept.

        Raises:
            OSError: the address cannot be bound.
            ssl.SSLError, OSError, ValueError: the TLS configuration cannot be
                loaded (checked here, before any child starts).
            RuntimeError: a child exited or did not report ready in time (it
                logged why).
        """
        config = self._listener.config
        if config.tls is not None:
            build_ssl_context(config.tls)  # fail here, as one process would
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self._socket = socket.create_server(
            (config.host, config.port), family=family, backlog=_BACKLOG
        )
        self._stopping.clear()
        try:
            for index in range(self.count):
                self._spawn(index)
            deadline = time.monotonic() + _READY_TIMEOUT
            for child in list(self._children.values()):
                if not child.ready.wait(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"receiving process {child.index} did not start")
                if child.exit_code is not None:
                    raise RuntimeError(
                        f"receiving process {child.index} exited with code {child.exit_code} "
                        "before it accepted"
                    )
            self._started = True
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every child (their open associations are aborted) and close the port."""
        with self._lock:  # a restart racing this stop sees the flag under the same lock
            self._stopping.set()
            children = list(self._children.values())
        for child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("receiving process %d did not stop; killing it", child.index)
                child.proc.kill()
                child.proc.wait()
            child.conn.close()
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    # --- children -------------------------------------------------------------
    def _spawn(self, index: int) -> None:
        assert self._socket is not None
        ours, theirs = socket.socketpair()
        listen_fd, control_fd = self._socket.fileno(), theirs.fileno()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_io.receivers", str(listen_fd), str(control_fd)],
                pass_fds=(listen_fd, control_fd),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        root = logging.getLogger()
        conn.send(
            (
                replace(self._listener.config, receiving_processes=1),
                root.getEffectiveLevel(),
                logging.getLogger("pynetdicom").getEffectiveLevel(),
            )
        )
        child = _Child(index, proc, conn)
        with self._lock:
            if self._stopping.is_set():  # stop() already listed the children: end this one
                proc.kill()
                proc.wait()
                conn.close()
                return
            self._children[index] = child
        threading.Thread(
            target=self._serve, args=(child,), name=f"pneumo-receiver-{index}", daemon=True
        ).start()

    def _serve(self, child: _Child) -> None:
        """Answer one child's reports until it exits; then start it again unless stopping."""
        try:
            while True:
                try:
                    message = child.conn.recv()
                    self._handle(child, message)
                except (EOFError, OSError):
                    break
                except Exception as exc:  # never leave a child waiting for an answer
                    log.error(
                        "report of receiving process %d not handled (%s); restarting it",
                        child.index,
                        type(exc).__name__,
                    )
                    child.proc.kill()
                    break
        finally:
            self._child_ended(child)

    def _key(self, child: _Child, association_id: int) -> int:
        """An association id unique across children (ids are per process)."""
        return (child.index << 64) | association_id

    def _handle(self, child: _Child, message: tuple[Any, ...]) -> None:
        listener, assembler = self._listener, self._listener.assembler
        kind = message[0]
        if kind == "stored":
            result: StoreResult = message[1]
            key = self._key(child, message[2])
            child.open_associations.add(key)
            try:
                assembler.instance_stored(result, key)
                reply = _OK
            except JournalWriteError:
                reply = _JOURNAL_FAILED
            except Exception:  # the child logs it, as the listener does in one process
                reply = _ASSEMBLY_FAILED
            child.stored += 1  # before the answer: whoever got Success can count on it
            child.conn.send(reply)
            if reply != _JOURNAL_FAILED and result.outcome is not StoreOutcome.DUPLICATE:
                listener.report_stored(result.instance)
        elif kind == "released":
            assembler.association_released(self._key(child, message[1]))
        elif kind == "closed":
            key = self._key(child, message[1])
            child.open_associations.discard(key)
            assembler.association_closed(key)
        elif kind == "count":
            listener.count_event(message[1])
        elif kind == "log":
            record: logging.LogRecord = message[1]
            logging.getLogger(record.name).handle(record)
        elif kind == "ready":
            child.ready.set()

    def _child_ended(self, child: _Child) -> None:
        code = child.exit_code = child.proc.wait()
        child.ready.set()  # start() waits no longer for a child that is gone
        for key in sorted(child.open_associations):
            self._listener.assembler.association_closed(key)
        child.open_associations.clear()
        try:  # its pool's unused files, which no other process will take
            remove_unused_pool_files(self._listener.spool.pool_dir, child.proc.pid)
        except OSError as exc:  # they stay for the next start's recovery
            log.warning(
                "unused pool files of receiving process %d not removed (%s)",
                child.index,
                exc.strerror,
            )
        if self._stopping.is_set() or not self._started:
            return
        lived = time.monotonic() - child.started_at
        delay = restart_delay(self._delays.get(child.index), lived)
        self._delays[child.index] = delay
        self._listener.count_event("process_restarts")
        log.error(
            "receiving process %d (pid %d) exited with code %s after %.0f s; "
            "starting it again in %.0f s",
            child.index,
            child.proc.pid,
            code,
            lived,
            delay,
        )
        child.conn.close()
        if not self._stopping.wait(delay):
            try:
                self._spawn(child.index)
            except OSError as exc:
                log.error("receiving process %d not restarted (%s)", child.index, exc)


def restart_delay(previous: float | None, lived: float) -> float:
    """Seconds to wait before starting again a child that ran ``lived`` seconds.

    The first restart, and any restart of a child that ran at least
    ``_STABLE_AFTER`` seconds, waits ``_RESTART_DELAY``; a child that keeps dying
    sooner waits twice as long each time, up to ``_RESTART_DELAY_MAX``, so a
    crash loop (a full disk, a broken installation) costs little CPU and fills
    the log slowly while the other children go on receiving.
    """
    if previous is None or lived >= _STABLE_AFTER:
        return _RESTART_DELAY
    return min(previous * 2.0, _RESTART_DELAY_MAX)


# --------------------------------------------------------------------------- child side


class _Control:
    """The child's end of the control socket: reports, and calls that wait for a reply."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def post(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self._conn.send(message)

    def call(self, message: tuple[Any, ...]) -> Any:
        # The parent answers reports in order and only "stored" ones, so the next
        # message on the socket after ours is our reply.
        with self._lock:
            self._conn.send(message)
            return self._conn.recv()

    def put_nowait(self, record: logging.LogRecord) -> None:  # logging.handlers.QueueHandler
        try:
            self.post(("log", record))
        except (OSError, ValueError):  # the parent is gone; stderr still has the record
            sys.stderr.write(f"{record.levelname} {record.name}: {record.getMessage()}\n")


class _AssemblerProxy:
    """The parent's study assembler, as the child's C-STORE handlers see it."""

    def __init__(self, control: _Control) -> None:
        self._control = control

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 10.0) -> None:
        pass

    def instance_stored(self, result: StoreResult, association_id: int | None = None) -> None:
        reply = self._control.call(("stored", result, association_id or 0))
        if reply == _JOURNAL_FAILED:
            raise JournalWriteError("study journal write failed in the listener")
        if reply != _OK:
            raise RuntimeError("study assembly failed in the listener")

    def association_released(self, association_id: int) -> None:
        self._control.post(("released", association_id))

    def association_closed(self, association_id: int) -> None:
        self._control.post(("closed", association_id))


class _AdoptingServer(ThreadedAssociationServer):
    """pynetdicom's threaded server on a socket its parent bound and listens on."""

    adopted: socket.socket

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()
        self.socket = self.adopted
        # Several processes accept from this socket: one that loses the race for
        # a connection must not block in accept() (and so miss its shutdown).
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # the parent listens already

    def get_request(self) -> tuple[socket.socket, Any]:
        # Associations arriving together wake every child; one already serving
        # some steps back for a moment so a less busy sibling accepts first.
        # Losing the race is harmless: accept() fails, the next select decides.
        busy = len(self.ae.active_associations)
        if busy:
            time.sleep(_ACCEPT_DEFERRAL * min(busy, 4))
        return super().get_request()


class _Receiver(Listener):
    """The listener's C-STORE/C-ECHO service in a child, reporting to its parent."""

    def __init__(self, config: ListenerConfig, control: _Control, sock: socket.socket) -> None:
        self._control = control
        self._adopted = sock
        super().__init__(config, on_study_ready=_never_called)

    def _make_assembler(self, on_study_ready: Callable[[ReadyStudy], None]) -> AssemblySink:
        return _AssemblerProxy(self._control)  # the parent assembles

    def _open_spool(self) -> Spool:
        return Spool(
            self.config.spool_dir,
            max_inflated_bytes=self.config.max_inflated_bytes,
            clean_incoming=False,
            pooled=True,
        )

    def _serve(self, ae: AE, handlers: list[Any], ssl_context: ssl.SSLContext | None) -> Any:
        server_class = type("_Adopting", (_AdoptingServer,), {"adopted": self._adopted})
        server = ae.make_server(
            ("", 0),
            evt_handlers=handlers,
            ssl_context=ssl_context,
            contexts=server_contexts(ae),
            server_class=server_class,
        )
        ae._servers.append(server)  # as AE.start_server does: its shutdown() removes it
        threading.Thread(
            target=server.serve_forever, name="pneumo-receiver-accept", daemon=True
        ).start()
        return server

    def count_event(self, key: str) -> None:
        super().count_event(key)
        self._control.post(("count", key))


def _never_called(study: ReadyStudy) -> None:  # pragma: no cover - the parent assembles
    raise AssertionError("a receiving process does not assemble studies")


def _child_main(listen_fd: int, control_fd: int) -> int:
    conn = Connection(control_fd)
    config, root_level, pynetdicom_level = conn.recv()
    control = _Control(conn)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(logging.handlers.QueueHandler(control))  # type: ignore[arg-type]
    root.setLevel(root_level)
    logging.getLogger("pynetdicom").setLevel(pynetdicom_level)
    # Ctrl-C in a terminal reaches the whole process group: the parent decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    parent = os.getppid()
    receiver = _Receiver(config, control, socket.socket(fileno=listen_fd))
    receiver.start()
    control.post(("ready",))
    while not stop.wait(1.0):
        if os.getppid() != parent:  # the parent died: nobody assembles what we store
            break
    receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(int(sys.argv[1]), int(sys.argv[2])))
