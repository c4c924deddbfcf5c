"""dicom_io.receivers: several receiving processes in front of one study assembler.

Real child processes, real associations (DCMTK storescu and pynetdicom), real
signals: a study split over associations that land in different processes is
assembled once, a killed child is replaced without losing an acknowledged
instance, children stop when their listener dies, and one SOP Instance UID is
written by one process at a time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import psutil
import pydicom
import pytest

from dicom_io.assembly import Trigger
from dicom_io.config import ListenerConfig
from dicom_io.spool import _LOCK_BUCKETS, Spool
from pneumo.settings import Settings
from tests.conftest import need_dcmtk
from tests.dicom_receive.dicom_receive_helpers import (
    DCMTK_ENV,
    encode_wire,
    eventually,
    make_instance,
    scu_store,
    write_instance,
)

REPO = Path(__file__).resolve().parents[2]
SUCCESS = 0x0000


def test_processes_are_a_validated_setting(tmp_path: Path) -> None:
    for bad in (0, 33):
        with pytest.raises(ValueError, match="receiving_processes"):
            ListenerConfig(spool_dir=tmp_path, receiving_processes=bad)
    settings = Settings(listener_processes=2, data_dir=tmp_path)
    assert settings.listener_config().receiving_processes == 2


def test_studies_split_over_associations_in_two_processes_are_assembled_once(
    make_listener, tmp_path: Path
) -> None:
    need_dcmtk("storescu")
    # A long quiet window: only the release reports from the children can complete
    # the studies in time.
    listener, ready = make_listener(
        receiving_processes=2, study_quiet_seconds=60, study_release_grace_seconds=0.3
    )
    assert len(listener._receivers.pids) == 2 and os.getpid() not in listener._receivers.pids
    studies = [pydicom.uid.generate_uid() for _ in range(6)]
    halves: list[list[Path]] = [[] for _ in range(8)]
    for n, study in enumerate(studies):
        for part in range(4):  # each study's 4 instances travel on 4 different associations
            ds = make_instance(study, seed=n * 10 + part, rows=256, cols=256)
            halves[(n + part * 2) % 8].append(write_instance(ds, tmp_path / "out" / str(part)))
    senders = [
        subprocess.Popen(
            ["/usr/bin/storescu", "-aec", "PNEUMO", "127.0.0.1", str(listener.port), *map(str, f)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for f in halves
    ]
    assert [p.wait(60) for p in senders] == [0] * 8

    done = ready.wait(len(studies), timeout=30)
    assert sorted(s.study_uid for s in done) == sorted(studies)  # each exactly once...
    assert all(len(s.instances) == 4 for s in done)  # ...and whole
    assert {s.trigger for s in done} == {Trigger.RELEASED}
    time.sleep(0.5)
    assert len(ready.items) == len(studies)  # no second dispatch
    assert listener.stats["stored"] == 24  # counted in the children, reported to the parent
    by_process = listener._receivers.stored_by_process()
    assert sum(by_process.values()) == 24 and len(by_process) == 2


def test_receiving_processes_reject_unknown_calling_ae_titles(make_listener) -> None:
    from pynetdicom import AE

    listener, ready = make_listener(receiving_processes=2, allowed_aets=frozenset({"PACS"}))
    ds = make_instance(pydicom.uid.generate_uid())
    for _ in range(4):  # whichever child takes the association
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="PNEUMO")
        assert assoc.is_rejected
    assert scu_store(listener.port, [ds], calling_ae="PACS") == [SUCCESS]
    assert len(ready.wait(1)) == 1


def _owner_of_one_store(listener) -> int:
    [(pid, _count)] = [(p, c) for p, c in listener._receivers.stored_by_process().items() if c]
    return pid


def test_killed_child_is_replaced_and_its_acknowledged_instances_complete(make_listener) -> None:
    listener, ready = make_listener(
        receiving_processes=2, study_quiet_seconds=1.0, study_release_grace_seconds=0.2
    )
    before = set(listener._receivers.pids)
    study = pydicom.uid.generate_uid()
    first = make_instance(study, seed=1)

    from pynetdicom import AE

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(str(first.SOPClassUID), str(first.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="PNEUMO")
    assert assoc.is_established
    assert int(assoc.send_c_store(first).Status) == SUCCESS  # acknowledged...
    victim = _owner_of_one_store(listener)
    os.kill(victim, signal.SIGKILL)  # ...then its process dies with the association open

    assert eventually(
        lambda: len(listener._receivers.pids) == 2 and victim not in listener._receivers.pids,
        timeout=20,
    ), "the killed receiving process was not replaced"
    assert set(listener._receivers.pids) != before
    [result] = ready.wait(1, timeout=10)  # the quiet window completes the study
    assert [i.sop_instance_uid for i in result.instances] == [str(first.SOPInstanceUID)]
    assert result.instances[0].path.is_file()
    assoc.abort()

    second = make_instance(pydicom.uid.generate_uid(), seed=2)
    assert scu_store(listener.port, [second]) == [SUCCESS]  # still receiving
    assert len(ready.wait(2, timeout=10)) == 2


def test_children_stop_when_their_listener_is_killed(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_io", "listen", "--spool", str(tmp_path / "spool")]
        + ["--port", "0", "--processes", "2"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        event = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
        assert event["event"] == "listening"
        children = psutil.Process(proc.pid).children()
        assert len(children) == 2
        ds = make_instance(pydicom.uid.generate_uid())
        assert scu_store(event["port"], [ds]) == [SUCCESS]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], "receiving processes outlived their listener"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_HOLD = """
