"""Cross-study batching on the CPU: images/s through ``BatchingPredictor`` by batch size and window.

K threads (one per study in flight) each submit one image and wait for its
result, again and again, through one :class:`worker.batcher.BatchingPredictor`
around the shipped model (``model.inference.load_predictor``). Rows are the
batcher's ``max_images`` (``PNEUMO_BATCH_SIZE``), columns its ``max_wait_ms``
(``PNEUMO_BATCH_WINDOW_MS``); window 0 is no batching (each call alone, whatever
the batch size). Each cell is the best of ``--rounds`` runs of ``--seconds``,
the rounds interleaved; the settings' default cell is marked ``*`` and compared
with the best.

    .venv/bin/python bench/batching.py                   # ~2.5 min on 2 cores
    .venv/bin/python bench/batching.py --torch-threads 1 # steadier when the cores are shared
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np
import torch

from model.inference import load_predictor
from pneumo.settings import Settings
from worker.batcher import BatchingPredictor

BATCH_SIZES = (1, 2, 4, 8, 16, 32)
WINDOWS_MS = (0.0, 5.0, 10.0, 25.0, 50.0)


def _images(count: int, side: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random((side, side), dtype=np.float32) for _ in range(count)]


def run(
    batcher: BatchingPredictor, images: list[np.ndarray], threads: int, seconds: float
) -> float:
    """Images/s with ``threads`` callers submitting one image each, for ``seconds``."""
    done = [0] * threads
    start = threading.Barrier(threads + 1)
    deadline = [0.0]

    def caller(k: int) -> None:
        start.wait()
        while time.monotonic() < deadline[0]:
            batcher.predict_with_heatmaps([images[k % len(images)]])
            done[k] += 1

    workers = [threading.Thread(target=caller, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    began = time.monotonic()
    deadline[0] = began + seconds
    start.wait()
    for w in workers:
        w.join()
    return sum(done) / (time.monotonic() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=32, help="concurrent callers (K)")
    parser.add_argument("--seconds", type=float, default=1.5, help="per cell and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--side", type=int, default=1024, help="image side (pixels)")
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch CPU threads; 0 = torch's default"
    )
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    defaults = Settings()
    default_cell = (defaults.batch_size, float(defaults.batch_window_ms))
    model = load_predictor()
    images = _images(max(BATCH_SIZES), args.side)
    for batch in BATCH_SIZES:  # the first pass of each batch shape pays for its kernels
        model.predict_with_heatmaps(images[:batch])

    cells = [(0, 0.0)] + [(b, w) for b in BATCH_SIZES for w in WINDOWS_MS if w > 0]
    best: dict[tuple[int, float], float] = {}
    for _ in range(args.rounds):
        for batch, window in cells:
            with BatchingPredictor(model, max_images=max(1, batch), max_wait_ms=window) as b:
                rate = run(b, images, args.threads, args.seconds)
            best[(batch, window)] = max(best.get((batch, window), 0.0), rate)

    load = os.getloadavg()[0]
    print(
        f"batching: {args.threads} threads x 1 image of {args.side}², best of {args.rounds} x "
        f"{args.seconds:g} s; torch threads {torch.get_num_threads()}, load {load:.1f}"
    )
    head = " | ".join(f"{w:g} ms" for w in WINDOWS_MS)
    print(f"| batch | {head} |")
    print("|---:|" + "---:|" * len(WINDOWS_MS))
    top = max(best.values())
    for batch in BATCH_SIZES:
        row = []
        for window in WINDOWS_MS:
            rate = best[(0, 0.0)] if window == 0 else best[(batch, window)]
            mark = "*" if (batch, window) == default_cell else ""
            row.append(f"{rate:.1f}{mark}")
        print(f"| {batch} | " + " | ".join(row) + " |")
    default_rate = best[(0, 0.0)] if default_cell[1] == 0 else best.get(default_cell, float("nan"))
    ratio = default_rate / top
    print(
        f"images/s; 0 ms = no batching (same for every batch size). * = default "
        f"(batch_size {default_cell[0]}, batch_window_ms {default_cell[1]:g}): "
        f"{default_rate:.1f} = {ratio:.2f} of the best {top:.1f}: "
        f"{'met' if ratio >= 0.9 else 'missed'} (target >= 0.90)"
    )


if __name__ == "__main__":
    main()
