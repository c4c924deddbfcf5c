"""Stage 1 with a pixel source: purged instance files fetched back from ``dcmqrscp``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from db import repository as repo
from db.engine import session_scope
from db.models import Instance, SelectionStatus
from dicom_io.retrieve import PacsAddress, RetrieveMethod
from tests.conftest import free_port
from tests.retrieve.conftest import DcmQrScp
from tests.worker.studies import CXR, record_study, worker_config
from worker.stages.load import PixelSource, PixelsUnavailableError, load_study


def _purge(config, study) -> None:  # type: ignore[no-untyped-def]
    """What ``pneumo purge`` leaves: files gone, rows marked."""
    with session_scope(config.database_url) as session:
        files = repo.study_files(session, study.study_id)
        assert files is not None
        uids = [f.sop_instance_uid for f in files.instances]
    for path in study.paths:
        path.unlink()
    with session_scope(config.database_url) as session:
        repo.mark_pixels_purged(session, study.study_id, uids)


def _rows(config, study_id: int) -> list[tuple[str, SelectionStatus, str | None]]:  # type: ignore[no-untyped-def]
    with session_scope(config.database_url) as session:
        return [
            (str(path), selection, reason)
            for path, selection, reason in session.execute(
                select(Instance.path, Instance.selection, Instance.skip_reason)
                .where(Instance.study_id == study_id)
                .order_by(Instance.id)
            ).all()
        ]


def test_purged_files_are_retrieved_by_c_get_and_recorded(
    tmp_path: Path, dcmqrscp: Callable[..., DcmQrScp]
) -> None:
    config = worker_config(tmp_path)
    study = record_study(config, [CXR, CXR], age="006Y")
    pacs = dcmqrscp(list(study.paths))
    _purge(config, study)
    source = PixelSource(config.data_dir / "spool", pacs.address, RetrieveMethod.GET)

    loaded = load_study(config.database_url, study.study_id, study.revision, source=source)

    assert all(i.dataset is not None and i.skip_reason is None for i in loaded.instances)
    rows = _rows(config, study.study_id)
    for (path, selection, reason), instance in zip(rows, loaded.instances, strict=True):
        assert Path(path).is_file() and path == instance.path
        assert path not in map(str, study.paths)  # the spool layout: study/series/sop.dcm
        assert (selection, reason) == (SelectionStatus.PENDING, None)
    # Nothing missing any more: a second load retrieves nothing and reads the same files.
    again = load_study(config.database_url, study.study_id, study.revision, source=source)
    assert [i.path for i in again.instances] == [i.path for i in loaded.instances]


def test_without_a_pacs_a_missing_file_fails_the_study(tmp_path: Path) -> None:
    config = worker_config(tmp_path)
    study = record_study(config, [CXR, CXR])
    study.paths[0].unlink()
    source = PixelSource.from_config(config)
    assert source.pacs is None
    with pytest.raises(PixelsUnavailableError, match="1 of 2 instance file.*no PACS configured"):
        load_study(config.database_url, study.study_id, study.revision, source=source)


def test_a_pacs_that_is_down_or_lacks_the_files_fails_the_study(
    tmp_path: Path, dcmqrscp: Callable[..., DcmQrScp]
) -> None:
    config = worker_config(tmp_path, pacs=None)
    study = record_study(config, [CXR])
    empty = dcmqrscp([])  # knows nothing of the study
    _purge(config, study)
    lacking = PixelSource(config.data_dir / "spool", empty.address)
    with pytest.raises(PixelsUnavailableError, match=r"1 not retrieved .*not on the PACS"):
        load_study(config.database_url, study.study_id, study.revision, source=lacking)

    down = PixelSource(
        config.data_dir / "spool",
        PacsAddress("PACS", "127.0.0.1", free_port()),
        timeout_seconds=2,
    )
    with pytest.raises(PixelsUnavailableError, match="retrieval failed: association with PACS"):
        load_study(config.database_url, study.study_id, study.revision, source=down)
    assert _rows(config, study.study_id)[0][2] == repo.PIXELS_PURGED  # nothing recorded


def test_pixel_source_from_config(tmp_path: Path) -> None:
    from dicom_io.config import Destination

    config = worker_config(
        tmp_path, pacs=Destination.parse("PACS@10.0.0.9:104"), retrieve_method="move"
    )
    source = PixelSource.from_config(config)
    assert str(source.pacs) == "PACS@10.0.0.9:104"
    assert source.method is RetrieveMethod.MOVE
    assert source.spool_dir == config.data_dir / "spool"
    assert source.ae_title == config.ae_title
    with pytest.raises(ValueError, match="retrieve_method"):
        worker_config(tmp_path, retrieve_method="fetch")


def test_settings_plumb_the_pacs_into_the_worker(tmp_path: Path) -> None:
    from pneumo.settings import load_settings

    settings = load_settings(
        data_dir=tmp_path, pacs="PACS@pacs.example:11112", retrieve_method="move"
    )
    config = settings.worker_config()
    assert str(config.pacs) == "PACS@pacs.example:11112"
    assert (config.retrieve_method, config.spool_dir) == ("move", settings.spool_dir)
    assert load_settings(data_dir=tmp_path, pacs="").worker_config().pacs is None
    with pytest.raises(ValueError, match="PNEUMO_PACS"):
        load_settings(data_dir=tmp_path, pacs="PACS@pacs.example")
