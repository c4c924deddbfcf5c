"""Wall-clock seconds per named stage; stored on the result row as ``result.timings``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["StageTimer", "timed"]


class StageTimer:
    """Wall-clock seconds per named stage, in the order they ran.

    A name timed twice accumulates (a retried or repeated step adds up).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` block under ``name``, also when it raises."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def timed(timer: StageTimer | None, name: str) -> contextlib.AbstractContextManager[None]:
    """``timer.stage(name)``, or a no-op when a stage runs untimed (tests, tools)."""
    return timer.stage(name) if timer is not None else contextlib.nullcontext()
