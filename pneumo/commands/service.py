"""Commands that run the product's services: ``up``, ``listen``, ``worker``.

In the embedded default (no ``PNEUMO_BROKER_URL``) each of them starts the
private ``redis-server`` broker when none runs (:mod:`worker.embedded_broker`);
``up``, which owns the whole stack, stops it again at exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any

from pneumo.commands._common import quiet_libraries
from pneumo.exit_codes import ExitCode
from worker.config import WorkerPool
from worker.queues import QUEUE_PRIORITY, QueueName

if TYPE_CHECKING:
    from dicom_io.listener import Listener
    from pneumo.settings import Settings

__all__ = ["MAX_WORKER_RESTARTS", "cmd_listen", "cmd_up", "cmd_worker", "register"]

log = logging.getLogger("pneumo")

MAX_WORKER_RESTARTS = 5


def register(subparsers: Any) -> None:
    """Add ``up``, ``listen`` and ``worker``."""
    up = subparsers.add_parser(
        "up", help="embedded all-in-one: migrations, listener and a worker (Ctrl-C stops)"
    )
    _add_pool_arguments(up)
    up.add_argument(
        "--no-api", action="store_true", help="do not serve the staff API and worklist page"
    )
    up.set_defaults(func=cmd_up)

    listen = subparsers.add_parser("listen", help="run the DICOM listener (C-STORE SCP)")
    listen.set_defaults(func=cmd_listen)

    worker = subparsers.add_parser("worker", help="run a Celery worker")
    worker.add_argument(
        "--queues",
        default=",".join(queue.value for queue in QUEUE_PRIORITY),
        help="comma list, highest priority first",
    )
    _add_pool_arguments(worker)
    worker.add_argument("--hostname", default=None, help="Celery node name")
    worker.set_defaults(func=cmd_worker)


def _add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pool",
        choices=[pool.value for pool in WorkerPool],
        default=None,
        help="prefork: a process per study; threads: one process, one model, studies "
        "batched (default: PNEUMO_WORKER_POOL, prefork)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="studies in flight: threads (default PNEUMO_WORKER_THREADS, 4) or processes "
        "(default 1)",
    )


def _pool_of(args: argparse.Namespace, settings: Settings) -> tuple[WorkerPool, int]:
    """(pool, studies in flight) from the flags, else the settings."""
    pool = WorkerPool(args.pool) if args.pool else settings.worker_pool
    default = settings.worker_threads if pool is WorkerPool.THREADS else 1
    return pool, max(1, int(args.concurrency or default))


def _start_broker(settings: Settings) -> bool:
    """Start the embedded broker when the settings use it; False (and a message) on failure."""
    from pneumo.celery_app import start_embedded_broker
    from worker.embedded_broker import EmbeddedBrokerError

    try:
        start_embedded_broker(settings)
    except (EmbeddedBrokerError, OSError, subprocess.SubprocessError) as exc:
        print(f"pneumo: embedded broker did not start: {exc}", file=sys.stderr)
        return False
    return True


# --- listen -----------------------------------------------------------------------


def _build_listener(settings: Settings) -> Listener:
    from dicom_io.listener import Listener
    from pneumo.celery_app import build_app
    from worker.intake import Intake

    intake = Intake(config=settings.worker_config(), app=build_app(settings))
    return Listener(
        settings.listener_config(),
        on_study_ready=intake.on_study_ready,
        on_instance_stored=intake.on_instance_stored,
    )


def _announce(listener: Listener, settings: Settings) -> None:
    print(f"listening as {settings.ae_title} on {settings.host}:{listener.port}", flush=True)


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _serve_listener_metrics(listener: Listener, settings: Settings) -> Any:
    """The listener's counters on ``PNEUMO_METRICS_PORT`` (None when 0 or it cannot bind)."""
    if not settings.metrics_port:
        return None
    from pneumo.metrics import serve_listener_metrics

    try:
        server = serve_listener_metrics(listener, settings.host, settings.metrics_port)
    except OSError as exc:
        log.error("listener metrics not served on port %d (%s)", settings.metrics_port, exc)
        return None
    print(
        f"listener metrics at http://{settings.host}:{settings.metrics_port}/metrics",
        flush=True,
    )
    return server


def cmd_listen(args: argparse.Namespace) -> int:
    """Run the DICOM listener until SIGINT/SIGTERM."""
    from pneumo.settings import load_settings

    quiet_libraries(args)
    settings = load_settings()
    if not _start_broker(settings):
        return ExitCode.UNAVAILABLE
    listener = _build_listener(settings)
    stop = threading.Event()
    _stop_on_signals(stop)
    listener.start()
    _announce(listener, settings)
    metrics = _serve_listener_metrics(listener, settings)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        if metrics is not None:
            metrics.shutdown()
        listener.stop()
    print("listener stopped", flush=True)
    return ExitCode.OK


