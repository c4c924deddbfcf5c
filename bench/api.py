"""Staff API latency on PostgreSQL with 100 000 synthetic results.

    .venv/bin/python bench/api.py [--studies 100000] [--requests 200] [--url postgresql+psycopg://postgres@127.0.0.1:5432/test]

Creates a throwaway database beside ``--url``, migrates it, bulk-inserts
``--studies`` studies (one instance each; 95 % with a result, 5 % still queued)
over two model versions, starts ``pneumo api`` (uvicorn, one process) on a free
loopback port and measures, over real HTTP with keep-alive, the latency of:

* ``GET /api/studies`` with filters (finding + minimum probability; a patient ID;
  a study-date range sorted by probability),
* the worklist page ``/`` (triage order, first 50 rows),
* a study page ``/studies/{uid}``.

Each request also authenticates its token and writes its audit row, as in
production. Prints p50/p95/max per request kind against the 50 ms target.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from db import access  # noqa: E402
from db.engine import session_scope  # noqa: E402
from db.migrate import upgrade  # noqa: E402
from db.models import Instance, ModelVersion, Result, Study  # noqa: E402

TARGET_MS = 50.0
BATCH = 5000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fill(url: str, studies: int) -> None:
    """Bulk-insert the synthetic studies, instances and results."""
    rng = random.Random(7)
    engine = create_engine(url)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with engine.begin() as c:
        c.execute(insert(ModelVersion), [
            {"id": 1, "name": "pneumonet", "version": "1.0.0", "sha256": "a" * 64, "threshold": 0.5,
             "intended_population": "", "max_age_years": 17, "created_at": start},
            {"id": 2, "name": "pneumonet", "version": "1.1.0", "sha256": "b" * 64, "threshold": 0.45,
             "intended_population": "", "max_age_years": 17, "created_at": start},
        ])  # fmt: skip
    for first in range(1, studies + 1, BATCH):
        ids = range(first, min(first + BATCH, studies + 1))
        s_rows, i_rows, r_rows = [], [], []
        for n in ids:
            received = start + timedelta(minutes=5 * n)
            processed = rng.random() < 0.95
            s_rows.append({
                "id": n, "study_uid": f"2.25.{n}", "patient_id": f"P{n % 20000:05d}",
                "accession_number": f"A{n:08d}", "study_date": received.date(),
                "patient_age": f"{rng.randint(1, 17):03d}Y",
                "status": "done" if processed else "queued", "revision": 1,
                "received_at": received, "queued_at": received,
                "completed_at": received if processed else None, "last_error": None,
            })  # fmt: skip
            i_rows.append({
                "id": n, "study_id": n, "sop_instance_uid": f"2.25.{n}.1.1",
                "series_uid": f"2.25.{n}.1", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
                "transfer_syntax_uid": "1.2.840.10008.1.2.1", "path": f"/nonexistent/{n}.dcm",
                "size": 1, "calling_aet": "PACS", "received_at": received,
                "selection": "selected" if processed else "pending", "skip_reason": None,
            })  # fmt: skip
            if processed:
                p = rng.betavariate(0.6, 1.2)
                model = 2 if n > studies * 0.8 else 1
                threshold = 0.45 if model == 2 else 0.5
                flags = ["outside-intended-use"] if rng.random() < 0.03 else []
                r_rows.append({
                    "id": n, "study_id": n, "model_version_id": model, "revision": 1,
                    "status": "complete", "probability": p, "finding": p >= threshold,
                    "threshold": threshold, "ood": False, "outside_intended_use": bool(flags),
                    "flags": flags, "summary": "", "sr_sop_instance_uid": f"2.25.{n}.9",
                    "sr_path": None, "timings": {"predict": 0.2}, "created_at": received,
                    "updated_at": received,
                })  # fmt: skip
        with engine.begin() as c:
            c.execute(insert(Study), s_rows)
            c.execute(insert(Instance), i_rows)
            if r_rows:
                c.execute(insert(Result), r_rows)
    with engine.begin() as c:
        for table in ("study", "instance", "result", "model_version"):
            c.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
                )
            )
        c.execute(text("ANALYZE"))
    engine.dispose()


def measure(client: httpx.Client, path: str, n: int) -> list[float]:
    client.get(path).raise_for_status()  # warm
    times = []
    for _ in range(n):
        t = time.perf_counter()
        client.get(path).raise_for_status()
        times.append((time.perf_counter() - t) * 1000)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()

    name = f"pneumo_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(args.url).set(database=name).render_as_string(hide_password=False)
    server = None
    try:
        upgrade(url)
        t = time.perf_counter()
        fill(url, args.studies)
        print(f"filled {args.studies} studies in {time.perf_counter() - t:.1f} s")
        with session_scope(url) as s:
            token = access.create_token(s, user="bench", role=access.Role.RADIOLOGIST)[1]
        port = free_port()
        env = {**os.environ, "PNEUMO_DATABASE_URL": url, "PNEUMO_DATA_DIR": "/tmp/pneumo-bench"}
        code = (
            "import uvicorn; from pneumo.api.app import create_app; "
            "from pneumo.settings import load_settings; "
            f"uvicorn.run(create_app(load_settings()), host='127.0.0.1', port={port}, "
            "log_level='warning', access_log=False)"
        )
        server = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/api/health", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        mid = args.studies // 2
        day = (datetime(2026, 1, 1) + timedelta(minutes=5 * mid)).date()
        cases = {
            "GET /api/studies finding=pneumonia&min_probability=0.7": "/api/studies?finding=pneumonia&min_probability=0.7",
            "GET /api/studies patient_id": f"/api/studies?patient_id=P{mid % 20000:05d}",
            "GET /api/studies 3-day range, by probability": f"/api/studies?since={day}&until={day + timedelta(days=2)}&sort=probability",
            "GET /api/studies no filter, newest": "/api/studies",
            "worklist page / (triage)": "/",
            "worklist page / finding=pneumonia": "/?finding=pneumonia",
            "study page /studies/{uid}": f"/studies/2.25.{mid}",
            "GET /api/studies/{uid}": f"/api/studies/2.25.{mid}",
        }
        headers = {"Authorization": f"Bearer {token}"}
        rows = []
        with httpx.Client(
            base_url=base, headers=headers, cookies={"pneumo_session": token}, timeout=30
        ) as client:
            for label, path in cases.items():
                times = measure(client, path, args.requests)
                p95 = statistics.quantiles(times, n=20)[-1]
                rows.append((label, statistics.median(times), p95, max(times)))
        print(f"\n{args.studies} studies on PostgreSQL, {args.requests} requests each, "
              f"one uvicorn process, {date.today()}:")  # fmt: skip
        print(
            f"{'request':55} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}  target p95 <= {TARGET_MS:.0f} ms"
        )
        for label, p50, p95, worst in rows:
            verdict = "met" if p95 <= TARGET_MS else "MISSED"
            print(f"{label:55} {p50:8.1f} {p95:8.1f} {worst:8.1f}  {verdict}")
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        from db.engine import get_engine

        get_engine.cache_clear()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    sys.exit(main())
