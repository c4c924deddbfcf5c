"""A real worker consuming ``realtime,batch`` takes realtime work before batch work.

Batch work is queued first, then realtime work, while no worker runs; a worker
with concurrency 1 is then started and the order it ran the tasks is read back.
Runs on the embedded broker and on Redis, with our app configuration.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from pneumo.celery_app import build_app
from pneumo.settings import Settings
from worker.queues import QueueName

TASK_MODULE = textwrap.dedent(
    """
    import os
    from pneumo.celery_app import app  # what `celery -A pneumo.celery_app` loads

    @app.task(name="ordertest.mark")
    def mark(label):
        with open(os.environ["ORDER_LOG"], "a") as handle:
            handle.write(label + "\\n")
    """
)


def _settings_from(env: dict[str, str]) -> Settings:
    return Settings(
        data_dir=Path(env["PNEUMO_DATA_DIR"]),
        broker_url=env.get("PNEUMO_BROKER_URL"),
        database_url=env.get("PNEUMO_DATABASE_URL"),
    )


def test_realtime_before_batch(broker_env, spawn, waiter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "ordertasks.py").write_text(TASK_MODULE)
    order_log = tmp_path / "order.log"
    env = dict(broker_env, ORDER_LOG=str(order_log))
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    Path(env["PNEUMO_DATA_DIR"]).mkdir(parents=True, exist_ok=True)

    app = build_app(_settings_from(env))
    for i in range(3):
        app.send_task("ordertest.mark", args=[f"batch-{i}"], queue=QueueName.BATCH.value)
    for i in range(3):
        app.send_task("ordertest.mark", args=[f"realtime-{i}"], queue=QueueName.REALTIME.value)

    spawn(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "ordertasks",
            "worker",
            "-Q",
            "realtime,batch",
            "-c",
            "1",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "WARNING",
        ],
        env,
    )
    waiter(lambda: order_log.exists() and len(order_log.read_text().split()) >= 6, 60, "6 tasks")
    ran = order_log.read_text().split()
    assert ran[:3] == ["realtime-0", "realtime-1", "realtime-2"], ran
    assert sorted(ran[3:]) == ["batch-0", "batch-1", "batch-2"]
