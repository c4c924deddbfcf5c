"""End-to-end demo on the embedded default.

Starts a stand-in PACS (a pynetdicom Storage SCP that keeps what it receives),
starts ``pneumo up`` (migrations, listener, a real Celery worker process) on a
fresh data directory, sends the sample studies over DICOM with ``pneumo send``,
waits for every study to finish, prints the results table and where the SR
files are, then stops everything cleanly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from worker import embedded_broker

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "studies"
DATA_DIR = REPO / "var" / "demo"
PNEUMO = [sys.executable, "-m", "pneumo.cli"]
TIMEOUT_SECONDS = 600
FINISHED = {"done", "dead-letter"}  # "failed" means a retry is still to come


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_pacs_stand_in(folder: Path, port: int):
    """A Storage SCP standing in for the hospital PACS: it keeps every object it receives."""
    folder.mkdir(parents=True, exist_ok=True)

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    ae = AE(ae_title="DEMOPACS")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    return ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )


def wait_for_listener(port: int, deadline: float) -> None:
    ae = AE(ae_title="DEMOSCU")
    ae.add_requested_context(Verification)
    while time.monotonic() < deadline:
        assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMO")
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            if status and status.Status == 0:
                return
        time.sleep(0.5)
    raise SystemExit("the pneumo listener did not answer C-ECHO in time")


def results(env: dict[str, str]) -> list[dict]:
    out = subprocess.run(
        [*PNEUMO, "results", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout or "[]")


def main() -> int:
    embedded_broker.stop(DATA_DIR)  # a broker left by an interrupted earlier run
    shutil.rmtree(DATA_DIR, ignore_errors=True)
    DATA_DIR.mkdir(parents=True)
    port, pacs_port = free_port(), free_port()
    pacs_dir = DATA_DIR / "pacs"
    pacs = start_pacs_stand_in(pacs_dir, pacs_port)

    env = dict(os.environ)
    env.update(
        PNEUMO_DATA_DIR=str(DATA_DIR),
        PNEUMO_PORT=str(port),
        PNEUMO_DESTINATIONS=f"DEMOPACS@127.0.0.1:{pacs_port}",
        PNEUMO_STUDY_QUIET_SECONDS="2",
    )
    env.pop("PNEUMO_DATABASE_URL", None)
    env.pop("PNEUMO_BROKER_URL", None)
    print(
        f"== starting pneumo (embedded: SQLite + a private redis-server broker under {DATA_DIR.relative_to(REPO)})"
    )
    log_path = DATA_DIR / "pneumo.log"
    log = log_path.open("w")
    print(f"   its log: {log_path.relative_to(REPO)}")
    up = subprocess.Popen([*PNEUMO, "up"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT_SECONDS
        wait_for_listener(port, deadline)
        study_count = len({p.name.split("_")[0] for p in SAMPLES.glob("*.dcm")})
        print(f"== sending {study_count} sample studies to PNEUMO@127.0.0.1:{port}")
        subprocess.run(
            [
                *PNEUMO,
                "send",
                str(SAMPLES),
                "--to",
                f"PNEUMO@127.0.0.1:{port}",
                "--calling-ae",
                "DEMOPACS",
            ],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        print("== waiting for results")
        while True:
            rows = results(env)
            finished = [r for r in rows if r.get("study_status") in FINISHED]
            if len(finished) >= study_count:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out: {len(finished)}/{study_count} studies finished")
            time.sleep(1)
        # Let the delivery tasks reach the stand-in PACS.
        expected = sum(1 for r in rows if r.get("study_status") == "done")
        while len(list(pacs_dir.glob("*.dcm"))) < expected and time.monotonic() < deadline:
            time.sleep(0.5)
        print("== results")
        subprocess.run([*PNEUMO, "results"], env=env, check=True)
        print("== status")
        subprocess.run([*PNEUMO, "status"], env=env, check=True)
        print("== result objects written by pneumo (SR + heatmap Secondary Capture):")
        for path in sorted((DATA_DIR / "results").rglob("*.dcm")):
            print(f"   {path.relative_to(REPO)}")
        print(
            f"== objects received by the stand-in PACS: {len(list(pacs_dir.glob('*.dcm')))} in {pacs_dir.relative_to(REPO)}"
        )
        print("   inspect an SR with: dsrdump <file>  (DCMTK)")
        return 0
    finally:
        print("== stopping pneumo")
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
            embedded_broker.stop(DATA_DIR)  # `pneumo up` stops it, unless it was killed
        log.close()
        pacs.shutdown()


if __name__ == "__main__":
    sys.exit(main())
