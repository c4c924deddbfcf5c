"""One preprocessing path: shapes, invariances, and DICOM/JPEG parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.images import ImageLoadError, load_image_file
from model.preprocess import INPUT_SIZE, equalize_histogram, to_model_batch, to_model_tensor


def test_tensor_shape_and_standardisation() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((300, 410), dtype=np.float32)
    t = to_model_tensor(img)
    assert t.shape == (1, INPUT_SIZE, INPUT_SIZE) and t.dtype == torch.float32
    assert abs(float(t.mean())) < 1e-3 and abs(float(t.std()) - 1) < 1e-2


def test_affine_intensity_changes_do_not_change_the_tensor() -> None:
    """Window/level or bit depth differences (a*x+b) vanish: same image -> same tensor."""
    rng = np.random.default_rng(1)
    img = rng.random((256, 256)).astype(np.float32)
    a = to_model_tensor(img)
    b = to_model_tensor(0.25 + 0.5 * img)
    assert torch.allclose(a, b, atol=1e-4)


def test_flat_image_is_finite_and_bad_shapes_are_rejected() -> None:
    assert torch.isfinite(to_model_tensor(np.full((64, 64), 0.3, np.float32))).all()
    with pytest.raises(ValueError):
        to_model_tensor(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError):
        to_model_tensor(np.zeros((4, 4), np.float32))
    nan = np.full((64, 64), np.nan, np.float32)
    assert torch.isfinite(to_model_tensor(nan)).all()


def test_non_finite_pixels_map_to_black_and_white_and_the_input_is_untouched() -> None:
    from model.preprocess import resize_to_input

    image = np.full((64, 64), 0.5, np.float32)
    image[0, :3] = [np.nan, np.inf, -np.inf]
    image[1, :2] = [1.7, -0.2]
    before = image.copy()
    out = resize_to_input(image, size=64)[0]
    assert out[0, :3].tolist() == [0.0, 1.0, 0.0]
    assert out[1, :2].tolist() == [1.0, 0.0]
    np.testing.assert_array_equal(image, before)  # the caller's array is not changed
    tensor = torch.from_numpy(before.copy())
    resize_to_input(tensor, size=64)
    assert torch.equal(torch.isnan(tensor), torch.from_numpy(np.isnan(before)))


def test_an_image_already_in_range_is_never_written_and_resizes_as_a_clamped_one() -> None:
    """The usual input skips the clamp; the output still owns its memory."""
    from model.preprocess import resize_to_input

    rng = np.random.default_rng(3)
    image = rng.random((64, 64), dtype=np.float32)
    before = image.copy()
    same = resize_to_input(image, size=64)
    same.fill_(7.0)  # the result is the caller's to change: a copy at the input size
    np.testing.assert_array_equal(image, before)
    # Resizing gives what the clamping path gives on the same values.
    wide = np.hstack([image, image])
    shifted = wide.copy()
    shifted[0, 0] = 1.5  # out of range: the clamping path, with the pixel at 1.0
    clamped = wide.copy()
    clamped[0, 0] = 1.0
    torch.testing.assert_close(resize_to_input(shifted, size=32), resize_to_input(clamped, size=32))
    np.testing.assert_array_equal(wide[:, :64], before)


def test_batch_equals_stacked_tensors() -> None:
    rng = np.random.default_rng(2)
    imgs = [rng.random((100 + 10 * i, 120), dtype=np.float32) for i in range(3)]
    batch = to_model_batch(imgs)
    assert batch.shape == (3, 1, INPUT_SIZE, INPUT_SIZE)
    for i, im in enumerate(imgs):
        assert torch.equal(batch[i], to_model_tensor(im))
    assert to_model_batch([]).shape == (0, 1, INPUT_SIZE, INPUT_SIZE)


def test_load_image_file_converts_colour_and_rejects_garbage(tmp_path) -> None:
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 1] = 255  # pure green -> luminance 0.587
    Image.fromarray(rgb).save(tmp_path / "g.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 30), 255, np.uint8)])).save(tmp_path / "a.png")
    for name in ("g.png", "a.png"):
        arr = load_image_file(tmp_path / name)
        assert arr.shape == (20, 30) and arr.dtype == np.float32
        assert np.allclose(arr, 150 / 255, atol=1 / 255)  # PIL "L": 0.587*255 = 149.7
    (tmp_path / "bad.jpeg").write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError):
        load_image_file(tmp_path / "bad.jpeg")


def _dicom_from_pixels(path, pixels: np.ndarray, *, monochrome1: bool = False, bits: int = 8):
    """A minimal DX-like DICOM holding ``pixels`` (uint8/uint16), written with pydicom."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("equalize", [False, True], ids=["standardised", "equalised"])
@pytest.mark.parametrize("variant", ["8bit", "12bit-monochrome1"])
def test_dicom_and_its_jpeg_give_the_same_tensor(kermany, tmp_path, variant, equalize) -> None:
    pixels_mod = pytest.importorskip(
        "dicom_io.pixels", reason="dicom_io.pixels (the DICOM pixel reader) not available"
    )
    jpeg = sorted((kermany / "PNEUMONIA").glob("*.jpeg"))[0]
    with Image.open(jpeg) as im:
        gray = np.asarray(im.convert("L"))
    if variant == "8bit":
        stored, mono1, bits = gray.astype(np.uint8), False, 8
    else:  # 12-bit, inverted storage: what a CR/DX in MONOCHROME1 would carry
        stored, mono1, bits = ((255 - gray.astype(np.uint16)) * 16 + 7).astype(np.uint16), True, 12
    dcm = _dicom_from_pixels(tmp_path / "x.dcm", stored, monochrome1=mono1, bits=bits)
    from_dicom = to_model_tensor(pixels_mod.read_pixels_file(dcm), equalize=equalize)
    from_jpeg = to_model_tensor(load_image_file(jpeg), equalize=equalize)
    assert from_dicom.shape == from_jpeg.shape
    assert float((from_dicom - from_jpeg).abs().max()) < 1e-3


def test_equalisation_is_per_image_and_ignores_monotone_grey_level_changes() -> None:
    rng = np.random.default_rng(7)
    levels = rng.integers(0, 128, (2, 1, 64, 64)) * 2  # even 8-bit levels only
    x = torch.from_numpy(levels / 255.0).float()
    eq = equalize_histogram(x)
    assert eq.shape == x.shape and 0 < float(eq.min()) and float(eq.max()) < 1
    assert abs(float(eq.mean()) - 0.5) < 0.01  # mid-ranks of a histogram average to 1/2
    # brighter stays brighter, equal stays equal
    flat_x, flat_eq = x[0, 0].flatten(), eq[0, 0].flatten()
    order = torch.argsort(flat_x)
    assert bool((flat_eq[order].diff() >= 0).all())
    # a monotone curve that keeps the levels apart changes nothing
    curved = torch.from_numpy((levels / 255.0) ** 0.5).float()
    assert torch.allclose(equalize_histogram(curved), eq, atol=1e-6)
    # each image by its own histogram: the batch equals the images one at a time
    assert torch.equal(equalize_histogram(x[1]), eq[1])
    # and the model tensor is still standardised
    t = to_model_tensor(x[0, 0].numpy(), equalize=True)
    assert abs(float(t.mean())) < 1e-3 and abs(float(t.std()) - 1) < 1e-2
