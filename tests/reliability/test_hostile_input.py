"""Hostile input end to end (issue 8, fault suite item 7): a real listener and a real
Celery worker (``pneumo up``) receive tampered and malformed studies; each ends done or
dead-lettered with a reason, or is refused at the door; nothing is stuck, nothing crashes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import RLELossless, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from dicom_io.part10 import encode_file_meta
from tests.dicom_receive.dicom_receive_helpers import (
    DEFLATED,
    deflate_bomb,
    make_instance,
    scu_store,
)
from tests.e2e.conftest import logs
from tests.reliability.stack import TERMINAL, chest, start_stack

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


def _tampered_rle(study_uid: str):  # type: ignore[no-untyped-def]
    """RLE Lossless pixels whose Rows/Columns disagree with the data (pylibjpeg-rle panics)."""
    ds = chest(make_instance(study_uid, rows=64, cols=64))
    ds.PixelData = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64).tobytes()
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.Rows, ds.Columns = 63, 65
    return ds


def _send_bomb(port: int, tmp_path: Path) -> tuple[int, str]:
    ds = make_instance(generate_uid())
    del ds.PixelData
    path = tmp_path / "bomb.dcm"
    meta = encode_file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), DEFLATED, "")
    # < 1 MB sent, 512 MB inflated: beyond the default cap (dicom_io.config)
    path.write_bytes(meta + deflate_bomb(ds, 512 << 20))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(str(ds.SOPClassUID), DEFLATED)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMO")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    return (int(status.Status) if status else -1), str(ds.StudyInstanceUID)


def test_hostile_studies_end_done_or_dead_lettered_with_a_reason(  # type: ignore[no-untyped-def]
    procs, pacs, predictor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Send the bomb's bytes as they are on disk (pynetdicom would inflate it first).
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    stack = start_stack(procs, pacs, tmp_path)
    rle_study, da_study, nul_study, first, second = (generate_uid() for _ in range(5))
    bad_dates = chest(make_instance(da_study, PatientBirthDate="19800231", StudyDate="1980-01-02"))
    nul_ids = chest(make_instance(nul_study, PatientID="PQ\x00771", AccessionNumber="AQ\x0055"))
    original = chest(make_instance(first, seed=1))
    reused = chest(make_instance(second, sop_uid=str(original.SOPInstanceUID), seed=2))

    statuses = scu_store(stack.port, [_tampered_rle(rle_study), bad_dates, nul_ids, original])
    assert statuses == [SUCCESS] * 4
    stack.wait_terminal([rle_study, da_study, nul_study, first])
    assert scu_store(stack.port, [reused]) == [SUCCESS]  # accepted: the bytes are safe
    bomb_status, bomb_study = _send_bomb(stack.port, tmp_path)
    assert bomb_status == OUT_OF_RESOURCES  # refused at the door, never spooled
    rows = stack.wait_terminal([rle_study, da_study, nul_study, first, second])

    assert bomb_study not in rows
    assert not list((stack.data_dir / "spool").glob(f"{bomb_study}*"))
    assert all(row.status in TERMINAL for row in rows.values()), rows
    for uid, row in rows.items():  # a reason wherever there is no result
        assert row.results >= 1 or row.last_error, (uid, row)

    assert rows[rle_study].skip_reasons == ("undecodable:decoder-crashed",), logs(tmp_path)
    assert rows[da_study].results == 1 and rows[da_study].last_error is None, logs(tmp_path)
    assert (rows[nul_study].patient_id, rows[nul_study].accession_number) == ("PQ771", "AQ55")
    # The first study keeps its instance; the second is not given it.
    assert len(rows[first].skip_reasons) == 1 and rows[first].results == 1
    assert rows[second].skip_reasons == ()
    assert all("Traceback" not in (row.last_error or "") for row in rows.values())
    up = procs.started[-1]
    assert up.poll() is None, "pneumo up must survive hostile input\n" + logs(tmp_path)
