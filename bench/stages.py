"""CPU of one study through the worker's pipeline, in-process, per stage.

    .venv/bin/python bench/stages.py [--studies 24] [--size 2048] [--threads 1]

Builds one synthetic single-image DX study (pixels from a real Kermany chest
X-ray, as ``bench/e2e.py``), records it ``--studies`` times in a throwaway
SQLite database as the listener would, and runs
:func:`worker.pipeline.run_study` on each with the shipped model (torch at
``--threads``, 1 as in a prefork worker on 2 cores). Prints the wall and CPU
seconds per study and the mean of each stage timing the pipeline stores on
the result row. No broker, listener or network: the worker's own work only
(sending the results back is not included).

Needs ../shared/data (one Kermany image).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    import torch
    from e2e import SHARED, instance_record, make_study, template_pixels

    from db import migrate
    from db import repository as repo
    from db.engine import session_scope
    from model.inference import load_predictor
    from worker.config import WorkerConfig
    from worker.pipeline import run_study

    if not SHARED.is_dir():
        print("needs ../shared/data")
        return 2
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="pneumo-stages-"))
    url = f"sqlite:///{work / 'pneumo.db'}"
    migrate.upgrade(url)
    config = WorkerConfig(database_url=url, broker_url="redis://127.0.0.1:1/0",
                          data_dir=work, results_dir=work / "results")  # fmt: skip
    pixels = template_pixels(args.size)
    queued = []
    for _ in range(args.studies + 1):  # the first one warms up
        ds = make_study(pixels)
        path = work / "spool" / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        with session_scope(url) as session:
            repo.record_instance(session, instance_record(ds, path, "BENCH"))
            queued.append(repo.mark_study_queued(session, str(ds.StudyInstanceUID),
                                                 amended=False))  # fmt: skip
    predictor = load_predictor()
    run_study(config, *queued[0], predictor=predictor)
    totals: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    for study_id, revision in queued[1:]:
        outcome = run_study(config, study_id, revision, predictor=predictor)
        for stage, seconds in outcome.timings.items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    n = len(queued) - 1
    wall, cpu = (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n
    print(
        f"pipeline per study, {args.size}x{args.size} single-image DX, {n} studies, "
        f"torch {args.threads} thread(s), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(f"wall {wall * 1e3:.1f} ms, CPU {cpu * 1e3:.1f} ms")
    for stage, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {stage:14s} {seconds / n * 1e3:7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