# --- worker ---------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a Celery worker on the app of :mod:`pneumo.celery_app` (blocks until stopped)."""
    from pneumo.celery_app import build_app
    from pneumo.settings import load_settings

    quiet_libraries(args)
    try:
        queues = [QueueName(q.strip()).value for q in args.queues.split(",") if q.strip()]
    except ValueError as exc:
        print(f"pneumo worker: --queues: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    settings = load_settings()
    if not _start_broker(settings):
        return ExitCode.UNAVAILABLE
    pool, concurrency = _pool_of(args, settings)
    if not settings.torch_threads:
        # Share the CPU cores among the pool processes instead of oversubscribing
        # them; the forked pool children inherit the app and its config. A
        # threads pool is one process whose model calls take turns: all cores.
        processes = concurrency if pool is WorkerPool.PREFORK else 1
        threads = max(1, (os.cpu_count() or 1) // processes)
        settings = settings.model_copy(update={"torch_threads": threads})
    app = build_app(settings)
    hostname = args.hostname or f"pneumo-{os.getpid()}@{socket.gethostname()}"
    argv = [
        "worker",
        "--queues", ",".join(queues),
        "--pool", pool.value,
        "--concurrency", str(concurrency),
        "--hostname", hostname,
        "--loglevel", "DEBUG" if getattr(args, "verbose", False) else "INFO",
        # No gossip, mingle or event heartbeats: liveness is the database's
        # worker_heartbeat row, written by the worker's own thread
        # (worker.heartbeat) and read by the reconciler (worker.reconciler).
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    app.worker_main(argv)
    return ExitCode.OK


# --- up ---------------------------------------------------------------------------


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # Celery: warm shutdown, unacked work is restored
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _start_worker(args: argparse.Namespace) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "pneumo.cli"]
    if getattr(args, "verbose", False):
        command.append("--verbose")
    command.append("worker")
    if args.pool:
        command += ["--pool", args.pool]
    if args.concurrency:
        command += ["--concurrency", str(args.concurrency)]
    # Own session: Ctrl-C reaches only us, and we stop the worker after the
    # listener, so nothing is received that no worker will process.
    return subprocess.Popen(command, start_new_session=True)


def _supervise(
    args: argparse.Namespace, listener: Listener, settings: Settings, stop: threading.Event
) -> ExitCode:
    """Run the listener and keep one worker process alive until ``stop`` is set."""
    from pneumo.metrics import register_listener, unregister_listener

    worker = _start_worker(args)
    restarts = 0
    register_listener(listener)  # its counters in the API's /metrics (same process)
    try:
        listener.start()
        _announce(listener, settings)
        while not stop.wait(0.5):
            if worker.poll() is None:
                continue
            if restarts >= MAX_WORKER_RESTARTS:
                log.error("worker keeps exiting (code %s); stopping", worker.returncode)
                return ExitCode.FAILED
            restarts += 1
            log.warning(
                "worker exited with code %s; restarting (%d/%d)",
                worker.returncode, restarts, MAX_WORKER_RESTARTS,
            )  # fmt: skip
            # Queued studies wait in the broker meanwhile; nothing is lost.
            worker = _start_worker(args)
        return ExitCode.OK
    finally:
        listener.stop()
        unregister_listener(listener)
        _terminate(worker, timeout=20.0)


class _ApiServer:
    """The staff API served from a thread of ``pneumo up`` (uvicorn, no signal handlers)."""

    def __init__(self, settings: Settings) -> None:
        import uvicorn

        from pneumo.api.app import create_app
        from pneumo.commands.staff import api_address

        host, port = api_address(settings, None, None)
        # No access log: query strings hold patient IDs. No log_config: uvicorn's
        # lines go through the root logger, in the PNEUMO_LOG_FORMAT of the rest.
        config = uvicorn.Config(
            create_app(settings),
            host=host,
            port=port,
            access_log=False,
            log_level="warning",
            log_config=None,
        )
        self.address = f"http://{host}:{port}"
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="pneumo-api", daemon=True)

    def _run(self) -> None:
        try:
            self._server.run()
        except BaseException as exc:  # uvicorn exits with SystemExit when it cannot bind
            log.error("staff API not served at %s (%s)", self.address, type(exc).__name__)

    def start(self) -> None:
        self._thread.start()
        print(f"staff API and worklist at {self.address}/", flush=True)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10.0)


def cmd_up(args: argparse.Namespace) -> int:
    """Migrations, the embedded broker, the listener and a worker; Ctrl-C stops them all."""
    from db.migrate import upgrade
    from pneumo.settings import load_settings
    from worker import embedded_broker

    quiet_libraries(args)
    settings = load_settings()
    upgrade(settings.effective_database_url)
    print(f"database ready; data in {settings.data_dir.resolve()}", flush=True)
    if not _start_broker(settings):
        return ExitCode.UNAVAILABLE
    stop = threading.Event()
    _stop_on_signals(stop)
    api = None if getattr(args, "no_api", False) else _ApiServer(settings)
    try:
        if api is not None:
            api.start()
        code = _supervise(args, _build_listener(settings), settings, stop)
    finally:
        if api is not None:
            api.stop()
        if settings.uses_embedded_broker:  # after the worker: it acks on its way out
            embedded_broker.stop(settings.data_dir)
    print("stopped", flush=True)
    return code
