"""End-to-end benchmark of the pipeline with real processes.

Starts `pneumo listen` and `pneumo worker` as subprocesses, a pynetdicom
C-STORE SCP in this process as the PACS that records when each SR arrives, and
sends synthetic single-image DX studies (pixels from a real Kermany chest
X-ray, resized) with pynetdicom.

(a) latency: studies sent one at a time; from the C-STORE response of the
    study's last instance to the SR being acknowledged by the PACS stand-in,
    split into quiet-window wait (response → study queued, stamped by the
    listener in the database) and processing (queued → SR acknowledged).
(b) throughput: N studies back to back (one association each), with 1 and 2
    worker processes: N / (first send → last SR acknowledged), and the CPU
    time per study of each process group (listener, worker processes, this
    process as sender and PACS, PostgreSQL + Redis), from which the rate the
    cores could sustain if they were never idle follows; and that rate for
    the product's processes alone (a deployment runs the modality and the
    PACS on other hosts).
(c) the same on the embedded default (SQLite + the private redis-server broker).

    .venv/bin/python bench/e2e.py                    # the issue's sizes
    .venv/bin/python bench/e2e.py --latency-studies 10 --throughput-studies 50
    .venv/bin/python bench/e2e.py --precision bfloat16   # PNEUMO_INFERENCE_PRECISION

Needs ../shared/data (one Kermany image); production rows need Redis and
PostgreSQL at 127.0.0.1 (a throwaway database is created and dropped).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS = "redis://127.0.0.1:6379/13"
BENCH_ROLE = "bench (sender + PACS)"
"""This process's CPU: the modality and the PACS, which a deployment runs on other hosts."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def template_pixels(size: int) -> np.ndarray:
    jpeg = sorted((SHARED / "kermany" / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    img = Image.open(jpeg).convert("L").resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint16) << 4  # 12-bit stored in 16


def make_study(pixels: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PatientName, ds.PatientID, ds.PatientAge = "Bench^Child", "BENCH", "006Y"
    ds.AccessionNumber, ds.StudyDate, ds.StudyTime, ds.StudyID = "B1", "20240101", "120000", "1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    return ds


def instance_record(ds: Dataset, path: Path, calling_aet: str) -> Any:
    """The ``db.repository.InstanceRecord`` of an instance file a benchmark spooled itself."""
    from db import repository as repo

    return repo.InstanceRecord(
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        path=str(path),
        size=path.stat().st_size,
        calling_aet=calling_aet,
        received_at=datetime.now(UTC),
    )


class Pacs:
    """In-process C-STORE SCP recording when each study's SR was acknowledged."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.port = free_port()
        self.sr_at: dict[str, float] = {}
        self.arrived = threading.Condition()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        from pynetdicom.sop_class import Comprehensive3DSRStorage  # type: ignore[attr-defined]

        ae.add_supported_context(Comprehensive3DSRStorage)

        def on_store(event):  # type: ignore[no-untyped-def]
            ds = event.dataset
            if str(ds.SOPClassUID) == COMPREHENSIVE_3D_SR:
                with self.arrived:
                    # The response goes out right after we return: "acknowledged".
                    self.sr_at[str(ds.StudyInstanceUID)] = time.time()
                    self.arrived.notify_all()
            return 0x0000

        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )

    def wait_for(self, uids: set[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while not uids <= set(self.sr_at):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.arrived.wait(left)
        return True

    def stop(self) -> None:
        self.server.shutdown()


def send(port: int, ds: Dataset) -> float:
    """C-STORE one study in its own association; return the time of the response."""
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DX, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMO")
    if not assoc.is_established:
        raise RuntimeError("association rejected")
    status = assoc.send_c_store(ds)
    responded = time.time()
    assoc.release()
    if getattr(status, "Status", None) != 0:
        raise RuntimeError(f"C-STORE failed: {status}")
    return responded


@dataclass
class Stack:
    name: str
    env: dict[str, str]
    port: int
    database_url: str
    processes: list[subprocess.Popen[bytes]]

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.processes:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if "PNEUMO_BROKER_URL" not in self.env:  # the embedded redis-server outlives them
            from worker import embedded_broker

            embedded_broker.stop(Path(self.env["PNEUMO_DATA_DIR"]))


def start_stack(
    name: str, workdir: Path, pacs: Pacs, concurrency: int, extra: dict[str, str]
) -> Stack:
    from pneumo.settings import Settings

    port = free_port()
    data_dir = workdir / f"{name}-{concurrency}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMO_")}
    env.update(
        PNEUMO_DATA_DIR=str(data_dir),
        PNEUMO_HOST="127.0.0.1",
        PNEUMO_PORT=str(port),
        PNEUMO_DESTINATIONS=f"PACS@127.0.0.1:{pacs.port}",
        **extra,
    )
    url = Settings(
        data_dir=data_dir,
        database_url=extra.get("PNEUMO_DATABASE_URL"),
        broker_url=extra.get("PNEUMO_BROKER_URL"),
    ).effective_database_url
    cli = [sys.executable, "-m", "pneumo.cli"]
    subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    logs = open(data_dir / "processes.log", "ab")
    procs = [
        subprocess.Popen(
            [*cli, "listen"], env=env, stdout=logs, stderr=logs, start_new_session=True
        ),
        subprocess.Popen(
            [*cli, "worker", "--concurrency", str(concurrency)],
            env=env,
            stdout=logs,
            stderr=logs,
            start_new_session=True,
        ),
    ]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    return Stack(name, env, port, url, procs)


def queued_times(url: str, uids: list[str]) -> dict[str, float]:
    from sqlalchemy import select

    from db.engine import session_scope
    from db.models import Study

    with session_scope(url) as session:
        rows = session.execute(
            select(Study.study_uid, Study.queued_at).where(Study.study_uid.in_(uids))
        ).all()
    out = {}
    for uid, queued in rows:
        if queued is not None:
            queued = queued if queued.tzinfo else queued.replace(tzinfo=UTC)
            out[uid] = queued.timestamp()
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run_latency(stack: Stack, pacs: Pacs, pixels: np.ndarray, n: int) -> dict[str, float]:
    sent: dict[str, float] = {}
    for _ in range(n):
        ds = make_study(pixels)
        uid = str(ds.StudyInstanceUID)
        sent[uid] = send(stack.port, ds)
        if not pacs.wait_for({uid}, 120):
            raise RuntimeError(f"{stack.name}: no SR within 120 s")
    queued = queued_times(stack.database_url, list(sent))
    total = [pacs.sr_at[u] - sent[u] for u in sent]
    wait = [queued[u] - sent[u] for u in sent]
    processing = [pacs.sr_at[u] - queued[u] for u in sent]
    return {
        "total_p50": pct(total, 50),
        "total_p95": pct(total, 95),
        "wait_p50": pct(wait, 50),
        "wait_p95": pct(wait, 95),
        "proc_p50": pct(processing, 50),
        "proc_p95": pct(processing, 95),
    }


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def cpu_groups(stack: Stack) -> dict[str, list[psutil.Process]]:
    """The processes whose CPU time the throughput run accounts for, by role."""
    groups: dict[str, list[psutil.Process]] = {}
    for role, popen in zip(("listener", "worker"), stack.processes, strict=False):
        root = psutil.Process(popen.pid)
        groups[role] = [root, *root.children(recursive=True)]
    groups[BENCH_ROLE] = [psutil.Process()]
    services: list[psutil.Process] = []
    for proc in psutil.process_iter(["name"]):
        if (proc.info["name"] or "").startswith(("postgres", "redis-server")):
            services.append(proc)
    groups["PostgreSQL + Redis"] = services
    return groups


def run_throughput(
    stack: Stack, pacs: Pacs, pixels: np.ndarray, n: int
) -> tuple[float, dict[str, float]]:
    """Studies/s, and core-milliseconds per study spent by each group of processes."""
    studies = [make_study(pixels) for _ in range(n)]
    uids = {str(ds.StudyInstanceUID) for ds in studies}
    groups = cpu_groups(stack)
    before = {role: _cpu_seconds(procs) for role, procs in groups.items()}
    start = time.time()
    for ds in studies:
        send(stack.port, ds)
    if not pacs.wait_for(uids, 60 + 10 * n):
        raise RuntimeError(f"{stack.name}: not all SRs arrived")
    elapsed = max(pacs.sr_at[u] for u in uids) - start
    cpu = {role: (_cpu_seconds(procs) - before[role]) * 1000 / n for role, procs in groups.items()}
    return n / elapsed, cpu


def production_env() -> tuple[dict[str, str], str] | None:
    try:
        import redis
        from sqlalchemy import create_engine, text

        redis.Redis.from_url(REDIS).flushdb()
        name = f"pneumo_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
    except Exception as exc:
        print(f"production stack unavailable ({type(exc).__name__}); skipped")
        return None
    return (
        {
            "PNEUMO_BROKER_URL": REDIS,
            "PNEUMO_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
        },
        name,
    )


def drop_database(name: str) -> None:
    from sqlalchemy import create_engine, text

    from db.engine import get_engine

    get_engine.cache_clear()
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def bench_stack(
    name: str,
    extra: dict[str, str],
    workers: int,
    tmp: Path,
    pacs: Pacs,
    pixels: np.ndarray,
    args: argparse.Namespace,
) -> list[str]:
    rows: list[str] = []
    if extra.get("PNEUMO_BROKER_URL"):
        import redis

        redis.Redis.from_url(REDIS).flushdb()
    stack = start_stack(name, tmp, pacs, workers, extra)
    try:
        # Warm-up: model load and first-call costs are not latency.
        warm = make_study(pixels)
        send(stack.port, warm)
        pacs.wait_for({str(warm.StudyInstanceUID)}, 180)
        if workers == 1 and args.latency_studies:
            lat = run_latency(stack, pacs, pixels, args.latency_studies)
            rows.append(
                f"(a) latency    {name:17s} 1 worker   n={args.latency_studies:<4d}"
                f" total p50 {lat['total_p50']:.2f}s p95 {lat['total_p95']:.2f}s"
                f" | quiet-window wait p50 {lat['wait_p50']:.2f}s p95 {lat['wait_p95']:.2f}s"
                f" | processing p50 {lat['proc_p50']:.2f}s p95 {lat['proc_p95']:.2f}s"
            )
            print(rows[-1], flush=True)
        if args.throughput_studies:
            rate, cpu = run_throughput(stack, pacs, pixels, args.throughput_studies)
            label = "(c)" if name == "embedded" else "(b)"
            split = ", ".join(f"{role} {ms:.0f}" for role, ms in cpu.items())
            cores = os.cpu_count() or 1
            product = sum(ms for role, ms in cpu.items() if role != BENCH_ROLE)
            rows.append(
                f"{label} throughput {name:17s} {workers} worker(s) "
                f"n={args.throughput_studies:<4d} {rate:.2f} studies/s"
                f" | CPU core-ms per study: {split} (total {sum(cpu.values()):.0f};"
                f" all {cores} cores busy would allow"
                f" {cores * 1000 / sum(cpu.values()):.2f} studies/s;"
                f" without the bench's own {cpu[BENCH_ROLE]:.0f}, {product:.0f}:"
                f" {cores * 1000 / product:.2f} studies/s)"
            )
            print(rows[-1], flush=True)
    finally:
        stack.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-studies", type=int, default=50)
    parser.add_argument("--throughput-studies", type=int, default=500)
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels")
    parser.add_argument("--workers", default="1,2", help="worker process counts for (b)/(c)")
    parser.add_argument(
        "--listener-processes",
        type=int,
        default=1,
        help="PNEUMO_LISTENER_PROCESSES for the listener (receiving processes; default 1)",
    )
    parser.add_argument(
        "--precision",
        default=None,
        help="PNEUMO_INFERENCE_PRECISION for the workers (default: the setting's own, auto)",
    )
    parser.add_argument("--skip-production", action="store_true")
    parser.add_argument("--skip-embedded", action="store_true")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print("needs ../shared/data")
        return 2

    pixels = template_pixels(args.size)
    pacs = Pacs()
    rows: list[str] = []
    flavours: list[tuple[str, dict[str, str], str | None]] = []
    if not args.skip_production:
        prod = production_env()
        if prod:
            flavours.append(("redis+postgresql", prod[0], prod[1]))
    if not args.skip_embedded:
        flavours.append(("embedded", {}, None))
    if args.listener_processes != 1:
        receivers = {"PNEUMO_LISTENER_PROCESSES": str(args.listener_processes)}
        flavours = [(f"{n}-rx{args.listener_processes}", {**e, **receivers}, pg)
                    for n, e, pg in flavours]  # fmt: skip
    if args.precision:
        precision = {"PNEUMO_INFERENCE_PRECISION": args.precision}
        flavours = [(f"{n}-{args.precision}", {**e, **precision}, pg)
                    for n, e, pg in flavours]  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="pneumo-bench-") as tmp:
        try:
            for name, extra, pg_name in flavours:
                try:
                    for workers in [int(w) for w in args.workers.split(",")]:
                        rows += bench_stack(name, extra, workers, Path(tmp), pacs, pixels, args)
                finally:
                    if pg_name:
                        drop_database(pg_name)
        finally:
            pacs.stop()

    print()
    print(
        f"pneumo end-to-end benchmark: {args.size}x{args.size} single-image DX studies, "
        f"{os.cpu_count()} CPU core(s), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
