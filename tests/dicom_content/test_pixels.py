"""Pixel reading: one float32 [0, 1] MONOCHROME2-appearance array, whatever the encoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_io.pixels import PixelErrorKind, PixelReadError, read_pixels, read_pixels_file
from tests.paths import DICOM_DATA

DICOM = DICOM_DATA


def _need(rel: str) -> Path:
    path = DICOM / rel
    if not path.is_file():
        pytest.skip(f"shared file {rel} not present")
    return path


def synthetic(
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    signed: bool = False,
    **attrs: object,
) -> Dataset:
    """A native (uncompressed) little-endian dataset holding ``stored``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits_alloc = stored.dtype.itemsize * 8
    ds.BitsAllocated = bits_alloc
    ds.BitsStored = bits_stored or bits_alloc
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(stored).astype(stored.dtype.newbyteorder("<")).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def test_output_contract_on_real_cxr() -> None:
    arr = read_pixels_file(_need("cxr/RG1_UNCR.dcm"))
    assert arr.dtype == np.float32 and arr.ndim == 2 and arr.shape == (1955, 1841)
    assert arr.min() >= 0.0 and arr.max() <= 1.0 and np.isfinite(arr).all()
    assert arr.flags.c_contiguous


def _mediastinum_minus_lungs(arr: np.ndarray) -> float:
    """Mean of the central column band minus the mean of the two lung bands (middle rows)."""
    h, w = arr.shape
    rows = slice(h * 3 // 10, h * 6 // 10)
    centre = arr[rows, w * 45 // 100 : w * 55 // 100].mean()
    lungs = np.concatenate(
        [
            arr[rows, w * 18 // 100 : w * 32 // 100].ravel(),
            arr[rows, w * 68 // 100 : w * 82 // 100].ravel(),
        ]
    ).mean()
    return float(centre - lungs)


@pytest.mark.parametrize(
    "rel", ["cxr/RG1_UNCR.dcm", "cxr/RG1_J2KI.dcm", "cxr/udacity_aihcnd_test1.dcm"]
)
def test_brighter_is_denser_on_real_chest(rel: str) -> None:
    # On a frontal chest film the mediastinum/spine is denser than the aerated lungs,
    # so it must come out brighter, whether the file is MONOCHROME1 (RG1) or MONOCHROME2.
    arr = read_pixels_file(_need(rel))
    assert _mediastinum_minus_lungs(arr) > 0.1


def test_monochrome1_inverted() -> None:
    stored = np.zeros((4, 4), np.uint16)
    stored[0, 0] = 1000  # the highest stored value is the *whitest* in MONOCHROME2 ...
    mono2 = read_pixels(synthetic(stored, bits_stored=12))
    mono1 = read_pixels(synthetic(stored, photometric="MONOCHROME1", bits_stored=12))
    assert mono2[0, 0] == 1.0 and mono2[1, 1] == 0.0
    assert mono1[0, 0] == 0.0 and mono1[1, 1] == 1.0  # ... and the darkest in MONOCHROME1


def test_linear_window() -> None:
    stored = np.array([[0, 74, 75, 100, 125, 200]], np.uint16)
    out = read_pixels(synthetic(stored, WindowCenter=100, WindowWidth=51))
    # PS3.3 C.11.2.1.2.1: x <= c - 0.5 - (w-1)/2 = 74.5 -> min; x > c - 0.5 + (w-1)/2 = 124.5 -> max;
    # else ((x - (c - 0.5)) / (w-1) + 0.5).
    np.testing.assert_allclose(out[0], [0.0, 0.0, 0.01, 0.51, 1.0, 1.0], atol=1e-6)


def test_window_is_applied_after_rescale() -> None:
    stored = np.array([[0, 50, 100]], np.uint16)
    # Modality values: -1000, 0, 1000. The window is in modality units.
    out = read_pixels(
        synthetic(stored, RescaleSlope=20, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=2001)
    )
    assert out[0, 0] == pytest.approx(0.0, abs=1e-3)
    assert out[0, 1] == pytest.approx(0.5, abs=1e-3)
    assert out[0, 2] == pytest.approx(1.0, abs=1e-3)


def test_modality_lut_sequence_is_applied() -> None:
    stored = np.array([[0, 1, 2, 3]], np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = [0, 100, 110, 120]  # non-linear: a plain stretch of stored values would differ
    out = read_pixels(synthetic(stored, bits_stored=16, ModalityLUTSequence=[item]))
    np.testing.assert_allclose(out[0], [0.0, 100 / 120, 110 / 120, 1.0], atol=1e-6)


def test_zero_rescale_slope_refused() -> None:
    with pytest.raises(PixelReadError) as exc:
        read_pixels(
            synthetic(
                np.arange(4, dtype=np.uint16).reshape(2, 2), RescaleSlope=0, RescaleIntercept=0
            )
        )
    assert exc.value.kind is PixelErrorKind.INVALID_HEADER


def test_sigmoid_window() -> None:
    stored = np.array([[0, 100, 200]], np.uint16)
    out = read_pixels(synthetic(stored, WindowCenter=100, WindowWidth=50, VOILUTFunction="SIGMOID"))
    assert out[0, 1] == pytest.approx(0.5, abs=1e-6)
    assert out[0, 0] < 0.01 and out[0, 2] > 0.99


def test_voi_lut_sequence() -> None:
    stored = np.array([[0, 1, 2, 3, 10]], np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.LUTData = [100, 400, 400, 700]  # 10 is past the end: takes the last entry
    ds = synthetic(stored, VOILUTSequence=[item], WindowCenter=0, WindowWidth=1)
    out = read_pixels(ds)
    np.testing.assert_allclose(out[0], [0.0, 0.5, 0.5, 1.0, 1.0], atol=1e-6)


def test_no_voi_stretches_actual_range() -> None:
    stored = np.array([[100, 150, 200]], np.uint16)
    out = read_pixels(synthetic(stored, bits_stored=16))
    np.testing.assert_allclose(out[0], [0.0, 0.5, 1.0], atol=1e-6)


def test_blank_image_refused() -> None:
    with pytest.raises(PixelReadError) as exc:
        read_pixels(synthetic(np.full((4, 4), 7, np.uint16)))
    assert exc.value.kind is PixelErrorKind.BLANK_IMAGE


def test_decompression_bomb_checked_before_decoding() -> None:
    # The header promises 60000 x 60000 16-bit frames but carries 8 bytes: if anything
    # were decoded we would see "truncated"; the cap must fire first.
    ds = synthetic(np.zeros((2, 2), np.uint16))
    ds.Rows = ds.Columns = 60000
    with pytest.raises(PixelReadError) as exc:
        read_pixels(ds)
    assert exc.value.kind is PixelErrorKind.DECOMPRESSION_BOMB
    # A cap below an ordinary image's size refuses it too; frames count.
    ds = synthetic(np.arange(16, dtype=np.uint16).reshape(4, 4))
    assert read_pixels(ds, max_pixels_bits=4 * 4 * 16).shape == (4, 4)
    with pytest.raises(PixelReadError) as exc:
        read_pixels(ds, max_pixels_bits=4 * 4 * 16 - 1)
    assert exc.value.kind is PixelErrorKind.DECOMPRESSION_BOMB
    ds.NumberOfFrames = 2
    with pytest.raises(PixelReadError):
        read_pixels(ds, max_pixels_bits=4 * 4 * 16)


def test_missing_transfer_syntax_native_is_inferred(tmp_path: Path) -> None:
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8)
    ref = read_pixels(synthetic(stored))
    ds = synthetic(stored)
    del ds.file_meta.TransferSyntaxUID
    ds.set_original_encoding(False, True)
    np.testing.assert_array_equal(read_pixels(ds), ref)
    # The caller's dataset is not modified.
    assert "TransferSyntaxUID" not in ds.file_meta


@pytest.mark.parametrize(
    "rel,kind",
    [
        ("other/MR_truncated.dcm", "truncated"),
        ("other/SC_rgb.dcm", "not-monochrome"),
        ("other/OBXXXX1A_rle.dcm", "not-monochrome"),  # PALETTE COLOR
        ("other/test-SR.dcm", "no-pixel-data"),
        ("other/JPEG-lossy.dcm", "decode-failed"),  # a stream no plugin accepts
        ("other/emri_small_jpeg_2k_lossless_too_short.dcm", "no-pixel-data"),
    ],
)
def test_bad_inputs_have_kinds(rel: str, kind: str) -> None:
    with pytest.raises(PixelReadError) as exc:
        read_pixels_file(_need(rel))
    assert exc.value.kind == kind


def test_tampered_header_value_gives_pixel_read_error() -> None:
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = synthetic(np.arange(16, dtype=np.uint16).reshape(4, 4))
    # A Rescale Slope that is not a number, as a raw element read from a file.
    ds[0x00281053] = RawDataElement(Tag(0x00281053), "DS", 4, b"abc ", 0, True, True)
    with pytest.raises(PixelReadError):
        read_pixels(ds)


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")
    with pytest.raises(PixelReadError):
        read_pixels_file(path)


def test_every_shared_file_reads_or_fails_cleanly() -> None:
    files = sorted(DICOM.glob("*/*.dcm")) if DICOM.is_dir() else []
    if not files:
        pytest.skip("shared DICOM not present")
    read = 0
    for path in files:
        try:
            arr = read_pixels_file(path)
        except PixelReadError as exc:
            assert exc.kind  # a machine-readable reason, nothing else escapes
            continue
        read += 1
        assert arr.dtype == np.float32 and arr.ndim == 2
        assert 0.0 <= float(arr.min()) and float(arr.max()) <= 1.0
    assert read >= 6  # at least every real CXR


def test_big_endian_deflated_implicit_agree() -> None:
    ref = read_pixels_file(_need("other/MR_small.dcm"))
    for rel in ("other/MR_small_bigendian.dcm", "other/MR_small_implicit.dcm"):
        np.testing.assert_array_equal(read_pixels_file(_need(rel)), ref)
    deflated = read_pixels_file(_need("other/image_dfl.dcm"))
    assert deflated.shape == (512, 512) and deflated.max() == 1.0


def test_multiframe_gives_first_frame() -> None:
    path = _need("other/emri_small_RLE.dcm")
    arr = read_pixels_file(path)
    frames = pydicom.dcmread(path).pixel_array.astype(np.float64)
    first = frames[0]
    assert arr.shape == first.shape
    # Same ordering of pixel values as the first frame (monotone mapping), not another frame's.
    order = np.argsort(first.ravel(), kind="stable")
    assert np.all(np.diff(arr.ravel()[order]) >= -1e-6)


@pytest.mark.parametrize(
    "rel",
    [
        "cxr/RG1_J2KI.dcm",
        "other/emri_small_jpeg_ls_lossless.dcm",
        "other/JPEG-LL.dcm",
        "other/JPGExtended.dcm",
    ],
)
def test_gdcm_fallback_when_pylibjpeg_fails(rel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom.pixels.decoders.base import Decoder

    path = _need(rel)
    reference = read_pixels_file(path)
    real = Decoder.as_array
    used: list[str] = []

    def failing_pylibjpeg(self, src, **kwargs):  # type: ignore[no-untyped-def]
        used.append(kwargs.get("decoding_plugin", ""))
        if kwargs.get("decoding_plugin") == "pylibjpeg":
            raise RuntimeError("simulated pylibjpeg failure")
        return real(self, src, **kwargs)

    monkeypatch.setattr(Decoder, "as_array", failing_pylibjpeg)
    got = read_pixels_file(path)
    assert used[:2] == ["pylibjpeg", "gdcm"]
    assert float(np.max(np.abs(got - reference))) <= 1.0 / 255.0


def _rle(rows: int, cols: int) -> Dataset:
    """A 64 x 64 RLE Lossless image (PS3.5 Annex G) whose header claims ``rows`` x ``cols``."""
    from pydicom.uid import RLELossless

    ds = synthetic(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.Rows, ds.Columns = rows, cols
    return ds


def test_decoder_panic_becomes_a_pixel_read_error() -> None:
    """pylibjpeg-rle panics (pyo3 PanicException, a BaseException) on Rows/Columns that
    disagree with the data: it must become a PixelReadError, not escape ``except Exception``."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import RLELossless

    if "pylibjpeg" not in get_decoder(RLELossless).available_plugins:
        pytest.skip("pylibjpeg-rle not installed")
    ds = _rle(63, 65)
    with pytest.raises(BaseException) as raw:  # the decoder on its own really panics
        get_decoder(RLELossless).as_array(ds, index=0, decoding_plugin="pylibjpeg")
    assert not isinstance(raw.value, Exception)

    with pytest.raises(PixelReadError) as exc:
        read_pixels(ds)
    assert exc.value.kind is PixelErrorKind.DECODER_CRASHED
    assert "PanicException" in str(exc.value)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_interrupts_are_never_swallowed(monkeypatch: pytest.MonkeyPatch, stop: type) -> None:
    from pydicom.pixels.decoders.base import Decoder

    def interrupted(*args: object, **kwargs: object) -> None:
        raise stop()

    monkeypatch.setattr(Decoder, "as_array", interrupted)
    with pytest.raises(stop):
        read_pixels(_rle(64, 64))


def test_error_kind_is_the_enum_and_messages_quote_no_header_value() -> None:
    ds = synthetic(np.zeros((4, 4), dtype=np.uint16), photometric="PHI-LIKE-VALUE")
    with pytest.raises(PixelReadError) as exc:
        read_pixels(ds)
    assert exc.value.kind is PixelErrorKind.NOT_MONOCHROME
    assert "PHI-LIKE-VALUE" not in str(exc.value)
    # A kind given as its code is normalised; an unknown one is refused.
    assert PixelReadError("truncated").kind is PixelErrorKind.TRUNCATED
    with pytest.raises(ValueError):
        PixelReadError("no-such-kind")


def test_luminance_of_one_picture_in_rgb_ybr_and_jpeg_2000_colour() -> None:
    """pydicom hands YBR data over as RGB already: converting it again skewed the luma."""
    from dicom_io.pixels import read_luminance_file

    other = DICOM_DATA / "other"
    rgb = read_luminance_file(other / "SC_rgb.dcm")
    for same_picture in ("SC_ybr_full_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        ybr = read_luminance_file(other / same_picture)
        assert ybr.shape == rgb.shape
        assert float(np.abs(ybr - rgb).max()) <= 3 / 255, same_picture
    # JPEG 2000 with the irreversible colour transform: the decoder undoes it.
    us = read_luminance_file(other / "US1_J2KI.dcm")
    assert us.shape == (480, 640) and us.dtype == np.float32
    assert 0.0 <= float(us.min()) and float(us.max()) == 1.0
    # Serving still refuses colour: the luminance reader is for the guard's check only.
    with pytest.raises(PixelReadError) as refused:
        read_pixels_file(other / "US1_J2KI.dcm")
    assert refused.value.kind is PixelErrorKind.NOT_MONOCHROME
