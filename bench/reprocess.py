"""Reprocessing benchmark: a batch over archived studies, and realtime latency during it.

Starts `pneumo listen` and `pneumo worker` (Redis + a throwaway PostgreSQL
database) with a pynetdicom C-STORE SCP in this process as the PACS (from
`bench/e2e.py`), archives N single-image DX studies (spooled files and rows
written as the intake writes them, marked done: processed long ago), then:

(a) idle: realtime studies sent one at a time through the listener; latency
    from the last C-STORE response to the SR acknowledged by the PACS, and
    its processing part (study queued -> SR acknowledged);
(b) `pneumo reprocess --studies-file` over the N archived studies (the batch
    queue, no rate limit): studies/s from the command's start to the batch's
    `finished_at`;
(c) during (b): the same realtime studies, sent one at a time while the batch
    runs (only those whose SR arrived before the batch finished count).

Target (issue 10): realtime p95 during the reprocess <= 1.5x idle.

    .venv/bin/python bench/reprocess.py                 # 1 000 archived studies
    .venv/bin/python bench/reprocess.py --studies 300 --realtime 20

Needs ../shared/data (one Kermany image), Redis and PostgreSQL at 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from e2e import (  # bench/ is not a package: e2e.py is found through sys.path
    PG_ADMIN,
    SHARED,
    Pacs,
    Stack,
    drop_database,
    instance_record,
    make_study,
    pct,
    queued_times,
    send,
    start_stack,
    template_pixels,
)

REDIS = "redis://127.0.0.1:6379/11"
"""A database number of its own: the test suite uses others."""


def throwaway_database() -> tuple[str, str]:
    """(name, URL) of a new empty PostgreSQL database."""
    from sqlalchemy import create_engine, text

    name = f"pneumo_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def archive(url: str, spool: Path, pixels: np.ndarray, n: int) -> list[str]:
    """N single-image studies as the intake records them, then marked done at revision 1."""
    from sqlalchemy import update

    from db import repository as repo
    from db.engine import session_scope
    from db.models import Study, StudyStatus

    uids = []
    with session_scope(url) as session:
        for _ in range(n):
            ds = make_study(pixels)
            study_uid, sop_uid = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            path = spool / study_uid / f"{sop_uid}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            repo.record_instance(session, instance_record(ds, path, "MODALITY"))
            uids.append(study_uid)
        session.execute(
            update(Study)
            .where(Study.study_uid.in_(uids))
            .values(status=StudyStatus.DONE, revision=1, completed_at=datetime.now(UTC))
        )
    return uids


def realtime_worker(stack: Stack) -> subprocess.Popen[bytes]:
    """A second `pneumo worker` that takes realtime studies only: a slot batches never hold."""
    logs = open(Path(stack.env["PNEUMO_DATA_DIR"]) / "realtime-worker.log", "ab")
    command = [sys.executable, "-m", "pneumo.cli", "worker", "--queues", "realtime",
               "--concurrency", "1", "--hostname", f"realtime-{os.getpid()}@bench"]  # fmt: skip
    return subprocess.Popen(
        command, env=stack.env, stdout=logs, stderr=logs, start_new_session=True
    )


def realtime_one(port: int, pacs: Pacs, pixels: np.ndarray) -> tuple[str, float]:
    """Send one study through the listener; (study UID, time of the C-STORE response)."""
    ds = make_study(pixels)
    uid = str(ds.StudyInstanceUID)
    sent = send(port, ds)
    if not pacs.wait_for({uid}, 180):
        raise RuntimeError("no SR within 180 s")
    return uid, sent


def latencies(url: str, pacs: Pacs, sent: dict[str, float]) -> tuple[list[float], list[float]]:
    """(total, processing) seconds of each realtime study."""
    queued = queued_times(url, list(sent))
    total = [pacs.sr_at[u] - sent[u] for u in sent]
    processing = [pacs.sr_at[u] - queued[u] for u in sent]
    return total, processing


def batch_state(url: str, batch_id: int) -> tuple[str, datetime | None, dict[str, int]]:
    from db.batches import batch_views
    from db.engine import session_scope

    with session_scope(url) as session:
        (view,) = batch_views(session, [batch_id])
    return view.state.value, view.finished_at, dict(view.counts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=1000, help="archived studies reprocessed")
    parser.add_argument("--realtime", type=int, default=30, help="realtime studies per phase")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--concurrency", type=int, default=2, help="worker concurrency")
    parser.add_argument("--max-rate", type=float, help="throttle the batch (pneumo reprocess)")
    parser.add_argument(
        "--realtime-worker",
        action="store_true",
        help="one more worker process consuming only the realtime queue (concurrency 1)",
    )
    args = parser.parse_args()
    if not SHARED.is_dir():
        print("needs ../shared/data")
        return 2
    import redis

    redis.Redis.from_url(REDIS).flushdb()
    pixels = template_pixels(args.size)
    pacs = Pacs()
    name, url = throwaway_database()
    extra = {"PNEUMO_BROKER_URL": REDIS, "PNEUMO_DATABASE_URL": url}
    rows: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="pneumo-bench-") as tmp:
            stack = start_stack("reprocess", Path(tmp), pacs, args.concurrency, extra)
            if args.realtime_worker:
                stack.processes.append(realtime_worker(stack))
            try:
                rows = run(stack, pacs, pixels, url, args)
            finally:
                stack.stop()
    finally:
        pacs.stop()
        drop_database(name)
        redis.Redis.from_url(REDIS).flushdb()
    print()
    print(
        f"pneumo reprocess benchmark: {args.studies} archived {args.size}x{args.size} "
        f"single-image DX studies, worker concurrency {args.concurrency}, batch max rate "
        f"{f'{args.max_rate}/s' if args.max_rate else 'none'}"
        f"{', plus a realtime-only worker' if args.realtime_worker else ''}, "
        f"{os.cpu_count()} CPU core(s), load average {os.getloadavg()[0]:.1f}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    for row in rows:
        print(row)
    return 0


def run(
    stack: Stack, pacs: Pacs, pixels: np.ndarray, url: str, args: argparse.Namespace
) -> list[str]:
    """Archive, idle realtime, the reprocess with realtime during it; the result rows."""
    port, env = stack.port, stack.env
    spool = Path(env["PNEUMO_DATA_DIR"]) / "archive"
    archived = archive(url, spool, pixels, args.studies)
    realtime_one(port, pacs, pixels)  # warm-up: model load and first-call costs

    idle: dict[str, float] = {}
    for _ in range(args.realtime):
        uid, sent = realtime_one(port, pacs, pixels)
        idle[uid] = sent
    idle_total, idle_processing = latencies(url, pacs, idle)
    print(f"idle: {len(idle)} realtime studies measured", flush=True)

    studies_file = Path(env["PNEUMO_DATA_DIR"]) / "studies.txt"
    studies_file.write_text("\n".join(archived) + "\n")
    started = time.time()
    command = [sys.executable, "-m", "pneumo.cli", "reprocess", "--studies-file", str(studies_file)]
    if args.max_rate:
        command += ["--max-rate", f"{args.max_rate}/s"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    batch_id = int(done.stdout.split()[1].rstrip(":"))
    print(f"batch {batch_id} started: {done.stdout.strip()}", flush=True)

    during: dict[str, float] = {}
    state, finished, counts = batch_state(url, batch_id)
    while state != "done":
        if len(during) < args.realtime:
            uid, sent = realtime_one(port, pacs, pixels)
            if batch_state(url, batch_id)[0] != "done":
                during[uid] = sent
        else:
            time.sleep(1.0)
        state, finished, counts = batch_state(url, batch_id)
    assert finished is not None
    elapsed = finished.timestamp() - started
    busy_total, busy_processing = latencies(url, pacs, during)

    def ratio(busy: list[float], quiet: list[float]) -> str:
        if not busy:
            return "-"
        return f"{pct(busy, 95) / pct(quiet, 95):.2f}x"

    target = "met" if busy_total and pct(busy_total, 95) <= 1.5 * pct(idle_total, 95) else "missed"
    return [
        f"(b) reprocess  {args.studies} studies in {elapsed:.1f}s = "
        f"{args.studies / elapsed:.2f} studies/s (done {counts['done']}, "
        f"failed {counts['failed']})",
        f"(a) realtime idle            n={len(idle):<3d} total p50 {pct(idle_total, 50):.2f}s "
        f"p95 {pct(idle_total, 95):.2f}s | processing p50 {pct(idle_processing, 50):.2f}s "
        f"p95 {pct(idle_processing, 95):.2f}s",
        f"(c) realtime during reprocess n={len(during):<3d} total p50 "
        f"{pct(busy_total, 50) if busy_total else float('nan'):.2f}s p95 "
        f"{pct(busy_total, 95) if busy_total else float('nan'):.2f}s | processing p50 "
        f"{pct(busy_processing, 50) if busy_processing else float('nan'):.2f}s p95 "
        f"{pct(busy_processing, 95) if busy_processing else float('nan'):.2f}s",
        f"    p95 during / idle: total {ratio(busy_total, idle_total)}, processing "
        f"{ratio(busy_processing, idle_processing)} (target total <= 1.5x: {target})",
    ]


if __name__ == "__main__":
    sys.exit(main())
