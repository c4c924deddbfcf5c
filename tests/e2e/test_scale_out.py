"""Scale-out on one machine: three Celery workers under three host names, one listener,
one Redis, one PostgreSQL and one shared data folder, as on several hosts.

Real parts throughout: ``pneumo listen`` and three ``pneumo worker --hostname
worker<N>@host<X>`` processes (each its own main process, pool child, heartbeat
and reconciler), the shared Redis (database 15) and a throwaway PostgreSQL
database, 30 single-image chest studies sent with DCMTK ``storescu`` over one
association, a DCMTK ``storescp`` standing in for the PACS.

Checked: every study is done exactly once (one processing job, succeeded, and
one result row for its revision; no lost or repeated attempt), the work is
spread over all three workers (each ran at least one study, named on its job
rows), and each worker's heartbeat row names the host of its node name.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from pydicom.uid import generate_uid

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk, pytest.mark.redis, pytest.mark.postgres]

STUDIES = 30
NODES = ("worker1@hostA", "worker2@hostB", "worker3@hostC")


def chest_studies(e2e, shared: Path, work: Path) -> list[Path]:  # type: ignore[no-untyped-def]
    """``STUDIES`` single-image studies of one real chest X-ray scaled to 512², a study UID each."""
    work.mkdir()
    source = sorted((shared / "kermany" / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    small = work / "chest.jpeg"
    Image.open(source).convert("L").resize((512, 512)).save(small)
    return [
        e2e.kermany_to_dicom(small, work / f"study{i:02d}.dcm", generate_uid(), f"SCALE{i:03d}")
        for i in range(STUDIES)
    ]


def test_three_hosts_share_the_work_and_process_each_study_once(  # type: ignore[no-untyped-def]
    e2e, procs, pacs, predictor, shared_data, redis_url, pg_url, tmp_path: Path
) -> None:
    from sqlalchemy import func, select

    from db.engine import session_scope
    from db.models import Job, JobKind, JobStatus, Result, Study, StudyStatus, WorkerHeartbeat

    port = e2e.free_port()
    env = e2e.pneumo_env(
        tmp_path / "data",  # the shared archive every "host" mounts
        port,
        pacs,
        PNEUMO_BROKER_URL=redis_url,
        PNEUMO_DATABASE_URL=pg_url,
        PNEUMO_TORCH_THREADS="1",
    )
    subprocess.run(e2e.pneumo("db", "upgrade"), env=env, check=True, timeout=120)
    procs.start("listen", e2e.pneumo("listen"), env)
    for node in NODES:
        worker = e2e.pneumo("worker", "--hostname", node, "--concurrency", "1")
        procs.start(node.split("@")[0], worker, env)
    files = chest_studies(e2e, shared_data, tmp_path / "inputs")

    def beats() -> dict[str, str]:
        with session_scope(pg_url) as session:
            rows = session.execute(select(WorkerHeartbeat.worker, WorkerHeartbeat.hostname))
            return {str(worker): str(host) for worker, host in rows}

    # All three ready before the studies arrive, so that none takes them all.
    e2e.wait_until(lambda: e2e.port_open(port), 30, "the listener port\n" + e2e.logs(tmp_path))
    e2e.wait_until(
        lambda: set(beats()) == set(NODES), 90, "three worker heartbeats\n" + e2e.logs(tmp_path)
    )
    assert beats() == {node: node.split("@")[1] for node in NODES}

    sent = e2e.storescu(port, files)
    assert sent.returncode == 0, sent.stderr + sent.stdout

    def statuses() -> dict[str, StudyStatus]:
        with session_scope(pg_url) as session:
            return dict(session.execute(select(Study.study_uid, Study.status)).all())

    def all_done() -> bool:
        now = statuses()
        assert StudyStatus.DEAD_LETTER not in now.values(), e2e.logs(tmp_path)
        return len(now) == STUDIES and set(now.values()) == {StudyStatus.DONE}

    e2e.wait_until(all_done, 120, f"{STUDIES} studies done\n" + e2e.logs(tmp_path))

    with session_scope(pg_url) as session:
        studies = session.execute(select(Study.id, Study.revision)).all()
        jobs = session.execute(
            select(Job.study_id, Job.status, Job.worker_host, Job.attempt).where(
                Job.kind == JobKind.PROCESS
            )
        ).all()
        results = Counter(
            (int(study_id), int(revision))
            for study_id, revision in session.execute(select(Result.study_id, Result.revision))
        )
        result_rows = session.execute(select(func.count()).select_from(Result)).scalar_one()
    assert len(studies) == STUDIES
    # Exactly once: one result for each study's revision, one attempt, and it succeeded.
    assert result_rows == STUDIES
    assert all(results[(study_id, revision)] == 1 for study_id, revision in studies)
    assert sorted(study_id for study_id, *_ in jobs) == sorted(s for s, _ in studies)
    assert {(status, attempt) for _, status, _, attempt in jobs} == {(JobStatus.SUCCEEDED, 0)}
    # Spread: every worker ran at least one study, and only these three ran any.
    per_worker = Counter(host for _, _, host, _ in jobs)
    print(f"\nstudies per worker: {dict(sorted(per_worker.items()))}")
    assert set(per_worker) == set(NODES), per_worker
