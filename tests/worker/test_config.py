"""The Celery app factory: WorkerConfig in, a configured app out; no environment read.

The configuration carries the no-loss settings, derived from the config, and
the app keeps the config for its tasks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from model.precision import Precision
from pneumo.settings import load_settings
from worker.app import PROCESS_STUDY, celery_config, create_app, worker_config_of
from worker.config import WorkerConfig
from worker.queues import QUEUE_PRIORITY, QueueName


def _config(tmp_path: Path, **overrides: object) -> WorkerConfig:
    values: dict[str, object] = {
        "database_url": f"sqlite:///{tmp_path / 'pneumo.db'}",
        "broker_url": "redis://127.0.0.1:6379/3",
        "data_dir": tmp_path,
        "results_dir": tmp_path / "results",
    }
    values.update(overrides)
    return WorkerConfig(**values)  # type: ignore[arg-type]


def test_no_loss_settings(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, task_time_limit_seconds=123)
    conf = celery_config(settings.worker_config())
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_time_limit"] == 123
    assert conf["task_soft_time_limit"] < 123
    assert conf["broker_transport_options"]["visibility_timeout"] > 123
    assert conf["broker_transport_options"]["queue_order_strategy"] == "priority"
    assert QUEUE_PRIORITY[0] == "realtime" and "batch" in QUEUE_PRIORITY


def test_inference_precision_from_the_environment_to_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    assert load_settings(data_dir=tmp_path).worker_config().inference_precision is Precision.AUTO
    monkeypatch.setenv("PNEUMO_INFERENCE_PRECISION", "BFloat16")
    settings = load_settings(data_dir=tmp_path)
    assert settings.worker_config().inference_precision is Precision.BFLOAT16
    monkeypatch.setenv("PNEUMO_INFERENCE_PRECISION", "int8")
    with pytest.raises(ValidationError, match="auto, float32, float16, bfloat16"):
        load_settings(data_dir=tmp_path)
    # a WorkerConfig built directly is checked the same way
    assert _config(tmp_path, inference_precision=" float32").inference_precision is (
        Precision.FLOAT32
    )
    with pytest.raises(ValueError, match="precision must be one of"):
        _config(tmp_path, inference_precision="half")


def test_embedded_broker_is_a_redis_socket_under_data_dir(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    conf = celery_config(settings.worker_config())
    assert conf["broker_url"] == f"redis+socket://{tmp_path.resolve() / 'redis.sock'}"


def test_production_broker_is_used_verbatim(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/3")
    assert celery_config(settings.worker_config())["broker_url"] == "redis://127.0.0.1:6379/3"


def test_app_has_pipeline_tasks(tmp_path: Path) -> None:
    app = create_app(load_settings(data_dir=tmp_path).worker_config())
    assert PROCESS_STUDY in app.tasks
    assert app.conf.task_default_queue == "realtime"


def test_factory_takes_everything_from_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The environment says otherwise: the factory must not look. (Celery itself
    # still honours its own CELERY_BROKER_URL; nothing of ours sets it.)
    monkeypatch.setenv("PNEUMO_BROKER_URL", "redis://elsewhere:1/0")
    monkeypatch.setenv("PNEUMO_TASK_TIME_LIMIT_SECONDS", "999")
    monkeypatch.setenv("PNEUMO_CONFIG", "/nonexistent.toml")
    config = _config(tmp_path, task_time_limit_seconds=77)
    app = create_app(config)
    assert app.conf.broker_url == "redis://127.0.0.1:6379/3"
    assert app.conf.task_time_limit == 77
    assert worker_config_of(app) is config
    assert [q.name for q in app.conf.task_queues] == [q.value for q in QUEUE_PRIORITY]


def test_each_app_keeps_its_own_config(tmp_path: Path) -> None:
    first = create_app(_config(tmp_path, batch_size=1))
    second = create_app(_config(tmp_path, batch_size=2))
    assert worker_config_of(first).batch_size == 1
    assert worker_config_of(second).batch_size == 2


def test_factory_refuses_anything_but_a_worker_config(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="WorkerConfig"):
        create_app(load_settings(data_dir=tmp_path))  # type: ignore[arg-type]


def test_queue_names_have_one_spelling() -> None:
    assert [str(q) for q in QUEUE_PRIORITY] == ["realtime", "batch"]
    assert QueueName("batch") is QueueName.BATCH


def test_importing_the_factory_builds_no_app() -> None:
    import worker.app

    assert not hasattr(worker.app, "app")


def test_an_app_not_built_by_the_factory_has_no_config() -> None:
    from celery import Celery

    with pytest.raises(LookupError):
        worker_config_of(Celery("other", set_as_current=False))


def test_celery_app_module_builds_the_app_from_settings_on_first_access(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``celery -A pneumo.celery_app`` reads ``app``: built then, from the environment."""
    import importlib

    import pneumo.celery_app

    monkeypatch.setenv("PNEUMO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PNEUMO_BROKER_URL", "redis://127.0.0.1:6379/3")  # nothing to start
    module = importlib.reload(pneumo.celery_app)
    assert "app" not in vars(module)
    app = module.app
    assert worker_config_of(app).broker_url == "redis://127.0.0.1:6379/3"
    assert worker_config_of(app).data_dir == tmp_path
    assert module.app is app
    # `celery -A pneumo.celery_app worker` without -P/-c runs the configured pool
    assert (app.conf.worker_pool, app.conf.worker_concurrency) == ("prefork", 1)
    monkeypatch.setenv("PNEUMO_WORKER_POOL", "threads")
    monkeypatch.setenv("PNEUMO_WORKER_THREADS", "3")
    threads = importlib.reload(pneumo.celery_app).app
    assert (threads.conf.worker_pool, threads.conf.worker_concurrency) == ("threads", 3)
