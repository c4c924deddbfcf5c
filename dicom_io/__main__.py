"""``python -m dicom_io listen --port N --spool DIR``: a bare listener for ops and benchmarks.

Prints one JSON line per event on stdout: ``{"event": "listening", "port": N}``
once the socket is bound, then ``{"event": "study-ready", ...}`` per ready
study (UIDs and counts only, never PHI). Stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from dicom_io.assembly import ReadyStudy
from dicom_io.config import ListenerConfig, validate_ae_title

__all__ = ["main"]

_print_lock = threading.Lock()


def _emit(obj: dict[str, object]) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def _on_ready(study: ReadyStudy) -> None:
    _emit(
        {
            "event": "study-ready",
            "study_uid": study.study_uid,
            "instances": len(study.instances),
            "bytes": sum(i.size for i in study.instances),
            "amended": study.amended,
            "trigger": study.trigger,
        }
    )


def _listen(args: argparse.Namespace) -> int:
    from dicom_io.listener import Listener

    try:
        config = ListenerConfig(
            spool_dir=Path(args.spool),
            ae_title=args.ae_title,
            host=args.host,
            port=args.port,
            allowed_aets=frozenset(args.allow or ()),
            max_associations=args.max_associations,
            max_pdu=args.max_pdu,
            spool_reserve_bytes=int(args.reserve_mb * 1024 * 1024),
            study_quiet_seconds=args.quiet,
            study_release_grace_seconds=args.grace,
            receiving_processes=args.processes,
        )
    except ValueError as exc:  # names the offending field
        sys.stderr.write(f"python -m dicom_io listen: {exc}\n")
        return 2
    listener = Listener(config, _on_ready)
    listener.start()
    _emit({"event": "listening", "port": listener.port, "ae_title": config.ae_title})
    signal.signal(signal.SIGTERM, lambda *_: listener.stop())
    listener.serve_forever()
    _emit({"event": "stopped", **listener.stats})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dicom_io", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("listen", help="run a bare C-ECHO/C-STORE listener")
    p.add_argument("--spool", required=True, help="spool directory")
    p.add_argument("--port", type=int, default=11112, help="TCP port (0 = any free port)")
    p.add_argument(
        "--host", default="127.0.0.1", help="bind address; beyond loopback, --allow is required"
    )
    p.add_argument("--ae-title", default="PNEUMO", type=validate_ae_title)
    p.add_argument(
        "--allow",
        action="append",
        help="allowed calling AE title (repeatable); '*' = any, explicitly",
    )
    p.add_argument("--max-associations", type=int, default=10, help="per receiving process")
    p.add_argument(
        "--processes", type=int, default=1, help="receiving processes (dicom_io.receivers)"
    )
    p.add_argument("--max-pdu", type=int, default=0, help="0 = unlimited")
    p.add_argument("--reserve-mb", type=float, default=500.0, help="refuse below this free space")
    p.add_argument("--quiet", type=float, default=5.0, help="study quiet window (s)")
    p.add_argument("--grace", type=float, default=1.0, help="grace after release (s)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    return _listen(args)


if __name__ == "__main__":
    sys.exit(main())
