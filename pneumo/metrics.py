"""Prometheus metrics (``pneumo_*``), derived when scraped from the sources of truth.

The listener and the workers are separate processes, so most metrics are not
counted in this process: a :class:`StateCollector` reads the database (studies,
deliveries, result timings, model versions, worker heartbeats, through
:mod:`db.metrics`) and the broker (queue depths) at each scrape. Only the
listener's own counters (``Listener.stats``) live in memory: a listener
registered here with :func:`register_listener` (``pneumo up`` runs it in the
API's process) is reported by :class:`ListenerCollector`; a standalone
``pneumo listen`` serves them itself on ``PNEUMO_METRICS_PORT``
(:func:`serve_listener_metrics`).

Latencies are summaries over a sliding window (:data:`WINDOW`) of recent
results: read the quantiles, and ``_sum / _count`` for the mean; they are not
cumulative, so never ``rate()`` them. No label carries a patient value or a UID.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from worker.batcher import FORWARD_TIMING_PREFIX

if TYPE_CHECKING:
    from dicom_io.listener import Listener
    from pneumo.settings import Settings

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "BROKER_TIMEOUT_SECONDS",
    "QUANTILES",
    "WINDOW",
    "ListenerCollector",
    "StateCollector",
    "build_registry",
    "register_listener",
    "serve_listener_metrics",
    "unregister_listener",
]

log = logging.getLogger(__name__)

WINDOW = timedelta(hours=1)
"""Latency summaries cover the results created this recently (``result.created_at``, indexed)."""

QUANTILES = (0.5, 0.9, 0.95, 0.99)

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
"""Upper bounds of the ``pneumo_inference_batch_size`` buckets (images per model call)."""

BROKER_TIMEOUT_SECONDS = 2.0
"""A scrape reports ``pneumo_broker_up 0`` rather than wait longer for the broker."""

# Listener.stats keys: instances kept (received) and instances not kept (refused).
_RECEIVED = ("stored", "replaced", "duplicate")
_REFUSED = {"refused": "invalid-data-set", "failed": "out-of-resources"}

_listeners: list[Listener] = []
_listeners_lock = threading.Lock()


def register_listener(listener: Listener) -> None:
    """Report ``listener``'s counters in this process's ``/metrics`` (``pneumo up``)."""
    with _listeners_lock:
        if listener not in _listeners:
            _listeners.append(listener)


def unregister_listener(listener: Listener) -> None:
    with _listeners_lock:
        if listener in _listeners:
            _listeners.remove(listener)


def _listener_totals() -> dict[str, int] | None:
    with _listeners_lock:
        listeners = list(_listeners)
    if not listeners:
        return None
    totals: dict[str, int] = {}
    for listener in listeners:
        for key, value in dict(listener.stats).items():
            totals[key] = totals.get(key, 0) + int(value)
    return totals


class ListenerCollector(Collector):
    """``pneumo_instances_received_total`` / ``_refused_total`` of the registered listeners,
    and ``pneumo_listener_process_restarts_total``.

    ``Listener.stats`` tells a refused data set (invalid UIDs, a deflate bomb:
    ``invalid-data-set``) from one that could not be kept (spool full or
    unwritable, journal failure: ``out-of-resources``); finer reasons are
    only in the listener's log.
    """

    def __init__(self, totals: Callable[[], Mapping[str, int] | None] = _listener_totals) -> None:
        self._totals = totals

    def collect(self) -> Iterator[Metric]:
        totals = self._totals()
        if totals is None:  # no listener in this process: say nothing rather than 0
            return
        received = CounterMetricFamily(
            "pneumo_instances_received",
            "C-STORE instances answered Success, by outcome (stored, replaced, duplicate)",
            labels=["outcome"],
        )
        for outcome in _RECEIVED:
            received.add_metric([outcome], totals.get(outcome, 0))
        refused = CounterMetricFamily(
            "pneumo_instances_refused",
            "C-STORE instances answered with a failure status, by reason",
            labels=["reason"],
        )
        for key, reason in _REFUSED.items():
            refused.add_metric([reason], totals.get(key, 0))
        yield received
        yield refused
        yield CounterMetricFamily(
            "pneumo_listener_process_restarts",
            "Receiving processes (PNEUMO_LISTENER_PROCESSES > 1) that died and were started again",
            value=totals.get("process_restarts", 0),
        )


def _summary(name: str, documentation: str) -> Metric:
    return Metric(name, documentation, "summary")


def _add_summary(metric: Metric, labels: dict[str, str], samples: Sequence[float]) -> None:
    ordered = sorted(samples)
    for q in QUANTILES:
        value = ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")
        metric.add_sample(metric.name, {**labels, "quantile": str(q)}, value)
    metric.add_sample(metric.name + "_count", labels, float(len(ordered)))
    metric.add_sample(metric.name + "_sum", labels, float(sum(ordered)))


class _QueueDepths:
    """Queue depths from the broker, never blocking a scrape longer than the timeout.

    The read runs in a daemon thread (kombu retries an unreachable broker for a
    long time); a scrape that times out reports the broker down and the next
    one waits for the same read rather than start another.
    """

    def __init__(self, read: Callable[[], Mapping[str, int | None]], timeout: float) -> None:
        self._read = read
        self._timeout = timeout
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._box: list[Mapping[str, int | None] | BaseException] = []

    def _run(self, box: list[Mapping[str, int | None] | BaseException]) -> None:
        try:
            box.append(self._read())
        except Exception as exc:
            box.append(exc)

    def __call__(self) -> Mapping[str, int | None] | None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._box = []
                self._thread = threading.Thread(
                    target=self._run, args=(self._box,), name="pneumo-metrics-broker", daemon=True
                )
                self._thread.start()
            thread, box = self._thread, self._box
        thread.join(self._timeout)
        if not box:
            return None  # still waiting for the broker
        outcome = box[0]
        if isinstance(outcome, BaseException):
            log.warning("metrics: broker unreachable (%s)", type(outcome).__name__)
            return None
        return outcome


class StateCollector(Collector):
    """Everything read from the database and the broker at scrape time."""

    def __init__(
        self,
        database_url: str,
        queue_depths: Callable[[], Mapping[str, int | None] | None],
        *,
        heartbeat_stale_seconds: float,
        window: timedelta = WINDOW,
    ) -> None:
        self._database_url = database_url
        self._queue_depths = queue_depths
        self._stale = timedelta(seconds=heartbeat_stale_seconds)
        self._window = window

    def collect(self) -> Iterator[Metric]:
        yield from self._broker()
        yield from self._database()

    def _broker(self) -> Iterable[Metric]:
        depths = self._queue_depths()
        up = GaugeMetricFamily("pneumo_broker_up", "1 when the broker answered this scrape")
        up.add_metric([], 0 if depths is None else 1)
        yield up
        if depths is None:
            return
        depth = GaugeMetricFamily(
            "pneumo_queue_depth", "Messages waiting in each Celery queue", labels=["queue"]
        )
        for queue, count in depths.items():
            if count is not None:
                depth.add_metric([queue], count)
        yield depth

    def _database(self) -> Iterable[Metric]:
        from sqlalchemy.exc import SQLAlchemyError

        from db import metrics as q
        from db.engine import session_scope
        from db.models import utcnow

        up = GaugeMetricFamily("pneumo_database_up", "1 when the database answered this scrape")
        try:
            since = utcnow() - self._window
            with session_scope(self._database_url) as session:
                studies = q.study_counts(session)
                deliveries = q.delivery_counts(session)
                stages = q.stage_seconds(session, since=since)
                processing = q.processing_seconds(session, since=since)
                models = q.models_in_use(session)
                workers = q.worker_counts(session, stale_after=self._stale)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("metrics: database unreachable (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        by_status = GaugeMetricFamily("pneumo_studies", "Studies by status", labels=["status"])
        for status, count in studies.items():
            by_status.add_metric([status], count)
        yield by_status

        delivered = GaugeMetricFamily(
            "pneumo_deliveries",
            "Result deliveries by destination (AE@host:port) and status",
            labels=["destination", "status"],
        )
        failures = CounterMetricFamily(
            "pneumo_send_failures",
            "Send attempts to a destination that did not end in Success",
            labels=["destination"],
        )
        for d in deliveries:
            for status, count in d.by_status.items():
                delivered.add_metric([d.destination, status], count)
            failures.add_metric([d.destination], d.failed_attempts)
        yield delivered
        yield failures

        window = f"{int(self._window.total_seconds())}s"
        stage = _summary(
            "pneumo_stage_seconds",
            f"Pipeline stage wall-clock seconds over results of the last {window} (result.timings)",
        )
        send = _summary(
            "pneumo_send_seconds",
            f"Seconds to send one result to a destination, results of the last {window}",
        )
        passes: dict[int, float] = {}
        for key, samples in sorted(stages.items()):
            if key.startswith("send:"):
                _add_summary(send, {"destination": key.removeprefix("send:")}, samples)
            elif key.startswith(FORWARD_TIMING_PREFIX):
                size = key.removeprefix(FORWARD_TIMING_PREFIX)
                if size.isdigit():
                    passes[int(size)] = passes.get(int(size), 0.0) + sum(samples)
            else:
                _add_summary(stage, {"stage": key}, samples)
        yield stage
        yield send
        yield _batch_sizes(passes, window)
        total = _summary(
            "pneumo_study_processing_seconds",
            f"Seconds from queueing a study to its result, results of the last {window}",
        )
        _add_summary(total, {}, processing)
        yield total

        info = GaugeMetricFamily(
            "pneumo_model_info",
            "Model versions that produced results; active=1 marks the newest result's model",
            labels=["name", "version", "sha256", "active"],
        )
        results = CounterMetricFamily(
            "pneumo_model_results",
            "Results produced by each model version",
            labels=["name", "version"],
        )
        for m in models:
            info.add_metric([m.name, m.version, m.sha256, "1" if m.active else "0"], 1)
            results.add_metric([m.name, m.version], m.results)
        yield info
        yield results

        live = GaugeMetricFamily(
            "pneumo_workers",
            "Workers by heartbeat freshness (worker_heartbeat rows)",
            labels=["state"],
        )
        live.add_metric(["live"], workers.live)
        live.add_metric(["stale"], workers.stale)
        yield live
        running = GaugeMetricFamily(
            "pneumo_worker_running_tasks", "Tasks the live workers reported running"
        )
        running.add_metric([], workers.running_tasks)
        yield running


def _batch_sizes(passes: Mapping[int, float], window: str) -> Metric:
    """``pneumo_inference_batch_size``: model calls by image count, of the results of the window.

    Each call is counted once, on the result of the study whose images came
    first in it (``forward_images:<n>`` timings, :mod:`worker.batcher`).
    """
    buckets: list[tuple[str, float]] = []
    for bound in BATCH_SIZE_BUCKETS:
        buckets.append((str(bound), sum(n for size, n in passes.items() if size <= bound)))
    buckets.append(("+Inf", sum(passes.values())))
    return HistogramMetricFamily(
        "pneumo_inference_batch_size",
        f"Images per model call (studies batched together), results of the last {window}",
        buckets=buckets,
        sum_value=sum(size * n for size, n in passes.items()),
    )


def _broker_reader(settings: Settings) -> Callable[[], Mapping[str, int | None]]:
    app: Any = None

    def read() -> Mapping[str, int | None]:
        nonlocal app
        if app is None:
            from pneumo.celery_app import build_app

            app = build_app(settings)
        from worker.app import queue_depths

        return queue_depths(app)

    return read


def build_registry(settings: Settings) -> CollectorRegistry:
    """The registry ``/metrics`` serves: database and broker state, and this process's listener."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        StateCollector(
            settings.effective_database_url,
            _QueueDepths(_broker_reader(settings), BROKER_TIMEOUT_SECONDS),
            heartbeat_stale_seconds=settings.heartbeat_stale_seconds,
        )
    )
    registry.register(ListenerCollector())
    return registry


def serve_listener_metrics(listener: Listener, host: str, port: int) -> Any:
    """Serve ``listener``'s counters alone on ``host:port`` (``pneumo listen``); the server.

    Raises:
        OSError: the address cannot be bound.
    """
    from prometheus_client import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ListenerCollector(lambda: dict(listener.stats)))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
