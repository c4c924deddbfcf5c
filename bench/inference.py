"""CPU throughput of the shipped model: ``Predictor.predict`` vs the bare network forward.

For batch sizes 1, 8 and 32 it times

* ``predict``: the whole ``Predictor.predict()`` call from float32 [0, 1]
  images (preprocessing, forward pass(es), calibration, OOD guard), once with
  images already at the network's input size and once with 1024 x 1024 images
  (a typical DX/CR after ``dicom_io`` decoding), and
* ``forward``: the bare ``torch`` forward of the same network (``predictor.net``)
  on random tensors of the input size, in ``inference_mode``; and the same on
  twice the batch ("x2"): the work of a model whose weights file asks for
  mirror test-time augmentation (pneumonet-1.0.0; 2.0.0 does not), or of a
  two-member ensemble, so "vs x2" tells what such a model would cost,

and prints images/s and the ratio predict / forward (issue 11's target: at
least 0.8; issue 12's: at least 50 images/s from ``predict`` at batch 8). It then
starts a fresh process that loads the model and predicts one batch of 32, and
reports that process's peak RSS.

Run:  .venv/bin/python bench/inference.py [--weights FILE] [--seconds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

BATCH_SIZES = (1, 8, 32)


def _best_rates(
    fns: dict[str, Callable[[], object]], batch: int, rounds: int, round_seconds: float
) -> dict[str, tuple[float, float]]:
    """Best (wall-clock, CPU-time) images/s of each ``fn`` over ``rounds`` rounds.

    One call = ``batch`` images. The functions are interleaved round by round
    and the best round is kept (as ``timeit`` does): other processes on a shared
    2-core machine can only slow a round down, so the best round is the closest
    to the unloaded figure and both sides of each ratio see the same conditions.
    The CPU-time rate (images per CPU-second of this process, all its threads)
    is nearly immune to other processes; with ``--threads 1`` it is the cleanest
    figure on a busy machine.
    """
    calls: dict[str, int] = {}
    for name, fn in fns.items():  # warm-up, and size each round to ~round_seconds
        fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(1, int(round_seconds / max(time.perf_counter() - start, 1e-6)))
    best = {name: (0.0, 0.0) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for _ in range(calls[name]):
                fn()
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            n = calls[name] * batch
            best[name] = (max(best[name][0], n / wall), max(best[name][1], n / max(cpu, 1e-9)))
    return best


def _child_rss(weights: Path, threads: int) -> dict:
    """Peak RSS of a fresh process holding the model (after one predict of 32 images)."""
    # VmHWM (peak resident set) of /proc/self/status belongs to the address space,
    # which exec() replaces -- unlike getrusage's ru_maxrss, which a child inherits
    # from the (large) benchmark process that forked it.
    code = f"""
import json, sys, time
sys.path.insert(0, {str(REPO)!r})
def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
import numpy as np, torch
if {threads} > 0:
    torch.set_num_threads({threads})
base = hwm_kb()
from model.inference import load_predictor
t = time.perf_counter()
p = load_predictor({str(weights)!r})
load_s = time.perf_counter() - t
loaded = hwm_kb()
rng = np.random.default_rng(0)
images = [rng.random((1024, 1024), dtype=np.float32) for _ in range(32)]
p.predict(images)
peak = hwm_kb()
print(json.dumps({{"python_torch_kb": base, "loaded_kb": loaded, "peak_kb": peak,
                   "load_seconds": load_s, "input_mb": 32 * 1024 * 1024 * 4 / 1e6}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, help="weights file (default: the shipped one)")
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="timing budget per cell, split over the rounds"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per cell")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from model.inference import default_weights_path, load_predictor

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    weights = args.weights or default_weights_path()
    predictor = load_predictor(weights, device="cpu")
    net = predictor.net  # the very network predict() runs, already in eval mode
    size = int(predictor.info.input_size)
    rng = np.random.default_rng(0)
    load0 = os.getloadavg()

    print(
        f"model {predictor.info.name} {predictor.info.version}  weights {weights.name} "
        f"({weights.stat().st_size / 1e6:.1f} MB)  input {size}x{size}"
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu, "
        f"network parameters {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M"
    )
    print()
    # forward: bare network on the batch; forward x2: on batch + its mirror, the work
    # predict() does for its test-time augmentation; ratio = predict / forward (the
    # issue's figure); vs x2 = predict / forward x2 (overhead beyond the network).
    header = (
        f"{'batch':>5} | {'forward img/s':>13} | {'forward x2 img/s':>16} | "
        f"{'predict img/s':>13} | {'ratio':>5} | {'vs x2':>5} | "
        f"{'predict@1024²':>14} | {'ratio':>5}"
    )
    print(header)
    print("-" * len(header))
    cpu_lines = []
    for batch in BATCH_SIZES:
        x = torch.randn(batch, 1, size, size)
        x2 = torch.randn(2 * batch, 1, size, size)
        small = [rng.random((size, size), dtype=np.float32) for _ in range(batch)]
        large = [rng.random((1024, 1024), dtype=np.float32) for _ in range(batch)]

        def forward(t: torch.Tensor = x) -> None:
            with torch.inference_mode():
                net(t)

        rates = _best_rates(
            {
                "forward": forward,
                "forward_x2": lambda x2=x2: forward(x2),
                "small": lambda small=small: predictor.predict(small),
                "large": lambda large=large: predictor.predict(large),
            },
            batch,
            args.rounds,
            args.seconds / args.rounds,
        )
        for clock, lines in ((0, None), (1, cpu_lines)):
            fwd = rates["forward"][clock]
            fwd2 = rates["forward_x2"][clock]  # counted per original image (batch per call)
            small_r, large_r = rates["small"][clock], rates["large"][clock]
            line = (
                f"{batch:>5} | {fwd:>13.1f} | {fwd2:>16.1f} | {small_r:>13.1f} | "
                f"{small_r / fwd:>5.2f} | {small_r / fwd2:>5.2f} | "
                f"{large_r:>14.1f} | {large_r / fwd:>5.2f}"
            )
            if lines is None:
                print(line, flush=True)
            else:
                lines.append(line)
    print("\nthe same, per CPU-second of this process (insensitive to other load):")
    print(header)
    print("-" * len(header))
    print("\n".join(cpu_lines))
    load = os.getloadavg()
    print(
        f"\nload average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        f"(at the start {load0[0]:.2f}); figures are the best of {args.rounds} interleaved "
        "rounds"
    )

    rss = _child_rss(weights, args.threads)
    print()
    print(
        f"fresh process: python+numpy+torch {rss['python_torch_kb'] / 1024:.0f} MiB, "
        f"after load_predictor {rss['loaded_kb'] / 1024:.0f} MiB "
        f"(load {rss['load_seconds']:.2f} s), peak after predict(32 x 1024^2 float32, "
        f"{rss['input_mb']:.0f} MB of input) {rss['peak_kb'] / 1024:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
