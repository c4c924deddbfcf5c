"""The exit codes every ``pneumo`` sub-command returns: one set for the whole CLI."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ExitCode"]


class ExitCode(IntEnum):
    """What a ``pneumo`` command's exit status means (shell convention: 2 = usage)."""

    OK = 0
    """The command did what was asked."""
    FAILED = 1
    """It ran, but some or all of the work failed (a study not queued, nothing scored...)."""
    USAGE = 2
    """Bad arguments or input: a bad path, an unreadable file, an unknown name."""
    UNAVAILABLE = 3
    """A service it needs (database, broker, PACS) could not be reached."""
