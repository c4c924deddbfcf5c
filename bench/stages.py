"""CPU of one study through the worker's pipeline, in-process, per stage.

    .venv/bin/python bench/stages.py [--studies 24] [--size 2048] [--threads 1]
                                     [--precision auto] [--agreement 0]

Builds one synthetic single-image DX study (pixels from a real Kermany chest
X-ray, as ``bench/e2e.py``), records it ``--studies`` times in a throwaway
SQLite database as the listener would, and runs
:func:`worker.pipeline.run_study` on each with the shipped model (torch at
``--threads``, 1 as in a prefork worker on 2 cores). Prints the wall and CPU
seconds per study and the mean of each stage timing the pipeline stores on
the result row. No broker, listener or network: the worker's own work only
(sending the results back is not included).

``--precision`` runs the model as ``PNEUMO_INFERENCE_PRECISION`` would
(:mod:`model.precision`). ``--agreement N`` also compares it with float32 on
the first N kermany/test images of each class, through ``Predictor.predict``:
the largest and mean difference of the calibrated probabilities and how many
images change side of the model's threshold.

Needs ../shared/data (one Kermany image; N per class for ``--agreement``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--precision", default="auto", help="auto, float32, float16, bfloat16")
    parser.add_argument(
        "--agreement", type=int, default=0, help="kermany/test images per class to compare"
    )
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
                          data_dir=work, results_dir=work / "results",
                          inference_precision=args.precision)  # fmt: skip
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
    predictor = load_predictor(precision=config.inference_precision)
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
        f"torch {args.threads} thread(s), {predictor.info.precision}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(f"wall {wall * 1e3:.1f} ms, CPU {cpu * 1e3:.1f} ms")
    for stage, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {stage:14s} {seconds / n * 1e3:7.1f} ms")
    if args.agreement:
        agreement(predictor, args.agreement)
    return 0


def agreement(predictor: Any, per_class: int) -> None:
    """Print how ``predictor``'s probabilities differ from float32's on kermany/test images."""
    import numpy as np
    from e2e import SHARED

    from model.images import load_image_file
    from model.inference import Predictor, default_weights_path

    files = [
        f
        for label in ("NORMAL", "PNEUMONIA")
        for f in sorted((SHARED / "kermany" / "test" / label).glob("*.jpeg"))[:per_class]
    ]
    reference = Predictor(default_weights_path(), precision="float32")  # the shipped weights
    ours, theirs = [], []
    for i in range(0, len(files), 8):
        images = [load_image_file(f) for f in files[i : i + 8]]
        ours += [p.probability for p in predictor.predict(images)]
        theirs += [p.probability for p in reference.predict(images)]
    diff = np.abs(np.array(ours) - np.array(theirs))
    threshold = predictor.info.threshold
    flips = sum((a >= threshold) != (b >= threshold) for a, b in zip(ours, theirs, strict=True))
    print(
        f"{predictor.info.precision} vs float32 on {len(files)} kermany/test images: "
        f"probability |difference| max {diff.max():.4f}, mean {diff.mean():.4f}; "
        f"{flips} image(s) on the other side of the threshold {threshold:.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())
