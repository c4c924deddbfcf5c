"""Fixtures for the receive side: real listeners, real DCMTK peers, loopback only."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicom_io.config import ListenerConfig
from dicom_io.listener import Listener
from tests.conftest import need_dcmtk
from tests.dicom_receive.dicom_receive_helpers import Collector, StoreSCP


@pytest.fixture
def make_listener(tmp_path: Path) -> Iterator[Callable[..., tuple[Listener, Collector]]]:
    started: list[Listener] = []

    def factory(
        spool: Path | None = None,
        collector: Collector | None = None,
        on_instance: Callable | None = None,
        **overrides,
    ) -> tuple[Listener, Collector]:
        collector = collector or Collector()
        params = dict(
            spool_dir=spool or tmp_path / "spool",
            host="127.0.0.1",
            port=0,
            study_quiet_seconds=0.4,
            study_release_grace_seconds=0.2,
            spool_reserve_bytes=0,
        )
        params.update(overrides)
        listener = Listener(ListenerConfig(**params), collector, on_instance)
        listener.start()
        started.append(listener)
        return listener, collector

    yield factory
    for listener in started:
        listener.stop()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    need_dcmtk("storescp", "echoscu")
    scp = StoreSCP(tmp_path / "pacs").start()
    yield scp
    scp.stop()
