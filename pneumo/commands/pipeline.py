"""Pipeline commands: ``up``, ``listen``, ``worker``, ``db upgrade``, ``status``, ``results``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

log = logging.getLogger("pneumo")


def register(subparsers: Any) -> None:
    up = subparsers.add_parser(
        "up", help="embedded all-in-one: migrations, listener and a worker (Ctrl-C stops)"
    )
    up.add_argument("--concurrency", type=int, default=1, help="worker processes (default 1)")
    up.set_defaults(func=cmd_up)

    listen = subparsers.add_parser("listen", help="run the DICOM listener (C-STORE SCP)")
    listen.set_defaults(func=cmd_listen)

    worker = subparsers.add_parser("worker", help="run a Celery worker")
    worker.add_argument(
        "--queues", default="realtime,batch", help="comma list, highest priority first"
    )
    worker.add_argument("--concurrency", type=int, default=1, help="worker processes")
    worker.add_argument("--hostname", default=None, help="Celery node name")
    worker.set_defaults(func=cmd_worker)

    reprocess = subparsers.add_parser(
        "reprocess", help="queue stored studies again on the batch queue (e.g. new model)"
    )
    reprocess.add_argument("--study-uid", action="append", required=True,
                           help="repeat for several studies")
    reprocess.set_defaults(func=cmd_reprocess)

    db = subparsers.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_sub.add_parser("upgrade", help="apply migrations up to the newest")
    upgrade.set_defaults(func=cmd_db_upgrade)

    status = subparsers.add_parser(
        "status", help="queue depths, studies by status, recent errors"
    )
    status.add_argument("--format", choices=("table", "json"), default="table")
    status.set_defaults(func=cmd_status)

    results = subparsers.add_parser("results", help="recent results")
    results.add_argument("--study-uid", default=None)
    results.add_argument("--limit", type=int, default=50)
    results.add_argument("--format", choices=("table", "json"), default="table")
    results.add_argument("--paths", action="store_true", help="add the SR file path column")
    results.set_defaults(func=cmd_results)


# --- db -------------------------------------------------------------------------


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from db.migrate import upgrade
    from pneumo.settings import load_settings

    _quiet_libraries(args)
    settings = load_settings()
    upgrade(settings.effective_database_url)
    print("database is at the newest schema")
    return 0


# --- listen -----------------------------------------------------------------------


def _build_listener(settings: Any) -> Any:
    from dicom_io.listener import Listener
    from worker.app import create_app
    from worker.intake import Intake

    intake = Intake(settings=settings, app=create_app(settings))
    return Listener(
        settings.listener_config(),
        on_study_ready=intake.on_study_ready,
        on_instance_stored=intake.on_instance_stored,
    )


def _quiet_libraries(args: argparse.Namespace) -> None:
    """One line per study, not per C-STORE: library chatter only with --verbose.

    Also: ``kill -USR1 <pid>`` prints every thread's stack (diagnosing a hang).
    """
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if not getattr(args, "verbose", False):
        for name in ("pynetdicom", "highdicom", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _announce(listener: Any, settings: Any) -> None:
    print(f"listening as {settings.ae_title} on {settings.host}:{listener.port}", flush=True)


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def cmd_listen(args: argparse.Namespace) -> int:
    from pneumo.settings import load_settings

    _quiet_libraries(args)
    settings = load_settings()
    listener = _build_listener(settings)
    stop = threading.Event()
    _stop_on_signals(stop)
    listener.start()
    _announce(listener, settings)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        listener.stop()
    print("listener stopped", flush=True)
    return 0


# --- worker ---------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    from pneumo.settings import load_settings
    from worker.app import create_app

    _quiet_libraries(args)
    settings = load_settings()
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    concurrency = max(1, int(args.concurrency))
    if not settings.torch_threads:
        # Share the CPU cores among the pool processes instead of oversubscribing
        # them; the pool children inherit the environment (and read settings).
        os.environ["PNEUMO_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // concurrency))
    app = create_app(settings)
    hostname = args.hostname or f"pneumo-{os.getpid()}@{socket.gethostname()}"
    argv = [
        "worker",
        "--queues", ",".join(queues),
        "--concurrency", str(concurrency),
        "--hostname", hostname,
        "--loglevel", "DEBUG" if getattr(args, "verbose", False) else "INFO",
        # No broadcast features: they need fanout exchanges the embedded broker lacks.
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]
    app.worker_main(argv)
    return 0


def cmd_reprocess(args: argparse.Namespace) -> int:
    from dicom_io.uids import require_uid
    from pneumo.settings import load_settings
    from worker.app import create_app
    from worker.intake import Intake

    settings = load_settings()
    intake = Intake(settings=settings, app=create_app(settings))
    code = 0
    for uid in args.study_uid:
        try:
            intake.reprocess(require_uid(uid, "--study-uid"))
            print(f"queued on batch: {uid}")
        except (LookupError, ValueError) as exc:
            print(f"not queued: {uid}: {exc}", file=sys.stderr)
            code = 1
    return code


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


MAX_WORKER_RESTARTS = 5


def _start_worker(args: argparse.Namespace) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "pneumo.cli"]
    if getattr(args, "verbose", False):
        command.append("--verbose")
    command += ["worker", "--concurrency", str(args.concurrency)]
    # Own session: Ctrl-C reaches only us, and we stop the worker after the
    # listener, so nothing is received that no worker will process.
    return subprocess.Popen(command, start_new_session=True)


def cmd_up(args: argparse.Namespace) -> int:
    from db.migrate import upgrade
    from pneumo.settings import load_settings

    _quiet_libraries(args)
    settings = load_settings()
    upgrade(settings.effective_database_url)
    print(f"database ready; data in {settings.data_dir.resolve()}", flush=True)

    stop = threading.Event()
    _stop_on_signals(stop)
    worker = _start_worker(args)
    listener = _build_listener(settings)
    code, restarts = 0, 0
    try:
        listener.start()
        _announce(listener, settings)
        while not stop.wait(0.5):
            if worker.poll() is None:
                continue
            if restarts >= MAX_WORKER_RESTARTS:
                log.error("worker keeps exiting (code %s); stopping", worker.returncode)
                code = 1
                break
            restarts += 1
            log.warning("worker exited with code %s; restarting (%d/%d)",
                        worker.returncode, restarts, MAX_WORKER_RESTARTS)
            # Queued studies wait in the broker meanwhile; nothing is lost.
            worker = _start_worker(args)
    finally:
        listener.stop()
        _terminate(worker, timeout=20.0)
    print("stopped", flush=True)
    return code


# --- status and results -------------------------------------------------------------


def queue_depths(app: Any, queues: tuple[str, ...]) -> dict[str, int | None]:
    """Messages waiting per queue (None when the broker cannot tell)."""
    depths: dict[str, int | None] = {}
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        for name in queues:
            try:
                depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
            except Exception:
                depths[name] = 0 if _queue_missing_is_empty(connection) else None
    return depths


def _queue_missing_is_empty(connection: Any) -> bool:
    # Virtual transports (Redis, SQL) report a never-used queue as missing.
    return bool(getattr(connection.transport, "driver_type", "") in ("redis", "sqlalchemy"))


def cmd_status(args: argparse.Namespace) -> int:
    from db import repository as repo
    from db.engine import session_scope
    from pneumo.settings import load_settings
    from worker.app import QUEUES, create_app

    settings = load_settings()
    try:
        depths: dict[str, int | None] = queue_depths(create_app(settings), QUEUES)
    except Exception as exc:
        log.warning("broker unreachable: %s", type(exc).__name__)
        depths = {name: None for name in QUEUES}
    with session_scope(settings.effective_database_url) as session:
        counts = repo.studies_by_status(session)
        errors = repo.recent_errors(session)
    if args.format == "json":
        print(json.dumps({
            "queues": depths,
            "studies": counts,
            "errors": [
                {"study_uid": e.study_uid, "kind": e.kind, "status": e.status,
                 "attempt": e.attempt, "error": e.error, "at": e.at.isoformat()}
                for e in errors
            ],
        }, indent=2))
        return 0
    print("queues:  " + "  ".join(f"{k}={'?' if v is None else v}" for k, v in depths.items()))
    print("studies: " + ("  ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"))
    if errors:
        print("recent errors:")
        for e in errors:
            print(f"  {e.at:%Y-%m-%d %H:%M:%S}  {e.study_uid}  {e.kind}#{e.attempt} "
                  f"{e.status}: {e.error}")
    else:
        print("recent errors: none")
    return 0


def _format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines.append("  ".join("-" * widths[c] for c in columns))
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def cmd_results(args: argparse.Namespace) -> int:
    from db import repository as repo
    from db.engine import session_scope
    from dicom_io.uids import require_uid
    from pneumo.settings import load_settings

    settings = load_settings()
    study_uid = require_uid(args.study_uid, "--study-uid") if args.study_uid else None
    with session_scope(settings.effective_database_url) as session:
        rows = repo.recent_results(session, study_uid=study_uid, limit=args.limit)
    if args.format == "json":
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    if not rows:
        print("no results")
        return 0
    table = [
        {
            "study_uid": r.study_uid,
            "accession": r.accession_number or "",
            "status": r.study_status,
            "rev": r.revision,
            "finding": "-" if r.finding is None else ("PNEUMONIA" if r.finding else "none"),
            "probability": "-" if r.probability is None else f"{r.probability:.4f}",
            "model": r.model,
            "flags": ",".join(r.flags) or "-",
            "delivery": ",".join(f"{d}:{s}" for d, s in r.deliveries) or "-",
            **({"sr_file": r.sr_path or "-"} if args.paths else {}),
        }
        for r in rows
    ]
    print(_format_table(table, list(table[0])))
    return 0

