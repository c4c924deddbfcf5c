"""Health checks for the services: ``ping listener``, ``ping worker``, ``ping api``.

Each asks one running service whether it answers, prints one line and exits
with an :class:`~pneumo.exit_codes.ExitCode`: OK when it answered,
UNAVAILABLE when it could not be reached (refused, rejected, no answer in
time), FAILED when it answered that it is not healthy, USAGE for bad
arguments or settings. The compose file's health checks run them inside each
container, so the defaults (address, AE titles, broker) come from the same
settings as the service they check.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

from pneumo.exit_codes import ExitCode

if TYPE_CHECKING:
    from pneumo.settings import Settings

__all__ = [
    "DEFAULT_API_HEALTH_URL",
    "DEFAULT_PING_CALLING_AE",
    "cmd_ping_api",
    "cmd_ping_listener",
    "cmd_ping_worker",
    "register",
]

DEFAULT_API_HEALTH_URL = "http://127.0.0.1:8000/api/health"
# The calling AE title of a C-ECHO when the listener accepts any caller; with an
# allow-list, its first entry (the listener rejects every other calling AE).
DEFAULT_PING_CALLING_AE = "PNEUMO-PING"
_DEFAULT_TIMEOUT = 5.0
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def register(subparsers: Any) -> None:
    """Add ``ping`` with its targets ``listener``, ``worker`` and ``api``."""
    ping = subparsers.add_parser(
        "ping", help="health check: does a running listener, worker or API answer?"
    )
    targets = ping.add_subparsers(dest="ping_target", required=True, metavar="SERVICE")

    listener = targets.add_parser("listener", help="a C-ECHO to the DICOM listener")
    listener.add_argument(
        "--host", default=None, help="default: PNEUMO_HOST, or 127.0.0.1 when that is a wildcard"
    )
    listener.add_argument("--port", type=int, default=None, help="default: PNEUMO_PORT")
    listener.add_argument("--ae", default=None, help="called AE title (default: PNEUMO_AE_TITLE)")
    listener.add_argument(
        "--calling-ae",
        default=None,
        help="our AE title in the association (default: the first of PNEUMO_ALLOWED_AETS "
        f"allowed from loopback, else its first, else {DEFAULT_PING_CALLING_AE})",
    )
    _add_timeout(listener)
    listener.set_defaults(func=cmd_ping_listener)

    worker = targets.add_parser("worker", help="a Celery ping through the broker")
    which = worker.add_mutually_exclusive_group()
    which.add_argument("--node", default=None, help="only this Celery node name counts")
    which.add_argument(
        "--local",
        action="store_true",
        help="only a worker on this host counts (node name ending in @<this host name>)",
    )
    _add_timeout(worker)
    worker.set_defaults(func=cmd_ping_worker)

    api = targets.add_parser("api", help="GET the API's health endpoint")
    api.add_argument("--url", default=DEFAULT_API_HEALTH_URL, help="default: %(default)s")
    _add_timeout(api)
    api.set_defaults(func=cmd_ping_api)


def _add_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout", type=float, default=_DEFAULT_TIMEOUT, help="seconds (default: %(default)s)"
    )


def _load_settings() -> Settings | None:
    """The settings, or None (and a message) when they are invalid."""
    from pydantic import ValidationError

    from pneumo.settings import load_settings

    try:
        return load_settings()
    except (ValidationError, ValueError, OSError) as exc:
        print(f"pneumo ping: invalid settings: {exc}", file=sys.stderr)
        return None


def _report(code: ExitCode, message: str) -> ExitCode:
    print(message, file=sys.stdout if code == ExitCode.OK else sys.stderr, flush=True)
    return code


# --- listener -----------------------------------------------------------------------


def _calling_ae(settings: Settings, given: str | None) -> str:
    """``given``, else the first allowed AE title that may call from loopback (the
    ping's usual source), else the first allowed AE title, else the default."""
    from dicom_io.config import ALLOW_ANY_AE, AllowedPeer

    if given:
        return given
    peers = [AllowedPeer.parse(entry) for entry in settings.allowed_aets]
    listed = [p for p in peers if p.ae_title != ALLOW_ANY_AE]
    local = [p for p in listed if p.allows(p.ae_title, "127.0.0.1") or p.allows(p.ae_title, "::1")]
    chosen = local or listed
    return chosen[0].ae_title if chosen else DEFAULT_PING_CALLING_AE


def cmd_ping_listener(args: argparse.Namespace) -> int:
    """C-ECHO (Verification, PS3.4 Annex A) to the listener: OK on a Success status.

    Over DICOM TLS when the settings configure it, as the listener then requires.
    """
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from dicom_io.config import validate_ae_title
    from dicom_io.send import client_ssl_context

    settings = _load_settings()
    if settings is None:
        return ExitCode.USAGE
    host = args.host or (settings.host if settings.host not in _WILDCARD_HOSTS else "127.0.0.1")
    port = args.port if args.port is not None else settings.port
    try:
        called = validate_ae_title(args.ae or settings.ae_title)
        calling = validate_ae_title(_calling_ae(settings, args.calling_ae))
    except ValueError as exc:
        print(f"pneumo ping listener: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    target = f"{called}@{host}:{port}"
    if not getattr(args, "verbose", False):  # one line from us, not pynetdicom's connection errors
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    tls = settings.tls_config()
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    ae.connection_timeout = args.timeout
    try:
        tls_args = (client_ssl_context(tls), None) if tls is not None else None
        assoc = ae.associate(host, port, ae_title=called, tls_args=tls_args)  # type: ignore[arg-type]
    except (OSError, ValueError) as exc:  # TLS files unreadable, handshake failed
        return _report(ExitCode.UNAVAILABLE, f"listener {target}: {type(exc).__name__}: {exc}")
    if assoc.is_rejected:
        return _report(
            ExitCode.UNAVAILABLE,
            f"listener {target}: association rejected (is {calling} an allowed calling AE?)",
        )
    if not assoc.is_established:
        return _report(
            ExitCode.UNAVAILABLE,
            f"listener {target}: no association (not listening, or no answer in time)",
        )
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    code = int(getattr(status, "Status", -1)) if status else -1
    if code == 0x0000:
        return _report(ExitCode.OK, f"listener {target}: C-ECHO success")
    if code == -1:
        return _report(ExitCode.UNAVAILABLE, f"listener {target}: no C-ECHO response")
    return _report(ExitCode.FAILED, f"listener {target}: C-ECHO status 0x{code:04X}")


# --- worker ---------------------------------------------------------------------------


def _answering_nodes(replies: list[dict[str, Any]], node: str | None, local: bool) -> list[str]:
    """Node names among Celery ping replies that count (``{name: {"ok": "pong"}}`` each)."""
    names = sorted(name for reply in replies for name in reply)
    if node:
        return [name for name in names if name == node]
    if local:
        suffix = "@" + socket.gethostname()
        return [name for name in names if name.endswith(suffix)]
    return names


def cmd_ping_worker(args: argparse.Namespace) -> int:
    """A Celery ``control.ping`` through the broker: OK when a worker that counts answers.

    The embedded broker is never started here: when it is not running, no worker is.
    """
    from kombu.exceptions import OperationalError

    from pneumo.celery_app import build_app
    from worker import embedded_broker

    settings = _load_settings()
    if settings is None:
        return ExitCode.USAGE
    if settings.uses_embedded_broker and embedded_broker.running_pid(settings.data_dir) is None:
        return _report(
            ExitCode.UNAVAILABLE,
            f"worker: the embedded broker is not running (data dir {settings.data_dir})",
        )
    app = build_app(settings)
    destination = [args.node] if args.node else None
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=args.timeout)
            # One named node: stop at its answer; otherwise wait out the timeout for all.
            replies = app.control.ping(
                destination=destination,
                timeout=args.timeout,
                connection=connection,
                limit=1 if args.node else None,
            )
    except (OperationalError, OSError) as exc:
        return _report(ExitCode.UNAVAILABLE, f"worker: broker unreachable: {type(exc).__name__}")
    nodes = _answering_nodes(replies or [], args.node, args.local)
    if nodes:
        return _report(ExitCode.OK, f"worker: pong from {', '.join(nodes)}")
    which = args.node or (f"on {socket.gethostname()}" if args.local else "at all")
    return _report(
        ExitCode.UNAVAILABLE, f"worker: no answer from a worker {which} in {args.timeout:g} s"
    )


# --- api --------------------------------------------------------------------------------


def cmd_ping_api(args: argparse.Namespace) -> int:
    """GET the API's health endpoint: OK on HTTP 2xx, FAILED on another status."""
    if urllib.parse.urlsplit(args.url).scheme not in ("http", "https"):
        print(f"pneumo ping api: --url: not an http(s) URL: {args.url!r}", file=sys.stderr)
        return ExitCode.USAGE
    request = urllib.request.Request(args.url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            body = response.read(4096)
            status = int(response.status)
    except urllib.error.HTTPError as exc:  # the API answered: unhealthy (e.g. 503)
        detail = _summary(exc.read(4096))
        return _report(ExitCode.FAILED, f"api {args.url}: HTTP {exc.code} {detail}".rstrip())
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return _report(ExitCode.UNAVAILABLE, f"api {args.url}: {reason}")
    return _report(ExitCode.OK, f"api {args.url}: HTTP {status} {_summary(body)}".rstrip())


def _summary(body: bytes) -> str:
    """The health document's checks on one line, when the body is one; else nothing."""
    try:
        document = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(document, dict):
        return ""
    return json.dumps(document.get("checks", document), sort_keys=True)
