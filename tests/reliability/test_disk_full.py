"""A full disk under the spool: failure statuses, never a false Success, and
recovery on its own once space returns (issue 8, fault suite item 5)."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import generate_uid

from dicom_io.config import ListenerConfig
from dicom_io.listener import Listener
from tests.dicom_receive.dicom_receive_helpers import Collector, make_instance, scu_store
from tests.reliability.conftest import fill

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


def _spooled(spool: Path) -> dict[str, int]:
    """SOP Instance UID -> size of each complete instance file in the spool."""
    return {p.stem: p.stat().st_size for p in spool.rglob("*.dcm") if ".incoming" not in p.parts}


def test_full_spool_fails_the_store_and_recovers_when_space_returns(small_fs: Path) -> None:
    spool = small_fs / "spool"
    collector = Collector()
    config = ListenerConfig(
        spool_dir=spool,
        host="127.0.0.1",
        port=0,
        study_quiet_seconds=0.3,
        study_release_grace_seconds=0.1,
        spool_reserve_bytes=0,  # let the kernel's ENOSPC be what stops the write
    )
    study = generate_uid()
    # 1024 x 512 x 16 bit: 1 MiB of pixels per instance.
    datasets = [make_instance(study, rows=1024, cols=512, seed=i) for i in range(4)]
    with Listener(config, collector) as listener:
        ballast = fill(small_fs, leave_bytes=int(1.6 * (1 << 20)))
        first = scu_store(listener.port, datasets)

        assert SUCCESS in first, "the first instance fits and must be stored"
        assert OUT_OF_RESOURCES in first, "a write into a full disk must fail"
        assert set(first) <= {SUCCESS, OUT_OF_RESOURCES}
        stored = _spooled(spool)
        acknowledged = {
            str(d.SOPInstanceUID) for d, s in zip(datasets, first, strict=True) if s == SUCCESS
        }
        # Every Success is a complete file on disk; no failure left a file behind.
        assert set(stored) == acknowledged
        assert all(size > 1 << 20 for size in stored.values())

        ballast.unlink()  # space returns; nobody restarts anything
        retry = [d for d, s in zip(datasets, first, strict=True) if s != SUCCESS]
        second = scu_store(listener.port, retry)
        assert second == [SUCCESS] * len(retry)
        assert set(_spooled(spool)) == {str(d.SOPInstanceUID) for d in datasets}

        ready = collector.wait(1, timeout=10)
        assert {i.sop_instance_uid for i in ready[-1].instances} == {
            str(d.SOPInstanceUID) for d in datasets
        }
