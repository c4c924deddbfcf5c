"""Helpers the command modules share (not commands themselves)."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal

__all__ = ["quiet_libraries"]


def quiet_libraries(args: argparse.Namespace) -> None:
    """One line per study, not per C-STORE: library chatter only with --verbose.

    Also: ``kill -USR1 <pid>`` prints every thread's stack (diagnosing a hang).
    """
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if not getattr(args, "verbose", False):
        for name in ("pynetdicom", "highdicom", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
