"""C-STORE ingest benchmark: our listener vs Orthanc and DCMTK storescp, same files, same run.

    .venv/bin/python bench/ingest.py [--large 200] [--small 500] [--out bench/results/ingest.txt]

Generates synthetic DX instances in a temporary directory (2048x2048 16-bit,
about 8 MB, and 512x512 16-bit), then sends them with DCMTK ``storescu`` over
one association and over 4 parallel associations (4 storescu processes) to

* ``python -m dicom_io listen`` (our listener: per instance, a pre-created pool
  file written, ``fdatasync``-ed and renamed into place; study assembly), as
  one process (``pneumo``) and with two receiving processes in front of the
  assembling one (``pneumo-2p``: ``--processes 2``, ``PNEUMO_LISTENER_PROCESSES=2``), and
* a private Orthanc (``/usr/sbin/Orthanc``: its own ports and storage and
  index folders in the temporary directory, ``SyncStorageArea`` true, its
  default, so like us it flushes every file before answering Success: one
  ``fdatasync`` per instance, as we do), and
* DCMTK ``storescp`` (writes files, no fsync),

all negotiating the same maximum PDU (128 KiB). Prints MB/s, instances/s,
our/storescp and our/Orthanc ratios and the listener's peak RSS while receiving.

It also measures the cost of the durable commit alone on the same file system
(write a file whose name is already durable, ``fdatasync``, rename): over one
association the sender waits for each C-STORE response, so ``1 / (noop time per
instance + durable commit)`` bounds what any receiver that answers Success only
after the instance is on stable storage can reach.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
MAX_PDU = 131072
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_files(folder: Path, count: int, size: int, parts: int = 4) -> list[Path]:
    """``count`` distinct DX instances of ``size``x``size`` 16-bit, split over ``parts`` folders."""
    rng = np.random.default_rng(size)
    pixels = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    files = []
    for i in range(count):
        ds = Dataset()
        ds.SOPClassUID = DX_STORAGE
        ds.SOPInstanceUID = generate_uid()
        if i % 50 == 0:  # 50 instances per study
            study, series = generate_uid(), generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.Modality = "DX"
        ds.PatientID = "BENCH"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        sub = folder / f"part{i % parts}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


@dataclass
class Run:
    receiver: str
    dataset: str
    associations: int
    instances: int
    mbytes: float
    seconds: float
    peak_rss_mb: float | None
    spread: tuple[float, float] | None = None  # fastest and slowest of repeated runs
    receiver_cpu_ms: float = 0.0  # CPU of the receiver's process tree per instance
    sender_cpu_ms: float = 0.0  # CPU of the storescu senders per instance

    @property
    def mb_s(self) -> float:
        return self.mbytes / self.seconds

    @property
    def inst_s(self) -> float:
        return self.instances / self.seconds


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            try:
                tree = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                return
            time.sleep(0.02)


def wait_echo(port: int, ae: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = subprocess.run(
            ["/usr/bin/echoscu", "-aec", ae, "127.0.0.1", str(port)],
            env=DCMTK_ENV,
            capture_output=True,
        )
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"receiver on port {port} did not answer C-ECHO")


# The floor of any pynetdicom-based receiver: same AE setup and socket reading
# as our listener, but the C-STORE handler writes nothing and answers Success.
_NOOP_SCP = """
import sys
from pynetdicom import AE, evt, ALL_TRANSFER_SYNTAXES
from pynetdicom.sop_class import Verification
from dicom_io.listener import storage_sop_classes
from dicom_io.tuning import server_contexts, tune_allocator, tune_connection
tune_allocator()
ae = AE(ae_title="PNEUMO")
ae.maximum_pdu_size = int(sys.argv[2])
ae.maximum_associations = 8
ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
for uid in storage_sop_classes():
    ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True, contexts=server_contexts(ae),
                evt_handlers=[(evt.EVT_CONN_OPEN, lambda e: tune_connection(e.assoc)),
                              (evt.EVT_C_STORE, lambda e: 0)])
