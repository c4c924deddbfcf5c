"""What every request handler needs from the settings, fixed when the app is built."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from sqlalchemy.orm import Session

from db.engine import session_scope

__all__ = ["ApiContext", "context_of"]


@dataclass(frozen=True)
class ApiContext:
    """The API's configuration (built by :func:`pneumo.api.app.create_app`)."""

    database_url: str
    broker_url: str
    data_dir: Path
    max_image_pixels_bits: int
    model_card_dir: Path | None = None
    heartbeat_stale_seconds: float = 30.0
    """A worker silent this long is not counted as live (as in the reconciler)."""
    retrieve_purged: bool = False
    """A PACS is configured (``PNEUMO_PACS``): batches keep studies whose pixels were purged."""
    # Queues a stored study again on the batch queue (worker.intake.Intake.reprocess).
    reprocess: Callable[[str], int] | None = None

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error."""
        with session_scope(self.database_url) as session:
            yield session


def context_of(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.context
    return ctx
