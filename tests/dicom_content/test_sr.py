"""The result SR: highdicom TID 1500, valid per dciodvfy, readable by dsrdump and a DCMTK PACS."""

from __future__ import annotations

import copy
import logging
import math
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_io.sr import AlgorithmInfo, ImageFinding, build_result_sr, result_sr_uid
from dicom_io.uids import is_valid_uid
from tests.paths import DICOM_DATA

CXR = DICOM_DATA / "cxr"
OTHER = DICOM_DATA / "other"

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

ALGORITHM = AlgorithmInfo(
    name="pneumo-cnn",
    version="1.4.2",
    manufacturer="Pneumo Project",
    model_name="PneumoNet-CXR",
    parameters={"input_size": "224", "threshold": "0.42"},
)


def _header(path: Path) -> Dataset:
    if not path.is_file():
        pytest.skip(f"shared file {path.name} not present")
    return pydicom.dcmread(path, stop_before_pixels=True)


@pytest.fixture()
def rg1() -> Dataset:
    """A MONOCHROME1 CR PA chest (one image study)."""
    return _header(CXR / "RG1_UNCR.dcm")


@pytest.fixture()
def dx_study() -> list[Dataset]:
    """Three real headers made into one study: two 8-bit DX chests and a CT (evidence, not read)."""
    first = _header(CXR / "udacity_aihcnd_test2.dcm")
    others = [_header(CXR / "udacity_aihcnd_test3.dcm"), _header(OTHER / "CT_small.dcm")]
    for ds in others:
        for kw in (
            "StudyInstanceUID",
            "PatientID",
            "PatientName",
            "PatientBirthDate",
            "PatientSex",
            "AccessionNumber",
            "StudyDate",
            "StudyTime",
            "StudyID",
        ):
            if kw in first:
                setattr(ds, kw, first[kw].value)
            elif kw in ds:
                delattr(ds, kw)
    return [first, *others]


