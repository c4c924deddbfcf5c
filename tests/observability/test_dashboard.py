"""The example Grafana dashboard queries only metrics a real scrape exposes."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import httpx
import pytest

from dicom_io.listener import Listener
from pneumo.metrics import register_listener, unregister_listener
from tests.observability.conftest import SeededDb, parse
from tests.paths import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "pneumo-dashboard.json"
_METRIC = re.compile(r"\bpneumo_[a-z0-9_]+")


def _queried_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs, "the dashboard queries nothing"
    return {name for expr in exprs for name in _METRIC.findall(expr)}


def test_dashboard_is_grafana_json_over_a_prometheus_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    assert [v["type"] for v in dashboard["templating"]["list"]] == ["datasource"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])


@pytest.mark.postgres
@pytest.mark.redis
def test_every_metric_the_dashboard_queries_is_in_a_real_scrape(
    listener: Listener,
    seeded_db: SeededDb,
    broker_url: str,
    api_for: Callable[..., str],
) -> None:
    register_listener(listener)  # as in `pneumo up`: listener and API in one process
    try:
        base = api_for(
            database_url=seeded_db.url, broker_url=broker_url, data_dir=seeded_db.data_dir
        )
        scraped = {name for name, _labels in parse(httpx.get(f"{base}/metrics", timeout=30).text)}
    finally:
        unregister_listener(listener)
    missing = _queried_metrics() - scraped
    assert not missing, f"the dashboard queries metrics no scrape has: {sorted(missing)}"
