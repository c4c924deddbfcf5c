"""``pneumo ping listener|worker|api``: the health checks the compose file runs.

Against real services on loopback: a real listener (C-ECHO), a real
``pneumo worker`` on the embedded broker (Celery ping), the real staff API
under uvicorn, and a plain HTTP server for the unhealthy answers.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicom_io.config import ListenerConfig, TLSConfig
from dicom_io.listener import Listener
from pneumo.commands import health
from pneumo.exit_codes import ExitCode
from tests.conftest import free_port, serve_app
from tests.worker.conftest import base_env, wait_until
from worker import embedded_broker

Run = Callable[..., int]
StartListener = Callable[..., Listener]
Serve = Callable[[int, bytes], str]


@pytest.fixture
def ping(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Run:
    """Run ``pneumo ping ...`` in-process with only the given PNEUMO_* settings."""
    for name in list(os.environ):
        if name.startswith("PNEUMO_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PNEUMO_DATA_DIR", str(tmp_path / "data"))
    parser = argparse.ArgumentParser(prog="pneumo")
    health.register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str, **settings: str) -> int:
        for name, value in settings.items():
            monkeypatch.setenv(f"PNEUMO_{name.upper()}", value)
        args = parser.parse_args(["ping", *argv])
        return int(args.func(args))

    return run


# --- listener ------------------------------------------------------------------------------


@pytest.fixture
def start_listener(tmp_path: Path) -> Iterator[StartListener]:
    started: list[Listener] = []

    def start(**config: object) -> Listener:
        listener = Listener(
            ListenerConfig(
                spool_dir=tmp_path / "spool", host="127.0.0.1", port=0,
                spool_reserve_bytes=0, **config,  # type: ignore[arg-type]
            ),
            on_study_ready=lambda study: None,
        )  # fmt: skip
        listener.start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop()


def test_listener_answers_a_c_echo(
    ping: Run, start_listener: StartListener, capsys: pytest.CaptureFixture[str]
) -> None:
    listener = start_listener()
    assert ping("listener", "--port", str(listener.port)) == ExitCode.OK
    assert f"PNEUMO@127.0.0.1:{listener.port}: C-ECHO success" in capsys.readouterr().out


def test_listener_settings_give_the_address_and_ae_titles(
    ping: Run, start_listener: StartListener
) -> None:
    # As in the compose file: bound to 0.0.0.0 with an allow-list; the ping calls
    # 127.0.0.1 as the first allowed AE title.
    listener = start_listener(ae_title="OURS", allowed_aets=frozenset({"PACS", "OTHER"}))
    settings = dict(
        host="0.0.0.0", port=str(listener.port), ae_title="OURS", allowed_aets="PACS,OTHER"
    )
    assert ping("listener", **settings) == ExitCode.OK


def test_listener_rejecting_the_calling_ae_is_unavailable(
    ping: Run, start_listener: StartListener, capsys: pytest.CaptureFixture[str]
) -> None:
    listener = start_listener(allowed_aets=frozenset({"PACS"}))
    code = ping("listener", "--port", str(listener.port), "--calling-ae", "STRANGER")
    assert code == ExitCode.UNAVAILABLE
    assert "association rejected" in capsys.readouterr().err


@pytest.fixture
def self_signed(tmp_path: Path) -> TLSConfig:
    """One self-signed certificate as CA, server and client certificate (mutual TLS)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "node.pem", tmp_path / "node.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=pneumo", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return TLSConfig(cert, key, cert, require_client_cert=True)


def test_listener_over_mutual_tls_answers_a_tls_ping(
    ping: Run, start_listener: StartListener, self_signed: TLSConfig
) -> None:
    listener = start_listener(tls=self_signed)
    port = str(listener.port)
    # Without the TLS settings the handshake never happens: not reachable.
    assert ping("listener", "--port", port, "--timeout", "3") == ExitCode.UNAVAILABLE
    tls = dict(
        tls_cert=str(self_signed.cert_file),
        tls_key=str(self_signed.key_file),
        tls_ca=str(self_signed.ca_file),
    )
    assert ping("listener", "--port", port, **tls) == ExitCode.OK


def test_nothing_listening_is_unavailable(ping: Run, capsys: pytest.CaptureFixture[str]) -> None:
    assert ping("listener", "--port", str(free_port()), "--timeout", "2") == ExitCode.UNAVAILABLE
    assert "no association" in capsys.readouterr().err


