"""Stage 8, deliver: C-STORE of a stored result to a peer, recorded once per destination."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event
from sqlalchemy import select

from db.engine import session_scope
from db.models import Delivery, DeliveryStatus, Result
from dicom_io.config import Destination
from tests.worker.studies import CXR, FakePrediction, FakePredictor, record_study, worker_config
from worker.config import WorkerConfig
from worker.delivery import NO_FILES_ERROR, deliver, result_files
from worker.pipeline import run_study

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture
def peer() -> Iterator[tuple[Destination, list[Dataset]]]:
    """A Storage SCP on an ephemeral local port that keeps what it receives."""
    received: list[Dataset] = []

    def on_store(event: Event) -> int:
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="PEER")
    for sop_class in (SR_CLASS, SC_CLASS):
        ae.add_supported_context(sop_class)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    try:
        yield Destination("PEER", "127.0.0.1", server.server_address[1]), received
    finally:
        server.shutdown()


@pytest.fixture
def stored(tmp_path: Path, dicom_data: Path) -> tuple[WorkerConfig, int, tuple[Path, ...]]:
    config = worker_config(tmp_path, send_backoff_seconds=0.1)
    study = record_study(config, [CXR], age="006Y")
    fake = FakePredictor(verdict=lambda image: FakePrediction(0.8))
    outcome = run_study(config, study.study_id, study.revision, predictor=fake)
    return config, outcome.result_id, outcome.files


def _delivery(config: WorkerConfig) -> Delivery:
    with session_scope(config.database_url) as session:
        row = session.execute(select(Delivery)).scalar_one()
        session.expunge(row)
        return row


def test_sends_sr_and_sc_once(stored, peer) -> None:  # type: ignore[no-untyped-def]
    config, result_id, files = stored
    destination, received = peer

    first = deliver(config, result_id, str(destination))
    assert first.ok and not first.already_sent and first.error is None
    assert [str(ds.SOPClassUID) for ds in received] == [SR_CLASS, SC_CLASS]
    row = _delivery(config)
    assert row.status is DeliveryStatus.SENT and row.attempts == 1
    with session_scope(config.database_url) as session:
        result = session.get(Result, result_id)
        assert result is not None and f"send:{destination}" in result.timings

    again = deliver(config, result_id, destination)  # a redelivered task
    assert again.ok and again.already_sent and again.delivery_id == first.delivery_id
    assert len(received) == 2 and _delivery(config).attempts == 1


def test_missing_files_are_a_recorded_failure(stored, peer) -> None:  # type: ignore[no-untyped-def]
    config, result_id, files = stored
    for path in files:
        path.unlink()
    assert result_files(config, result_id) == []

    outcome = deliver(config, result_id, peer[0])
    assert not outcome.ok and outcome.error == NO_FILES_ERROR
    row = _delivery(config)
    assert row.status is DeliveryStatus.FAILED and row.last_error == NO_FILES_ERROR


def test_unreachable_peer_is_a_recorded_failure(stored) -> None:  # type: ignore[no-untyped-def]
    config, result_id, _ = stored
    outcome = deliver(config, result_id, "NOBODY@127.0.0.1:9", retries=0)
    assert not outcome.ok and outcome.error
    assert _delivery(config).status is DeliveryStatus.FAILED


def test_result_files_sr_first_and_unknown_result(stored) -> None:  # type: ignore[no-untyped-def]
    config, result_id, files = stored
    assert result_files(config, result_id) == list(files)
    with pytest.raises(LookupError):
        result_files(config, result_id + 1000)


def test_bad_destination_is_refused(stored) -> None:  # type: ignore[no-untyped-def]
    config, result_id, _ = stored
    with pytest.raises(ValueError, match="AE@host:port"):
        deliver(config, result_id, "not a destination")