def dciodvfy_errors(ds: Dataset) -> list[str]:
    """dciodvfy's error lines for ``ds`` (every SR built in these tests must have none)."""
    tool = Path("/usr/bin/dciodvfy")
    if not tool.is_file():
        pytest.skip("dciodvfy not installed")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "obj.dcm"
        ds.save_as(path, enforce_file_format=True)
        done = subprocess.run([str(tool), str(path)], capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    assert not any(line.startswith("Abort") for line in lines), lines
    return [line for line in lines if line.startswith("Error")]


def _build(
    evidence: list[Dataset], probs: list[float], threshold: float = 0.42, **kw: object
) -> Dataset:
    findings = [ImageFinding(ds, p, threshold) for ds, p in zip(evidence, probs, strict=False)]
    args = dict(
        evidence=evidence,
        findings=findings,
        algorithm=ALGORITHM,
        revision=1,
        summary="Pneumonia suspected (AI, unverified).",
    )
    args.update(kw)
    sr = build_result_sr(**args)  # type: ignore[arg-type]
    assert dciodvfy_errors(sr) == []
    return sr


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _walk(items: object) -> Iterator[Dataset]:
    for item in items or []:  # type: ignore[union-attr]
        yield item
        yield from _walk(item.get("ContentSequence"))


def _meaning(item: Dataset) -> str:
    return (
        str(item.ConceptNameCodeSequence[0].CodeMeaning)
        if "ConceptNameCodeSequence" in item
        else ""
    )


def _groups(sr: Dataset) -> list[dict[str, object]]:
    """Per Measurement Group: referenced image, finding value, probability, threshold."""
    out = []
    for item in _walk(sr.ContentSequence):
        if item.ValueType == "CONTAINER" and _meaning(item) == "Measurement Group":
            group: dict[str, object] = {}
            for child in item.ContentSequence:
                name = _meaning(child)
                if child.ValueType == "IMAGE":
                    group["image"] = str(child.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                elif child.ValueType == "CODE" and name == "Pneumonia":
                    group["value"] = str(child.ConceptCodeSequence[0].CodeValue)
                elif child.ValueType == "CODE" and name == "Finding":
                    group["finding"] = str(child.ConceptCodeSequence[0].CodeValue)
                elif child.ValueType == "NUM":
                    group[name] = float(child.MeasuredValueSequence[0].NumericValue)
            out.append(group)
    return out


def test_valid_per_dciodvfy_mono1_cr(rg1: Dataset, tmp_path: Path, dciodvfy) -> None:
    sr = _build([rg1], [0.73], flags=["outside-intended-use"])
    errors, _warnings = dciodvfy(_save(sr, tmp_path / "sr.dcm"))
    assert errors == []


def test_valid_per_dciodvfy_dx_study(dx_study: list[Dataset], tmp_path: Path, dciodvfy) -> None:
    sr = _build(dx_study, [0.9, 0.1])  # the CT is evidence only
    errors, _warnings = dciodvfy(_save(sr, tmp_path / "sr.dcm"))
    assert errors == []


def test_no_findings_refused(dx_study: list[Dataset]) -> None:
    # No image was read: there is nothing to report in TID 1500 groups.
    with pytest.raises(ValueError):
        _build(dx_study, [])


def test_headers_without_patient_attributes(tmp_path: Path, dciodvfy) -> None:
    # The NIH DICOM lacks Patient Birth Date, Accession Number, Study Date/Time/ID.
    src = _header(
        CXR / "nih_gcp_1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm"
    )
    assert "StudyDate" not in src and "AccessionNumber" not in src
    sr = _build([src], [0.2])
    assert sr.PatientID == src.PatientID and sr.StudyDate in ("", None)
    errors, _ = dciodvfy(_save(sr, tmp_path / "sr.dcm"))
    assert errors == []


def test_non_image_evidence_and_unicode(dx_study: list[Dataset], tmp_path: Path, dciodvfy) -> None:
    # An SR already in the study is evidence too (not an image: no library entry).
    other_sr = _header(OTHER / "test-SR.dcm")
    other_sr.StudyInstanceUID = dx_study[0].StudyInstanceUID
    for ds in dx_study:
        ds.PatientName = "Müller^Jürgen"
    sr = _build(
        [*dx_study, other_sr],
        [0.6, 0.2],
        summary="Pneumonie vermutet (p ≥ Schwelle).",
        flags=["", "outside-intended-use"],
    )
    path = _save(sr, tmp_path / "sr.dcm")
    errors, _ = dciodvfy(path)
    assert errors == []
    back = pydicom.dcmread(path)
    assert str(back.PatientName) == "Müller^Jürgen"
    texts = [str(i.TextValue) for i in _walk(back.ContentSequence) if i.ValueType == "TEXT"]
    assert any("≥" in t for t in texts) and "outside-intended-use" in texts and "" not in texts


def test_dsrdump_shows_finding_and_probability(rg1: Dataset, tmp_path: Path, run_tool) -> None:
    sr = _build([rg1], [0.7315], flags=["outside-intended-use"])
    done = run_tool("dsrdump", _save(sr, tmp_path / "sr.dcm"))
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "233604007" in text and '"Pneumonia"' in text
    assert '(52101004,SCT,"Present")' in text
    assert '"Probability")="0.7315"' in text
    assert '"Threshold Value")="0.42"' in text
    assert "UNVERIFIED" in text and "COMPLETE" in text
    assert "outside-intended-use" in text
    assert '"Device Observer Model Name")="PneumoNet-CXR"' in text


def test_groups_reference_their_images(dx_study: list[Dataset]) -> None:
    sr = _build(dx_study, [0.9, 0.1])
    groups = _groups(sr)
    assert len(groups) == 2
    by_image = {g["image"]: g for g in groups}
    a, b = (str(ds.SOPInstanceUID) for ds in dx_study[:2])
    assert by_image[a]["value"] == "52101004" and by_image[a]["Probability"] == pytest.approx(0.9)
    assert by_image[b]["value"] == "272519000" and by_image[b]["Probability"] == pytest.approx(0.1)
    assert all(
        g["finding"] == "233604007" and g["Threshold Value"] == pytest.approx(0.42) for g in groups
    )
    # Every evidence object is listed in the evidence sequence, the CT too.
    listed = {
        str(inst.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    }
    assert listed == {str(ds.SOPInstanceUID) for ds in dx_study}


def test_same_patient_and_study_new_series(dx_study: list[Dataset]) -> None:
    sr = _build(dx_study, [0.5, 0.5])
    src = dx_study[0]
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.Modality == "SR"
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    assert sr.PatientID == src.PatientID
    assert str(sr.get("PatientName") or "") == str(src.get("PatientName") or "")
    assert sr.PatientSex == src.PatientSex
    assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in dx_study}
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert sr.Manufacturer == "Pneumo Project" and sr.ManufacturerModelName == "PneumoNet-CXR"
    assert str(sr.SoftwareVersions) == "1.4.2"


def test_deterministic_uid(rg1: Dataset) -> None:
    a = _build([rg1], [0.3])
    b = _build([copy.deepcopy(rg1)], [0.8])  # a re-send with a new result replaces the old object
    assert a.SOPInstanceUID == b.SOPInstanceUID == result_sr_uid(rg1.StudyInstanceUID, "1.4.2", 1)
    assert is_valid_uid(a.SOPInstanceUID)
    assert _build([rg1], [0.3], revision=2).SOPInstanceUID != a.SOPInstanceUID
    assert result_sr_uid(rg1.StudyInstanceUID, "1.4.3", 1) != a.SOPInstanceUID
    assert a.SeriesInstanceUID == _build([rg1], [0.3], revision=2).SeriesInstanceUID


def test_long_identity_strings_stay_valid(rg1: Dataset) -> None:
    # Model versions such as "1.4.2+sha256:<64 hex>" exceed LO's 64 characters.
    long = AlgorithmInfo(
        name="n" * 80,
        version="1.4.2+" + "f" * 70,
        manufacturer="M\\x" * 30,
        model_name="m" * 90,
        parameters={"k": "v" * 300},
    )
    sr = _build([rg1], [0.5], algorithm=long)  # _build asserts zero dciodvfy errors
    assert len(str(sr.SoftwareVersions)) <= 64


def test_threshold_boundary_and_present_property(rg1: Dataset) -> None:
    assert ImageFinding(rg1, 0.42, 0.42).present
    assert not ImageFinding(rg1, 0.4199, 0.42).present
    assert _groups(_build([rg1], [0.42]))[0]["value"] == "52101004"


@pytest.mark.parametrize("prob", [math.nan, -0.1, 1.5, math.inf])
def test_bad_probability_refused(rg1: Dataset, prob: float) -> None:
    with pytest.raises(ValueError):
        ImageFinding(rg1, prob, 0.5)


def test_inconsistent_inputs_refused(rg1: Dataset, dx_study: list[Dataset]) -> None:
    def build(evidence: list[Dataset], findings: list[ImageFinding]) -> None:
        build_result_sr(
            evidence=evidence, findings=findings, algorithm=ALGORITHM, revision=0, summary="x"
        )

    with pytest.raises(ValueError, match="source image must be in the evidence"):
        build(dx_study, [ImageFinding(rg1, 0.5, 0.5)])
    with pytest.raises(ValueError, match="studies"):
        build([rg1, dx_study[0]], [ImageFinding(rg1, 0.5, 0.5)])
    with pytest.raises(ValueError, match="evidence"):
        build([], [])
    with pytest.raises(ValueError):
        AlgorithmInfo(name="", version="1", manufacturer="m", model_name="n", parameters={})


def test_no_patient_name_in_warnings(dx_study: list[Dataset]) -> None:
    for ds in dx_study:
        ds.PatientName = "Zyxwvut"  # single component: highdicom warns and quotes it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _build(dx_study, [0.5, 0.5])
    assert not [w for w in caught if "Zyxwvut" in str(w.message)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dcmtk_pacs_accepts_sr_and_dsrdump_reads_it(
    dx_study: list[Dataset], tmp_path: Path, run_tool
) -> None:
    """Send the SR with DCMTK storescu to a DCMTK storescp standing in for the PACS."""
    sr = _build(dx_study, [0.81, 0.12], flags=["outside-intended-use"])
    path = _save(sr, tmp_path / "sr.dcm")
    inbox = tmp_path / "pacs"
    inbox.mkdir()
    port = _free_port()
    env = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}
    scp = subprocess.Popen(
        ["/usr/bin/storescp", "-aet", "PACS", "-od", str(inbox), str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # wait for the PACS to listen
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.05)
        done = run_tool(
            "storescu", "-R", "-aet", "PNEUMO", "-aec", "PACS", "127.0.0.1", str(port), path
        )
        assert done.returncode == 0, done.stderr[-800:]
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    received = list(inbox.iterdir())
    assert len(received) == 1
    back = pydicom.dcmread(received[0])
    assert back.SOPInstanceUID == sr.SOPInstanceUID
    dump = run_tool("dsrdump", received[0])
    assert dump.returncode == 0
    assert '"Probability")="0.81"' in dump.stdout and '"Probability")="0.12"' in dump.stdout
    assert '(52101004,SCT,"Present")' in dump.stdout and '(272519000,SCT,"Absent")' in dump.stdout


def test_sr_builds_from_invalid_dates_and_nul_in_ids(
    rg1: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    """Birth date 19800231 and a NUL in Patient ID must not fail the SR build (issue 8),
    nor reach a log line; the source data set is left as read."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    def raw(tag: int, vr: str, value: bytes) -> None:
        rg1[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)

    raw(0x00100030, "DA", b"19800231")
    raw(0x00080020, "DA", b"1980-01-02")
    raw(0x00100020, "LO", b"PAT\x0017")
    raw(0x00080050, "SH", b"ACC\x00\x0042")
    caplog.set_level(logging.DEBUG)
    sr = _build([rg1], [0.7])
    assert sr.PatientBirthDate in (None, "") and sr.StudyDate in (None, "")
    assert sr.PatientID == "PAT17" and sr.AccessionNumber == "ACC42"
    for value in ("19800231", "1980-01-02"):
        assert value not in caplog.text
    assert rg1.get_item(0x00100030).value == b"19800231"


def test_the_image_library_pixel_data_check_is_highdicoms_remembered_per_sop_class() -> None:
    from highdicom._standard_utils import does_iod_have_pixel_data

    from dicom_io.sr import _iod_has_pixel_data

    classes = [
        "1.2.840.10008.5.1.4.1.1.1.1",  # DX, for presentation
        "1.2.840.10008.5.1.4.1.1.1",  # CR
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR: no pixel data
        "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection: no pixel data
    ]
    _iod_has_pixel_data.cache_clear()
    answers = [_iod_has_pixel_data(uid) for uid in classes]
    assert answers == [does_iod_have_pixel_data(uid) for uid in classes]
    assert answers == [True, True, True, False, False]
    assert [_iod_has_pixel_data(uid) for uid in classes] == answers
    assert _iod_has_pixel_data.cache_info().hits == len(classes)
    with pytest.raises(KeyError):  # an unknown SOP Class is an error, and not remembered
        _iod_has_pixel_data("1.2.3.4")
    assert _iod_has_pixel_data.cache_info().currsize == len(classes)
