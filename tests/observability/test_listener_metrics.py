"""The listener's counters after real C-STOREs: in the API's ``/metrics`` when it runs in
the same process (``pneumo up``), and on their own port for ``pneumo listen``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pydicom.uid
import pytest

from dicom_io.listener import Listener
from pneumo.metrics import register_listener, serve_listener_metrics, unregister_listener
from tests.conftest import free_port
from tests.dicom_receive.dicom_receive_helpers import make_instance, scu_store
from tests.observability.conftest import SeededDb, parse, value


def _expect_listener_counts(text: str) -> None:
    m = parse(text)
    assert value(m, "pneumo_instances_received_total", outcome="stored") == 2
    assert value(m, "pneumo_instances_received_total", outcome="duplicate") == 1
    assert value(m, "pneumo_instances_received_total", outcome="replaced") == 0
    assert value(m, "pneumo_instances_refused_total", reason="invalid-data-set") == 1
    assert value(m, "pneumo_instances_refused_total", reason="out-of-resources") == 0
    assert value(m, "pneumo_listener_process_restarts_total") == 0


@pytest.mark.postgres
def test_listener_in_the_api_process_is_in_its_scrape(
    listener: Listener, seeded_db: SeededDb, api_for: Callable[..., str]
) -> None:
    from tests.conftest import free_port as port

    register_listener(listener)  # what `pneumo up` does
    try:
        base = api_for(
            database_url=seeded_db.url,
            broker_url=f"redis://127.0.0.1:{port()}/0",  # down: the listener's counters still come
            data_dir=seeded_db.data_dir,
        )
        text = httpx.get(f"{base}/metrics", timeout=30).text
    finally:
        unregister_listener(listener)
    _expect_listener_counts(text)
    assert value(parse(text), "pneumo_studies", status="done") == 3


def test_standalone_listener_serves_its_counters(listener: Listener) -> None:
    port = free_port()
    server = serve_listener_metrics(listener, "127.0.0.1", port)
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        server.shutdown()
    _expect_listener_counts(text)
    assert "pneumo_studies" not in text  # the listener alone knows no database


@pytest.mark.slow
def test_pneumo_listen_serves_its_counters_on_the_metrics_port(procs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.e2e.conftest import pneumo, port_open, wait_until

    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMO_")}
    env.update(
        PNEUMO_DATA_DIR=str(tmp_path / "data"), PNEUMO_PORT=str(port),
        PNEUMO_METRICS_PORT=str(metrics_port), PNEUMO_STUDY_QUIET_SECONDS="60",
    )  # fmt: skip
    procs.start("listen", pneumo("listen"), env)
    wait_until(lambda: port_open(port) and port_open(metrics_port), 60, "listener and metrics")
    assert scu_store(port, [make_instance(pydicom.uid.generate_uid())]) == [0]
    m = parse(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text)
    assert value(m, "pneumo_instances_received_total", outcome="stored") == 1
    assert value(m, "pneumo_instances_refused_total", reason="invalid-data-set") == 0