def test_an_invalid_ae_title_is_a_usage_error(ping: Run) -> None:
    assert ping("listener", "--ae", "A" * 17) == ExitCode.USAGE


def test_invalid_settings_are_a_usage_error(ping: Run) -> None:
    assert ping("listener", port="not-a-port") == ExitCode.USAGE


# --- worker --------------------------------------------------------------------------------


@pytest.fixture
def running_worker(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real ``pneumo worker`` on the embedded broker: (data dir, its Celery node name)."""
    data_dir = tmp_path / "data"
    embedded_broker.start(data_dir)
    node = f"pingtest-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    log = open(tmp_path / "worker.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "pneumo.cli", "worker", "--concurrency", "1", "--hostname", node],
        env=base_env(data_dir), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield data_dir, node
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        embedded_broker.stop(data_dir)


@pytest.mark.slow
def test_a_running_worker_answers(
    ping: Run, running_worker: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir, node = running_worker
    wait_until(
        lambda: ping("worker", "--node", node, "--timeout", "2", data_dir=str(data_dir)) == 0,
        120,
        "the worker to answer a ping",
    )
    assert ping("worker", "--local", "--timeout", "3") == ExitCode.OK
    assert ping("worker", "--timeout", "3") == ExitCode.OK
    assert f"pong from {node}" in capsys.readouterr().out
    assert ping("worker", "--node", "nobody@nowhere", "--timeout", "1") == ExitCode.UNAVAILABLE


def test_no_worker_on_a_running_broker_is_unavailable(
    ping: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    embedded_broker.start(data_dir)
    try:
        assert ping("worker", "--timeout", "1") == ExitCode.UNAVAILABLE
    finally:
        embedded_broker.stop(data_dir)
    assert "no answer from a worker at all" in capsys.readouterr().err


def test_no_embedded_broker_is_unavailable_and_none_is_started(ping: Run, tmp_path: Path) -> None:
    assert ping("worker") == ExitCode.UNAVAILABLE
    assert embedded_broker.running_pid(tmp_path / "data") is None


def test_an_unreachable_broker_is_unavailable(ping: Run) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert ping("worker", "--timeout", "1", broker_url=url) == ExitCode.UNAVAILABLE


def test_local_counts_only_workers_on_this_host() -> None:
    here = socket.gethostname()
    replies = [{f"a@{here}": {"ok": "pong"}}, {"b@elsewhere": {"ok": "pong"}}]
    assert health._answering_nodes(replies, None, local=True) == [f"a@{here}"]
    assert health._answering_nodes(replies, "b@elsewhere", local=False) == ["b@elsewhere"]
    assert health._answering_nodes(replies, None, local=False) == ["a@" + here, "b@elsewhere"]


# --- api -----------------------------------------------------------------------------------------


@pytest.fixture
def http_server() -> Iterator[Serve]:
    """A one-route HTTP server on loopback answering a fixed status and body; returns its URL."""
    servers: list[http.server.HTTPServer] = []

    def serve(status: int, body: bytes) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's method name
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/api/health"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_the_real_api_is_healthy(
    ping: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pneumo.api.app import create_app
    from pneumo.settings import Settings

    server = serve_app(create_app(Settings(data_dir=tmp_path / "data")))
    base = next(server)
    try:
        assert ping("api", "--url", f"{base}/api/health") == ExitCode.OK
    finally:
        next(server, None)
    assert '"database": "ok"' in capsys.readouterr().out


def test_an_unhealthy_api_fails(
    ping: Run, http_server: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {"status": "degraded", "checks": {"database": "error: OperationalError"}}
    url = http_server(503, json.dumps(body).encode())
    assert ping("api", "--url", url) == ExitCode.FAILED
    assert "HTTP 503" in capsys.readouterr().err


def test_a_healthy_answer_is_ok_whatever_its_body(ping: Run, http_server: Serve) -> None:
    assert ping("api", "--url", http_server(200, b"not json")) == ExitCode.OK


def test_no_api_is_unavailable(ping: Run) -> None:
    url = f"http://127.0.0.1:{free_port()}/api/health"
    assert ping("api", "--url", url, "--timeout", "2") == ExitCode.UNAVAILABLE


def test_a_bad_url_is_a_usage_error(ping: Run) -> None:
    assert ping("api", "--url", "not a url") == ExitCode.USAGE
    assert ping("api", "--url", "file:///etc/hostname") == ExitCode.USAGE