"""


ORTHANC = Path("/usr/sbin/Orthanc")


def orthanc_version() -> str:
    """The first line of ``Orthanc --version`` (e.g. ``Orthanc 1.10.1``)."""
    done = subprocess.run([str(ORTHANC), "--version"], capture_output=True, text=True, timeout=30)
    return "Orthanc " + (done.stdout or done.stderr).splitlines()[0].split()[-1]


def orthanc_config(out: Path, port: int) -> Path:
    """A private Orthanc configuration: storage and index under ``out``, our ports only."""
    config = {
        "Name": "pneumo-bench",
        "StorageDirectory": str(out / "storage"),
        "IndexDirectory": str(out / "index"),
        "StorageCompression": False,
        "SyncStorageArea": True,  # its default since 1.7.4: fsync before Success, like us
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "PNEUMO",
        "DicomPort": port,
        "DicomCheckCalledAeTitle": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {"sender": ["STORESCU", "127.0.0.1", 104]},
        "DicomThreadsCount": 4,
        "MaximumPduLength": MAX_PDU,
        "SaveJobs": False,
        "StableAge": 3600,  # no stable-study processing during the run
    }
    path = out / "orthanc.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def start_receiver(kind: str, out: Path, port: int) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    if kind == "orthanc":
        proc = subprocess.Popen(
            [str(ORTHANC), str(orthanc_config(out, port))],
            cwd=out,
            env=DCMTK_ENV,  # Orthanc's DICOM server is DCMTK's: TCP_NODELAY as for storescp
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_echo(port, "PNEUMO")
    elif kind == "noop":
        proc = subprocess.Popen(
            [sys.executable, "-c", _NOOP_SCP, str(port), str(MAX_PDU)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_echo(port, "PNEUMO")
    elif kind.startswith("pneumo"):
        cmd = [
            sys.executable,
            "-m",
            "dicom_io",
            "listen",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--spool",
            str(out),
            "--max-pdu",
            str(MAX_PDU),
            "--reserve-mb",
            "0",
            "--quiet",
            "2",
            "--max-associations",
            "8",
            "--processes",
            kind.removeprefix("pneumo-").removesuffix("p") if kind != "pneumo" else "1",
        ]
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        line = proc.stdout.readline()  # {"event": "listening", ...}
        assert json.loads(line)["event"] == "listening", line
        wait_echo(port, "PNEUMO")
    else:
        cmd = [
            "/usr/bin/storescp",
            "--fork",
            "+xa",
            "--max-pdu",
            str(MAX_PDU),
            "-aet",
            "PNEUMO",
            "-od",
            str(out),
            str(port),
        ]
        proc = subprocess.Popen(
            cmd, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_echo(port, "PNEUMO")
    return proc


def stop_receiver(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def durable_commit_ms(folder: Path, size: int, repeat: int = 40) -> float:
    """Median ms of the listener's commit for one ``size``-byte file, done serially:
    write a pre-created file (its name made durable beforehand, untimed, as the
    pool does), ``fdatasync`` it, rename it into place."""
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    pooled = [folder / f"{i}.pool" for i in range(repeat)]
    for path in pooled:
        path.touch(0o600)
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    times = []
    for i, path in enumerate(pooled):
        t = time.perf_counter()
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, data)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(path, folder / f"{i}.dcm")
        times.append(time.perf_counter() - t)
    shutil.rmtree(folder, ignore_errors=True)
    return statistics.median(times) * 1e3


def tree_cpu(tree: list[psutil.Process]) -> float:
    """User + system seconds of these processes (one that has exited counts 0)."""
    total = 0.0
    for p in tree:
        try:
            total += sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def run_one(
    kind: str, dataset: str, files: list[Path], folders: list[Path], associations: int, work: Path
) -> Run:
    port = free_port()
    out = work / f"recv-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    proc = start_receiver(kind, out, port)
    sampler = RssSampler(proc.pid) if kind != "storescp" else None
    if sampler:
        sampler.start()
    groups = [folders] if associations == 1 else [[f] for f in folders]
    assert len(groups) == associations
    subprocess.run(["sync"])
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    cpu0 = tree_cpu(tree)
    senders0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    senders = [
        subprocess.Popen(
            [
                "/usr/bin/storescu",
                "-aec",
                "PNEUMO",
                "--max-pdu",
                str(MAX_PDU),
                "+sd",
                "-R",
                "127.0.0.1",
                str(port),
                *map(str, g),
            ],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for g in groups
    ]
    errors = [s.communicate()[1] for s in senders]
    seconds = time.perf_counter() - t0
    receiver_cpu = tree_cpu(tree) - cpu0
    senders1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the senders, now waited for
    sender_cpu = (senders1.ru_utime + senders1.ru_stime) - (senders0.ru_utime + senders0.ru_stime)
    failed = [e for s, e in zip(senders, errors, strict=True) if s.returncode != 0]
    if sampler:
        sampler.stop_flag.set()
        sampler.join()
    stop_receiver(proc)
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0][-500:]}")
    stored = out / "storage" if kind == "orthanc" else out
    received = [p for p in stored.rglob("*") if p.is_file() and ".state" not in p.parts]
    if kind != "noop" and len(received) < len(files):
        raise RuntimeError(f"{kind}: only {len(received)} of {len(files)} files received")
    shutil.rmtree(out, ignore_errors=True)
    mbytes = sum(f.stat().st_size for f in files) / 1e6
    return Run(
        kind,
        dataset,
        associations,
        len(files),
        mbytes,
        seconds,
        sampler.peak / 2**20 if sampler else None,
        receiver_cpu_ms=receiver_cpu * 1e3 / len(files),
        sender_cpu_ms=sender_cpu * 1e3 / len(files),
    )


def median_run(trials: list[Run]) -> Run:
    """The median of repeated runs by time, with the spread and the peak RSS of all."""
    ordered = sorted(trials, key=lambda r: r.seconds)
    mid = ordered[len(ordered) // 2]
    peaks = [r.peak_rss_mb for r in trials if r.peak_rss_mb is not None]
    return Run(
        mid.receiver,
        mid.dataset,
        mid.associations,
        mid.instances,
        mid.mbytes,
        mid.seconds,
        max(peaks) if peaks else None,
        spread=(ordered[0].seconds, ordered[-1].seconds),
        receiver_cpu_ms=mid.receiver_cpu_ms,
        sender_cpu_ms=mid.sender_cpu_ms,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=int, default=200, help="number of 2048x2048 instances")
    parser.add_argument("--small", type=int, default=500, help="number of 512x512 instances")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds per configuration; the table shows the median (default 3)",
    )
    parser.add_argument("--workdir", type=Path, help="temp dir (default: system temp)")
    parser.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the pynetdicom no-op receiver (the floor without any storage)",
    )
    parser.add_argument(
        "--associations",
        default="1,4",
        help="comma-separated association counts to run (default 1,4)",
    )
    parser.add_argument(
        "--processes",
        default="2",
        help="comma-separated receiving-process counts > 1 to run besides one process "
        "(rows pneumo-Np; default 2)",
    )
    args = parser.parse_args(argv)
    processes = [int(n) for n in args.processes.split(",") if n.strip()]
    if any(n < 2 for n in processes):
        print("--processes: counts of 2 or more", file=sys.stderr)
        return 2
    for tool in ("storescu", "storescp", "echoscu"):
        if not Path("/usr/bin", tool).exists():
            print(f"DCMTK {tool} missing", file=sys.stderr)
            return 2
    if not ORTHANC.exists():
        print(f"{ORTHANC} missing (apt-get install orthanc)", file=sys.stderr)
        return 2
    assoc_counts = [int(a) for a in args.associations.split(",") if a.strip()]
    if any(a not in (1, 4) for a in assoc_counts):
        print("--associations: 1 and/or 4", file=sys.stderr)
        return 2

    runs: list[Run] = []
    commit_ms: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="pneumo-bench-") as tmp:
        work = Path(tmp)
        sizes = [("2048x2048", args.large, 2048), ("512x512", args.small, 512)]
        for name, count, size in [s for s in sizes if s[1] > 0]:
            src = work / f"src-{name}"
            t = time.perf_counter()
            files = make_files(src, count, size)
            folders = sorted(p for p in src.iterdir() if p.is_dir())
            print(
                f"generated {count} x {name} ({sum(f.stat().st_size for f in files) / 1e6:.0f} MB)"
                f" in {time.perf_counter() - t:.1f}s",
                file=sys.stderr,
            )
            subprocess.run(["sync"])
            commit_ms[name] = durable_commit_ms(work / "commit-probe", files[0].stat().st_size)
            print(
                f"  durable commit (write a pooled file, fdatasync, rename) of one {name} file: "
                f"{commit_ms[name]:.2f} ms",
                file=sys.stderr,
            )
            for associations in assoc_counts:
                multi = tuple(f"pneumo-{n}p" for n in processes)
                kinds = ("storescp", "orthanc", "noop", "pneumo", *multi)
                if args.no_floor:
                    kinds = ("storescp", "orthanc", "pneumo", *multi)
                # Rounds interleave the receivers so a burst of load from other
                # processes on the machine hits all of them alike; the table
                # reports each receiver's median round (its rows keep this order).
                trials: dict[str, list[Run]] = {kind: [] for kind in kinds}
                for round_no in range(args.repeat):
                    # each round starts with another receiver, so none always runs
                    # right after the same one (its deletions, its disk writeback)
                    shift = round_no % len(kinds)
                    for kind in kinds[shift:] + kinds[:shift]:
                        run = run_one(kind, name, files, folders, associations, work)
                        print(
                            f"  {kind:8s} {name} x{associations} round {round_no + 1}: "
                            f"{run.mb_s:7.1f} MB/s {run.inst_s:7.1f} inst/s",
                            file=sys.stderr,
                        )
                        trials[kind].append(run)
                for kind in kinds:
                    runs.append(median_run(trials[kind]))
            shutil.rmtree(src)

    lines = [
        f"C-STORE ingest, storescu sender, max PDU {MAX_PDU}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {orthanc_version()}",
        "receivers: storescp = DCMTK storescp (no fsync); orthanc = Orthanc, SyncStorageArea "
        "true (one fdatasync of each file before Success, SQLite index); noop = pynetdicom with our AE setup "
        "answering Success without writing (the floor of any pynetdicom receiver); "
        "pneumo = python -m dicom_io listen (write a pooled file, fdatasync, rename; assembly); "
        "pneumo-2p = the same with --processes 2 (two receiving processes, assembly in their "
        "parent); peak RSS and receiver CPU (user + system, per instance) sum a receiver's "
        "process tree; senders CPU is the storescu processes'.",
        "",
        f"each row: median of {args.repeat} interleaved rounds (seconds range = fastest..slowest).",
        "",
        "| dataset | assocs | receiver | instances | MB | seconds | seconds range | MB/s | inst/s | "
        "vs storescp | vs orthanc | peak RSS MB | receiver CPU ms/inst | senders CPU ms/inst |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r.dataset, r.associations): r for r in runs if r.receiver == "storescp"}
    orthanc = {(r.dataset, r.associations): r for r in runs if r.receiver == "orthanc"}
    for r in runs:
        b, o = base[(r.dataset, r.associations)], orthanc[(r.dataset, r.associations)]
        lines.append(
            f"| {r.dataset} | {r.associations} | {r.receiver} | {r.instances} | {r.mbytes:.0f} | "
            f"{r.seconds:.2f} | "
            f"{'' if r.spread is None else f'{r.spread[0]:.2f}..{r.spread[1]:.2f}'} | "
            f"{r.mb_s:.1f} | {r.inst_s:.1f} | {r.inst_s / b.inst_s:.2f} | "
            f"{r.inst_s / o.inst_s:.2f} | "
            f"{'' if r.peak_rss_mb is None else f'{r.peak_rss_mb:.0f}'} | "
            # storescp --fork receives in short-lived children the tree misses
            f"{'' if r.receiver == 'storescp' else f'{r.receiver_cpu_ms:.2f}'} | "
            f"{r.sender_cpu_ms:.2f} |"
        )
    lines.append("")
    lines.append(
        "durable commit alone, serial, same file system (median): "
        + ", ".join(f"{name} {ms:.2f} ms" for name, ms in commit_ms.items())
    )
    for receiver in ("pneumo", *(f"pneumo-{n}p" for n in processes)):
        ours = [r for r in runs if r.receiver == receiver]
        ratios = [(r, r.inst_s / orthanc[(r.dataset, r.associations)].inst_s) for r in ours]
        lines.append("")
        lines.append(
            f"target: {receiver} >= 1.0 x Orthanc instances/s on both sizes, 1 and 4 "
            "associations: "
            + ", ".join(f"{r.dataset} x{r.associations} {ratio:.2f}" for r, ratio in ratios)
            + ("  (met)" if all(ratio >= 1.0 for _, ratio in ratios) else "  (missed)")
            + f"; peak RSS {max((r.peak_rss_mb or 0) for r in ours):.0f} MB"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
