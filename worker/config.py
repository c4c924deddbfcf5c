"""What the worker layer needs to know, as one frozen value.

``pneumo.settings.Settings.worker_config()`` builds it (as ``listener_config()``
builds :class:`dicom_io.config.ListenerConfig`); nothing in ``worker`` reads
the environment or imports ``pneumo``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Literal

from dicom_io.config import Destination, TLSConfig
from model.precision import Precision

__all__ = ["WorkerConfig", "WorkerPool"]


class WorkerPool(str, Enum):
    """How a worker runs several studies at once (Celery ``--pool``)."""

    THREADS = "threads"
    """Threads in one process: the studies share one model and batch their images."""
    PREFORK = "prefork"
    """A process per study: each loads the model; the hard time limit kills a stuck one."""


@dataclass(frozen=True)
class WorkerConfig:
    """Configuration of the Celery app, its tasks and the pipeline stages.

    Raises:
        ValueError: from ``__post_init__`` when a limit is out of range (the
            offending field is named).
    """

    database_url: str
    """SQLAlchemy URL of the results database."""
    broker_url: str
    """Celery broker URL (``redis://``, ``rediss://`` or ``redis+socket://``)."""
    data_dir: Path
    """Root of the spool, the results and the embedded services' files."""
    results_dir: Path
    """Where SR and Secondary Capture files are written, one folder per study."""
    ae_title: str = "PNEUMO"
    """Our AE title, the calling AE when results are sent."""
    destinations: tuple[Destination, ...] = ()
    """Where results are sent (C-STORE)."""
    tls: TLSConfig | None = None
    """DICOM TLS for outbound associations."""
    pacs: Destination | None = None
    """The PACS's Query/Retrieve SCP (``PNEUMO_PACS``): where stage 1 fetches instance files
    the spool no longer holds (:mod:`dicom_io.retrieve`); None = such a study fails."""
    retrieve_method: Literal["get", "move"] = "get"
    """C-GET on our own association, or C-MOVE to our listener (``ae_title``; same spool)."""
    spool_dir: Path | None = None
    """The listener's spool, where retrieved instances go; None = ``data_dir / "spool"``."""
    send_retries: int = 3
    send_backoff_seconds: float = 2.0
    model_path: Path | None = None
    """Weights file; None = the newest shipped weights."""
    batch_size: int = 8
    """Images per forward pass."""
    batch_window_ms: float = 10.0
    """How long a forward pass waits for other studies' images (:mod:`worker.batcher`); 0 = none."""
    task_time_limit_seconds: int = 600
    task_max_retries: int = 3
    task_retry_backoff_seconds: float = 5.0
    torch_threads: int = 0
    """CPU threads per worker process; 0 = leave torch's default."""
    inference_precision: Precision = Precision.AUTO
    """What the forward pass computes in (:mod:`model.precision`); recorded with each result."""
    worker_warmup: bool = True
    """Load the model when a worker process starts, not on its first study."""
    heatmap_max_side: int = 1024
    """Longest side of the heatmap SC; 0 = source size."""
    intended_max_age_years: int = 17
    """Upper age of the intended population when the model card gives none."""
    max_image_pixels_bits: int = 16384 * 16384 * 16
    """Refuse to decode images larger than this (decompression bombs)."""
    heartbeat_interval_seconds: float = 5.0
    """How often a worker's main process writes its heartbeat row (:mod:`worker.heartbeat`)."""
    heartbeat_stale_seconds: float = 30.0
    """A worker silent this long is presumed dead; its studies are re-enqueued."""
    reconcile_interval_seconds: float = 5.0
    """How often each worker's reconciler looks for stale work (:mod:`worker.reconciler`); 0 = off."""
    reconcile_stale_seconds: float = 60.0
    """A queued study (with empty queues) or an unsent delivery untouched this long is re-published."""
    delivery_max_attempts: int = 10
    """Send attempts per (result, destination) after which the reconciler gives up on it."""
    fault_test_delay_seconds: float = 0.0
    """Sleep at the start of each processing attempt: for the fault tests only, 0 in production."""
    extra: dict[str, str] = field(default_factory=dict, compare=False)
    """Free-form values for tests and tools; never read by the pipeline."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "task_time_limit_seconds", "delivery_max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("send_retries", "task_max_retries", "torch_threads", "heatmap_max_side"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("heartbeat_interval_seconds", "heartbeat_stale_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.heartbeat_stale_seconds <= 2 * self.heartbeat_interval_seconds:
            raise ValueError("heartbeat_stale_seconds must exceed two heartbeat intervals")
        for name in ("reconcile_interval_seconds", "reconcile_stale_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.batch_window_ms < 0:
            raise ValueError("batch_window_ms must not be negative")
        if self.retrieve_method not in ("get", "move"):
            raise ValueError("retrieve_method must be 'get' or 'move'")
        if self.fault_test_delay_seconds < 0:
            raise ValueError("fault_test_delay_seconds must not be negative")
        # a plain string from a caller is checked and kept as the Enum
        object.__setattr__(self, "inference_precision", Precision.parse(self.inference_precision))
