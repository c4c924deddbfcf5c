"""model.guard_check and ``pneumo model guard``: the guard's table for the notebook and the card."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicom_io.pixels import read_luminance_file
from model.card import build_card
from model.guard_check import GuardCheck, GuardOutcome, check_guard, shared_dicom_files
from model.inference import default_weights_path, load_predictor
from tests.conftest import need_shared
from tests.model_evaluation.conftest import CXR_DICOM, OTHER_DICOM
from tests.paths import REPO, SHARED


@pytest.fixture(scope="module")
def predictor():  # type: ignore[no-untyped-def]
    return load_predictor(default_weights_path())


def _small_tree(root: Path) -> Path:
    """dicom/cxr with two real chest files, dicom/other with three non-chest and one broken."""
    (root / "dicom" / "cxr").mkdir(parents=True)
    (root / "dicom" / "other").mkdir(parents=True)
    for src in sorted(CXR_DICOM.glob("*.dcm"))[:2]:
        shutil.copy(src, root / "dicom" / "cxr" / src.name)
    for src in sorted(OTHER_DICOM.glob("*.dcm"))[:3]:
        shutil.copy(src, root / "dicom" / "other" / src.name)
    (root / "dicom" / "other" / "zz-broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1" * 64)
    return root


def test_shared_dicom_files_missing_folder_is_empty(tmp_path: Path) -> None:
    assert shared_dicom_files(tmp_path) == {"cxr": [], "other": [], "animal": []}


def test_shared_files_grouped_by_what_they_show() -> None:
    """By the shared index: NIH chest pixels with altered headers are chest, the cat is apart."""
    need_shared(OTHER_DICOM)
    groups = {k: {p.name for p in v} for k, v in shared_dicom_files(OTHER_DICOM.parents[1]).items()}
    assert {"udacity_aihcnd_test4.dcm", "udacity_aihcnd_test6.dcm"} <= groups["cxr"]
    assert groups["animal"] == {"deid_cat_DX_chest.dcm"}
    assert "CT_small.dcm" in groups["other"] and not groups["other"] & groups["cxr"]


def test_rows_follow_the_guard_and_a_broken_file_is_a_row(predictor, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    calls: list[Path] = []

    def read(path: Path) -> np.ndarray:
        calls.append(path)
        if path.name == "bad.dcm":
            raise OSError("truncated")
        return np.linspace(0.0, 1.0, 256 * 256, dtype=np.float32).reshape(256, 256)

    files = {"other": [tmp_path / "ramp.dcm", tmp_path / "bad.dcm"]}
    check = check_guard(predictor, files, read)
    assert [r.file for r in check.rows] == ["ramp.dcm", "bad.dcm"]
    ramp, bad = check.rows
    direct = predictor.predict([read(tmp_path / "ramp.dcm")])[0]
    assert ramp.ood_score == pytest.approx(direct.ood_score, rel=1e-5)
    assert (ramp.outcome is GuardOutcome.CHEST) == direct.is_chest
    assert bad.outcome is GuardOutcome.UNREADABLE and bad.detail == "OSError"
    assert bad.ood_score is None and check.decoded("other") == (ramp,)
    assert check.threshold == pytest.approx(predictor.info.ood_threshold)


def test_summary_counts_the_rows(predictor, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    need_shared(OTHER_DICOM)
    check = check_guard(predictor, shared_dicom_files(_small_tree(tmp_path)), read_luminance_file)
    assert len(check.rows) == 6
    other = check.decoded("other")
    assert len(other) == 3  # the broken file is counted apart
    summary = check.summary()
    flagged = sum(r.outcome is GuardOutcome.NOT_CHEST for r in other)
    assert summary["dicom/other decodable non-chest flagged"] == f"{flagged} of 3"
    assert summary["files the reader could not decode (not counted)"] == "1"
    assert summary["real chest radiograph DICOMs flagged (should pass)"] == (
        f"{check.flagged('cxr')} of 2"
    )
    assert check.flagged("cxr") == 0  # real chest radiographs pass
    assert check.passed("cxr") == sorted(r.file for r in check.decoded("cxr"))
    assert GuardCheck.from_json(check.to_json()) == check  # what the card reads back


def test_cli_json_feeds_the_model_card(tmp_path: Path) -> None:
    need_shared(OTHER_DICOM)
    data = _small_tree(tmp_path / "data")
    out = tmp_path / "guard.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pneumo.cli",
            "model",
            "guard",
            "--data",
            str(data),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "zz-broken.dcm" in run.stdout and "unreadable" in run.stdout
    written = json.loads(out.read_text())
    assert len(written["rows"]) == 6
    card = build_card(default_weights_path(), {}, ood_check=written)
    assert card["ood_guard"]["check"] == written["summary"]
    flagged = sum(
        r["outcome"] == "not-chest-xray" for r in written["rows"] if r["group"] == "other"
    )
    assert card["targets"]["dicom/other non-chest files flagged"] == {
        "target": ">= 25 of 3",  # the release gate: 25 of the shared folder's 28
        "value": flagged,
        "met": False,
        "missed_by": 25 - flagged,
    }


def test_guard_targets_count_decoded_non_chest_files_and_the_primary_share() -> None:
    from model.card import guard_target_status

    rows = [{"group": "other", "outcome": "not-chest-xray"}] * 25 + [
        {"group": "other", "outcome": "chest"},
        {"group": "other", "outcome": "unreadable"},  # not counted
        {"group": "cxr", "outcome": "chest"},
    ]
    primary = {"n_total": 600, "not_processed": {"not-chest-xray": 7}}
    status = guard_target_status({"rows": rows}, primary)
    assert status["dicom/other non-chest files flagged"] == {
        "target": ">= 25 of 26",
        "value": 25,
        "met": True,
        "missed_by": None,
    }
    share = status["kermany/test radiographs flagged as not a chest"]
    assert share == {"target": "<= 0.01", "value": 0.0117, "met": False, "missed_by": 0.0017}
    assert guard_target_status(None, None) == {}


def test_cli_refuses_a_folder_without_dicom(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pneumo.cli", "model", "guard", "--data", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "no DICOM files" in run.stderr


def test_reference_check_flags_every_development_image_and_passes_a_radiograph(predictor) -> None:  # type: ignore[no-untyped-def]
    from model.guard_check import REFERENCE_GROUP, check_reference
    from model.images import load_image_file
    from model.ood import non_chest_reference_images

    check = check_reference(predictor)
    assert {r.group for r in check.rows} == {REFERENCE_GROUP}
    assert len(check.rows) == len(non_chest_reference_images())
    assert check.flagged(REFERENCE_GROUP) == len(check.rows)  # the shipped model's gate
    summary = check.summary()
    assert summary["development non-chest images flagged"] == f"{len(check.rows)} of 15"
    assert summary["development images that pass the guard"] == "none"

    radiograph = sorted(need_shared(SHARED / "kermany" / "test" / "NORMAL").glob("*.jpeg"))[0]
    (row,) = check_reference(predictor, {"kermany": load_image_file(radiograph)}).rows
    assert row.outcome is GuardOutcome.CHEST


@pytest.mark.parametrize(
    ("weights", "code"), [("pneumonet-2.0.0.pt", 0), ("pneumonet-1.0.0.pt", 1)]
)
def test_reference_gate_fails_a_model_whose_guard_passes_a_development_image(weights, code) -> None:
    """scripts/model-release runs this before kermany/test; 1.0.0 passes one photograph."""
    run = subprocess.run(
        [sys.executable, "-m", "pneumo.cli", "model", "guard", "--reference", "--gate",
         "--model", str(REPO / "model" / "weights" / weights)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == code, run.stderr
    assert ("gate failed: 1 non-chest image(s) pass the guard" in run.stderr) == bool(code)
    assert "development non-chest images flagged: " + ("14" if code else "15") in run.stdout
