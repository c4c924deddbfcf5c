"""The Celery configuration carries the issue's no-loss settings, derived from settings."""

from __future__ import annotations

from pathlib import Path

from pneumo.settings import load_settings
from worker.app import PROCESS_STUDY, QUEUES, celery_config, create_app


def test_no_loss_settings(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, task_time_limit_seconds=123)
    conf = celery_config(settings)
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_time_limit"] == 123
    assert conf["task_soft_time_limit"] < 123
    assert conf["broker_transport_options"]["visibility_timeout"] > 123
    assert conf["broker_transport_options"]["queue_order_strategy"] == "priority"
    assert QUEUES[0] == "realtime" and "batch" in QUEUES


def test_embedded_broker_is_server_less_and_under_data_dir(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    conf = celery_config(settings)
    assert conf["broker_url"].startswith("pneumo_sqla+sqlite:///")
    assert str(tmp_path.resolve()) in conf["broker_url"]


def test_production_broker_is_used_verbatim(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/3")
    assert celery_config(settings)["broker_url"] == "redis://127.0.0.1:6379/3"


def test_app_has_pipeline_tasks(tmp_path: Path) -> None:
    app = create_app(load_settings(data_dir=tmp_path))
    assert PROCESS_STUDY in app.tasks
    assert app.conf.task_default_queue == "realtime"
