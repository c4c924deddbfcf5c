"""The embedded broker is a private ``redis-server`` on a Unix socket under the data dir.

It starts (pid file, owner-only socket), is found again instead of started
twice, keeps queued and unacknowledged messages across a restart of the server
and of the consumer (append-only file), and is stopped by its pid.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from kombu import Connection, Exchange, Queue

from pneumo.settings import Settings
from worker import embedded_broker

EXCHANGE = Exchange("t", type="direct")
QUEUE = Queue("work", EXCHANGE, routing_key="work")


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "data"
    yield path
    embedded_broker.stop(path)  # never a stray server after the test


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for an init that reaps late."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _publish(url: str, payload: dict[str, int]) -> None:
    with Connection(url) as conn:
        conn.Producer().publish(payload, exchange=EXCHANGE, routing_key="work", declare=[QUEUE])


def test_start_writes_pid_file_and_owner_only_socket(data_dir: Path) -> None:
    pid = embedded_broker.start(data_dir)
    assert embedded_broker.pid_path(data_dir).read_text().strip() == str(pid)
    assert embedded_broker.running_pid(data_dir) == pid
    mode = embedded_broker.socket_path(data_dir).stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o700
    assert embedded_broker.ensure_running(data_dir) == (pid, False)  # found, not started again
    with pytest.raises(embedded_broker.EmbeddedBrokerError):
        embedded_broker.start(data_dir)


def test_settings_point_at_it_when_no_broker_is_set(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir)
    assert settings.effective_broker_url == embedded_broker.broker_url(data_dir)
    assert Settings(data_dir=data_dir, broker_url="redis://h:1/0").uses_embedded_broker is False


def test_messages_survive_a_restart_of_server_and_consumer(data_dir: Path) -> None:
    url = embedded_broker.broker_url(data_dir)
    first, _ = embedded_broker.ensure_running(data_dir)
    _publish(url, {"n": 1})

    # A worker takes the message and dies without acking (os._exit).
    script = textwrap.dedent(f"""
        import os
        from kombu import Connection, Exchange, Queue
        conn = Connection({url!r})
        message = Queue("work", Exchange("t", type="direct"), routing_key="work")(conn.default_channel).get()
        assert message is not None and message.payload == {{"n": 1}}
        os._exit(0)
    """)  # fmt: skip
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    _publish(url, {"n": 2})

    assert embedded_broker.stop(data_dir)
    assert embedded_broker.running_pid(data_dir) is None
    assert not embedded_broker.socket_path(data_dir).exists()
    second, started = embedded_broker.ensure_running(data_dir)
    assert started and second != first

    # Both come back: the queued one at once, the unacked one restored by
    # Celery's Redis transport (visibility timeout 0 here, so right away).
    got = []
    with Connection(url, transport_options={"visibility_timeout": 0}) as conn:
        conn.default_channel.qos.restore_visible()
        bound = QUEUE(conn.default_channel)
        while (message := bound.get()) is not None:
            got.append(message.payload["n"])
            message.ack()
    assert sorted(got) == [1, 2]


def test_stop_by_pid_leaves_no_server(data_dir: Path) -> None:
    pid = embedded_broker.start(data_dir)
    assert embedded_broker.stop(data_dir)
    assert not _alive(pid)
    assert not embedded_broker.stop(data_dir)  # nothing left to stop


@pytest.mark.parametrize("stale", [999_999_999, os.getpid()], ids=["dead", "not-redis"])
def test_stale_pid_file_is_ignored(data_dir: Path, stale: int) -> None:
    data_dir.mkdir(parents=True)
    embedded_broker.pid_path(data_dir).write_text(f"{stale}\n")
    assert embedded_broker.running_pid(data_dir) is None
    pid, started = embedded_broker.ensure_running(data_dir)
    assert started and pid != stale


def test_running_stops_only_what_it_started(data_dir: Path) -> None:
    with embedded_broker.running(data_dir) as pid:
        assert embedded_broker.running_pid(data_dir) == pid
    assert embedded_broker.running_pid(data_dir) is None
    outer = embedded_broker.start(data_dir)
    with embedded_broker.running(data_dir) as pid:
        assert pid == outer
    assert embedded_broker.running_pid(data_dir) == outer
