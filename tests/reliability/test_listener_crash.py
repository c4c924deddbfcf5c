"""The listener SIGKILLed (issue 8, fault suite item 4): mid-association, and at an
injected point between the spool write and the journal update. After a restart and the
sender's retry, every instance is in the spool exactly once and the study is dispatched
with all of them; no temporary file is left behind.

The listener runs as a real subprocess (``python -m dicom_io listen``); the sender is
DCMTK ``storescu``. The injected crash is a wrapper in this file that patches
``StudyAssembler.instance_stored`` in the child only: nothing in the product reads a
crash switch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import need_dcmtk
from tests.dicom_receive.dicom_receive_helpers import free_port, make_instance, write_instance
from tests.paths import REPO

pytestmark = [pytest.mark.dcmtk]

# Runs the bare listener, but SIGKILLs itself on the N-th instance the spool has
# durably written, before the journal records it (and before any Success is sent).
_CRASH_BEFORE_JOURNAL = """
import os, signal, sys
from dicom_io import assembly
real = assembly.StudyAssembler.instance_stored
calls = 0
def crash_before_journal(self, result, association_id=None):
    global calls
    calls += 1
    if calls == int(os.environ["CRASH_ON_INSTANCE"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, result, association_id)
assembly.StudyAssembler.instance_stored = crash_before_journal
from dicom_io.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


class BareListener:
    """``python -m dicom_io listen`` on a fixed port and spool; events read from its stdout."""

    def __init__(self, root: Path, spool: Path, port: int) -> None:
        self.root, self.spool, self.port = root, spool, port
        self.runs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, crash_on_instance: int | None = None) -> subprocess.Popen[bytes]:
        args = ["listen", "--spool", str(self.spool), "--port", str(self.port)]
        args += ["--quiet", "1", "--grace", "0.3", "--reserve-mb", "0"]
        env = dict(os.environ, TCP_NODELAY="1", PYTHONPATH=str(REPO))
        if crash_on_instance is None:
            command = [sys.executable, "-m", "dicom_io", *args]
        else:
            command = [sys.executable, "-c", _CRASH_BEFORE_JOURNAL, *args]
            env["CRASH_ON_INSTANCE"] = str(crash_on_instance)
        out = self.root / f"listener-{len(self.runs)}.jsonl"
        with out.open("wb") as stdout, (self.root / "listener.log").open("ab") as stderr:
            process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr)
        self.runs.append((process, out))
        self.wait_for(lambda e: e["event"] == "listening", 30)
        return process

    def events(self) -> list[dict[str, object]]:
        _, out = self.runs[-1]
        return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]

    def wait_for(self, match, timeout: float) -> dict[str, object]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events() if match(e)]
            if found:
                return found[-1]
            if self.runs[-1][0].poll() is not None and not found:
                time.sleep(0.2)  # it may have died on purpose; let the caller decide
            time.sleep(0.1)
        log = (self.root / "listener.log").read_text(errors="replace")[-3000:]
        raise AssertionError(
            f"no matching listener event within {timeout}s: {self.events()}\n{log}"
        )

    def stop(self) -> None:
        for process, _ in self.runs:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _storescu(port: int, files: list[Path]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["/usr/bin/storescu", "-aec", "PNEUMO", "-R", "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, TCP_NODELAY="1"),
    )


def _spooled(spool: Path) -> list[Path]:
    return sorted(p for p in spool.rglob("*.dcm") if ".incoming" not in p.parts)


def _assert_exactly_once(spool: Path, sources: list[Path]) -> None:
    files = _spooled(spool)
    assert sorted(p.stem for p in files) == sorted(
        pydicom.dcmread(s).SOPInstanceUID for s in sources
    )
    by_uid = {p.stem: p for p in files}
    for source in sources:
        sent = pydicom.dcmread(source)
        kept = pydicom.dcmread(by_uid[str(sent.SOPInstanceUID)])
        assert kept.PixelData == sent.PixelData  # complete, as sent
    assert list((spool / ".incoming").iterdir()) == []  # no torn write left behind


@pytest.fixture
def listener(tmp_path: Path):  # type: ignore[no-untyped-def]
    need_dcmtk("storescu")
    bare = BareListener(tmp_path, tmp_path / "spool", free_port())
    yield bare
    bare.stop()


def test_sigkill_mid_association_then_retry_stores_each_instance_once(
    listener: BareListener, tmp_path: Path
) -> None:
    study = generate_uid()
    sources = [
        write_instance(make_instance(study, rows=512, cols=512, seed=i), tmp_path / "send")
        for i in range(30)
    ]
    first = listener.start()
    sender = _storescu(listener.port, sources)
    deadline = time.monotonic() + 60
    while len(_spooled(listener.spool)) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    sender.wait(60)
    assert 5 <= len(_spooled(listener.spool)) < len(sources), "the kill was not mid-association"
    assert sender.returncode != 0  # the sender saw the failure and will retry

    listener.start()
    retry = _storescu(listener.port, sources)
    assert retry.wait(120) == 0, retry.stdout.read() if retry.stdout else ""
    ready = listener.wait_for(
        lambda e: e["event"] == "study-ready" and e["instances"] == len(sources), 60
    )
    assert ready["study_uid"] == study
    _assert_exactly_once(listener.spool, sources)


def test_crash_between_spool_write_and_journal_update_is_recovered(
    listener: BareListener, tmp_path: Path
) -> None:
    study = generate_uid()
    sources = [write_instance(make_instance(study, seed=i), tmp_path / "send") for i in range(4)]
    # The study is complete and dispatched; then a late instance arrives, is
    # spooled, and the listener dies before its journal says so.
    listener.start(crash_on_instance=4)
    assert _storescu(listener.port, sources[:3]).wait(60) == 0
    listener.wait_for(lambda e: e["event"] == "study-ready" and e["instances"] == 3, 30)
    late = _storescu(listener.port, sources[3:])
    assert listener.runs[-1][0].wait(30) == -signal.SIGKILL
    assert late.wait(60) != 0  # no Success: the sender still holds it
    assert len(_spooled(listener.spool)) == 4  # durable, but unknown to the journal

    listener.start()  # recovery: a file on disk outside the dispatched set
    ready = listener.wait_for(lambda e: e["event"] == "study-ready" and e["instances"] == 4, 30)
    assert (ready["amended"], ready["trigger"]) == (True, "recovered")
    assert _storescu(listener.port, sources[3:]).wait(60) == 0  # the retry: a duplicate
    time.sleep(2)  # past the quiet window: an identical duplicate dispatches nothing new
    assert [e["instances"] for e in listener.events() if e["event"] == "study-ready"] == [4]
    _assert_exactly_once(listener.spool, sources)