import sys, time
from pathlib import Path
from dicom_io.spool import Spool
spool = Spool(Path(sys.argv[1]), clean_incoming=False)
with spool._instance_lock(sys.argv[2]):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def _uid_in_other_bucket(uid: str) -> str:
    bucket = zlib.crc32(uid.encode()) % _LOCK_BUCKETS
    while True:
        other = pydicom.uid.generate_uid()
        if zlib.crc32(other.encode()) % _LOCK_BUCKETS != bucket:
            return other


def test_one_instance_uid_is_written_by_one_process_at_a_time(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root, clean_incoming=False, pooled=True)
    held = make_instance(pydicom.uid.generate_uid(), seed=3)
    free = make_instance(
        pydicom.uid.generate_uid(), sop_uid=_uid_in_other_bucket(str(held.SOPInstanceUID))
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(root), str(held.SOPInstanceUID), "1.5"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"  # type: ignore[union-attr]

        def store(ds) -> float:
            t0 = time.monotonic()
            spool.store(
                encode_wire(ds),
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                calling_aet="TESTSCU",
            )
            return time.monotonic() - t0

        assert store(free) < 1.0  # another UID's lock file: not held up
        assert store(held) > 0.8  # waited for the other process to let go
    finally:
        holder.wait(10)
    assert holder.returncode == 0


def test_unloadable_tls_fails_the_start_at_once_and_leaves_no_process(tmp_path: Path) -> None:
    from dicom_io.config import TLSConfig
    from dicom_io.listener import Listener

    config = ListenerConfig(
        spool_dir=tmp_path / "spool",
        port=0,
        receiving_processes=2,
        tls=TLSConfig(cert_file=tmp_path / "missing.pem", key_file=tmp_path / "missing.key"),
    )
    listener = Listener(config, lambda study: None)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    t0 = time.monotonic()
    with pytest.raises(OSError):
        listener.start()  # as one process would: the certificate cannot be read
    assert time.monotonic() - t0 < 5
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_restart_delay_doubles_while_a_child_keeps_dying_and_resets_once_it_ran() -> None:
    from dicom_io.receivers import restart_delay

    delays = [restart_delay(None, 0.5)]
    for _ in range(8):
        delays.append(restart_delay(delays[-1], 0.5))
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert restart_delay(60.0, 45.0) == 1.0  # it ran long enough: a new incident


def test_a_crash_looping_child_backs_off_while_the_other_keeps_receiving(
    make_listener, caplog
) -> None:
    caplog.set_level("ERROR", logger="dicom_io.receivers")
    listener, ready = make_listener(receiving_processes=2)
    first, other = listener._receivers.pids
    os.kill(first, signal.SIGKILL)
    assert eventually(
        lambda: len(listener._receivers.pids) == 2 and first not in listener._receivers.pids,
        timeout=20,
    ), "the killed receiving process was not replaced"
    [second] = set(listener._receivers.pids) - {other}
    os.kill(second, signal.SIGKILL)  # dies again at once: a crash loop
    assert eventually(lambda: second not in listener._receivers.pids, timeout=10)

    # while the dying one waits for its second restart, the other answers every store
    instance = make_instance(pydicom.uid.generate_uid(), seed=3)
    assert scu_store(listener.port, [instance]) == [SUCCESS]
    assert listener._receivers.stored_by_process().get(other) == 1
    assert eventually(lambda: len(listener._receivers.pids) == 2, timeout=20)
    assert other in listener._receivers.pids
    waits = [
        r.getMessage().rsplit(" in ", 1)[1]
        for r in caplog.records
        if r.name == "dicom_io.receivers" and "starting it again" in r.getMessage()
    ]
    assert waits == ["1 s", "2 s"]
    assert listener.stats["process_restarts"] == 2  # pneumo_listener_process_restarts_total


def test_a_dead_childs_unused_pool_files_are_removed_and_the_others_kept(make_listener) -> None:
    listener, ready = make_listener(receiving_processes=2)
    pool_dir = listener.spool.pool_dir
    # Each child fills its pool on its first write: store until both have written.
    for seed in range(40):
        instance = make_instance(pydicom.uid.generate_uid(), seed=seed)
        assert scu_store(listener.port, [instance]) == [SUCCESS]
        if all(listener._receivers.stored_by_process().values()):
            break
    stored = listener._receivers.stored_by_process()
    assert all(stored.values()), f"every store went to one child: {stored}"
    victim, survivor = stored

    def unused(pid: int) -> list[Path]:
        return [p for p in pool_dir.glob(f"{pid}-*.pool") if p.stat().st_size == 0]

    assert unused(victim) and unused(survivor)  # names tell whose files they are
    written = pool_dir / f"{victim}-{'0' * 32}.pool"  # as if it died between write and rename
    written.write_bytes(b"not empty")
    os.kill(victim, signal.SIGKILL)
    assert eventually(lambda: victim not in listener._receivers.pids, timeout=20)
    assert eventually(lambda: not unused(victim), timeout=10), "the dead child's files stayed"
    assert written.exists()  # a written file is the next start's recovery to judge
    assert unused(survivor)  # the living child's files are its own
    assert eventually(lambda: len(listener._receivers.pids) == 2, timeout=20)
