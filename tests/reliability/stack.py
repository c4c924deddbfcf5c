"""A real embedded stack (``pneumo up``: listener + Celery worker + private redis-server)
for fault tests that send hostile or PHI-laden studies end to end, and what to read back."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select

from db.engine import session_scope
from db.models import Job, Study, StudyStatus
from tests.e2e.conftest import Pacs, Processes, free_port, logs, pneumo, pneumo_env, port_open
from tests.e2e.conftest import wait_until as _wait_until

__all__ = ["TERMINAL", "EmbeddedStack", "StudyRow", "chest", "start_stack"]

TERMINAL = {StudyStatus.DONE, StudyStatus.DEAD_LETTER}


@dataclass(frozen=True)
class StudyRow:
    """What the database says about one study, flattened for assertions."""

    status: StudyStatus
    last_error: str | None
    patient_id: str | None
    accession_number: str | None
    skip_reasons: tuple[str | None, ...]
    results: int
    job_errors: tuple[str, ...]


@dataclass
class EmbeddedStack:
    procs: Processes
    root: Path
    data_dir: Path
    port: int
    pacs: Pacs
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"sqlite:///{(self.data_dir / 'pneumo.db').resolve()}"

    def studies(self) -> dict[str, StudyRow]:
        with session_scope(self.url) as session:
            rows = {}
            for study in session.execute(select(Study)).scalars():
                jobs = session.execute(select(Job.error).where(Job.study_id == study.id))
                rows[study.study_uid] = StudyRow(
                    status=study.status,
                    last_error=study.last_error,
                    patient_id=study.patient_id,
                    accession_number=study.accession_number,
                    skip_reasons=tuple(i.skip_reason for i in study.instances),
                    results=len(study.results),
                    job_errors=tuple(e for e in jobs.scalars() if e),
                )
            return rows

    def wait_terminal(self, study_uids: list[str], timeout: float = 240) -> dict[str, StudyRow]:
        """Wait until every study is done or dead-lettered; return all rows."""

        def finished() -> bool:
            rows = self.studies()
            return all(uid in rows and rows[uid].status in TERMINAL for uid in study_uids)

        try:
            _wait_until(finished, timeout, "studies to be done or dead-lettered")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.studies()}\n{logs(self.root)}") from None
        return self.studies()

    def status_output(self) -> str:
        """``pneumo status`` as an operator sees it, table and JSON."""
        out = []
        for fmt in ("table", "json"):
            done = subprocess.run(
                pneumo("status", "--format", fmt),
                env=self.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            out.append(done.stdout + done.stderr)
        return "\n".join(out)


def start_stack(procs: Processes, pacs: Pacs, root: Path) -> EmbeddedStack:
    """``pneumo up`` in ``root/data`` on a free port, listening when this returns."""
    port = free_port()
    data_dir = root / "data"
    env = pneumo_env(data_dir, port, pacs)
    procs.start("up", pneumo("up"), env)
    _wait_until(lambda: port_open(port), 90, "the listener port\n" + logs(root))
    return EmbeddedStack(procs, root, data_dir, port, pacs, env)


def chest(ds: Dataset) -> Dataset:
    """Make a synthetic instance a frontal chest radiograph, so selection reads its pixels."""
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    return ds
