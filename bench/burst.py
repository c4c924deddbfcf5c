"""Burst benchmark (issue 8, fault suite item 6): many single-image studies at once.

Starts the embedded stack (``pneumo up``: listener, Celery worker, private
redis-server, SQLite) and a DCMTK ``storescp`` as the PACS, then sends N
small single-image DX chest studies from S parallel ``/usr/bin/storescu``
processes (one association each, ``TCP_NODELAY=1``). It waits until every
study is ``done`` with its SR delivery ``sent`` and an SR file at the PACS,
and prints the times: sending, all done, all SRs delivered.

    .venv/bin/python bench/burst.py                          # 1000 studies, 4 senders
    .venv/bin/python bench/burst.py --studies 40 --senders 2  # a quick check

Exit status 0 when every study was done and delivered exactly once, 1 otherwise.
Shares the machine's cores with whatever else runs: say so with the figure.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
DCMTK = Path("/usr/bin")
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"nothing listens on port {port} after {timeout:.0f}s")


def make_files(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` one-image studies (synthetic chest-like gradient plus noise), one file each."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    base = (2048 + 1024 * np.cos((xx - size / 2) / size * np.pi)).astype(np.uint16)
    files = []
    for n in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = DX
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{n:05d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = DX, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
        ds.PatientName, ds.PatientID, ds.PatientAge = "Burst^Bench", f"B{n:05d}", "006Y"
        ds.AccessionNumber, ds.StudyDate, ds.StudyTime, ds.StudyID = "B1", "20240101", "1200", "1"
        ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 1, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        noise = rng.integers(0, 256, (size, size), dtype=np.uint16)
        ds.PixelData = (base + noise).tobytes()
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def progress(database: Path) -> tuple[int, int]:
    """(studies done, SR deliveries sent), read straight from the embedded database."""
    import sqlite3

    if not database.exists():
        return 0, 0
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as db:
        done = db.execute("SELECT count(*) FROM study WHERE status = 'done'").fetchone()[0]
        sent = db.execute("SELECT count(*) FROM delivery WHERE status = 'sent'").fetchone()[0]
    return int(done), int(sent)


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run(args: argparse.Namespace, root: Path) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMO_")}
    env["TCP_NODELAY"] = "1"
    files = make_files(root / "send", args.studies, args.size)
    pacs_dir, pacs_port, port = root / "pacs", free_port(), free_port()
    pacs_dir.mkdir()
    pacs = subprocess.Popen(
        [str(DCMTK / "storescp"), "--fork", "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    env.update(
        PNEUMO_DATA_DIR=str(root / "data"),
        PNEUMO_PORT=str(port),
        PNEUMO_DESTINATIONS=f"PACS@127.0.0.1:{pacs_port}",
        PNEUMO_STUDY_QUIET_SECONDS="1",
        PNEUMO_STUDY_RELEASE_GRACE_SECONDS="0.2",
        PYTHONPATH=str(REPO),
    )
    log = open(root / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "pneumo.cli", "up", "--concurrency", str(args.workers)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_port(pacs_port, 30)
        wait_port(port, 180)
        chunks = [files[i :: args.senders] for i in range(args.senders)]
        started = time.monotonic()
        senders = [
            subprocess.Popen(
                [
                    str(DCMTK / "storescu"),
                    "-aec",
                    "PNEUMO",
                    "-R",
                    "127.0.0.1",
                    str(port),
                    *map(str, chunk),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            for chunk in chunks
            if chunk
        ]
        failed = [s.stderr.read().decode(errors="replace")[-500:] for s in senders if s.wait()]
        sent_at = time.monotonic() - started
        if failed:
            print(f"storescu failed: {failed[0]}", file=sys.stderr)
            return 1
        database = root / "data" / "pneumo.db"
        done_at = delivered_at = None
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            done, sent = progress(database)
            now = time.monotonic() - started
            if done_at is None and done >= args.studies:
                done_at = now
            srs = sum(1 for p in pacs_dir.iterdir() if p.name.startswith("SR"))
            if sent >= args.studies and srs >= args.studies:
                delivered_at = now
                break
            time.sleep(1.0)
        done, sent = progress(database)
        srs = sum(1 for p in pacs_dir.iterdir() if p.name.startswith("SR"))
    finally:
        stop(up)
        stop(pacs, signal.SIGTERM)
        log.close()
    print(
        f"pneumo burst: {args.studies} single-image {args.size}x{args.size} studies, "
        f"{args.senders} parallel storescu, {args.workers} worker process(es), "
        f"{os.cpu_count()} CPU core(s), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"  all sent (C-STORE Success)   {sent_at:8.1f} s")
    print(f"  all done                     {_s(done_at)}")
    print(f"  all SRs delivered            {_s(delivered_at)}")
    if delivered_at:
        print(f"  throughput                   {args.studies / delivered_at:8.2f} studies/s")
    print(f"  done {done}, deliveries sent {sent}, SR files at the PACS {srs}")
    ok = done == sent == srs == args.studies
    if not ok:
        print(f"  NOT all done and delivered exactly once; see {root / 'up.log'}", file=sys.stderr)
    return 0 if ok else 1


def _s(seconds: float | None) -> str:
    return f"{seconds:8.1f} s" if seconds is not None else "  (timed out)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="pneumo up --concurrency")
    parser.add_argument("--size", type=int, default=256, help="image rows = columns")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds after sending")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pneumo-burst-"))
    try:
        return run(args, root)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            import shutil

            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
