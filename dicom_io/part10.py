"""DICOM Part 10 encoding and header reading, without pixels.

* :func:`encode_file_meta`: preamble, ``DICM`` and File Meta Information
  (PS3.10 §7.1) for a data set received over the network, encoded directly.
* :func:`read_received_header`: the few UIDs the spool files an instance by,
  read from the received data set bytes in memory, in any transfer syntax;
  a deflated data set (PS3.5 §A.5) is inflated in bounded steps and refused
  when it would inflate beyond a cap (a 0.4 MB deflate bomb can expand to
  800 MB).
* :func:`read_header`: a file's header without its pixel data, for code that
  only needs attributes (selection, the worker's study header).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "HeaderError",
    "InflationLimitExceeded",
    "ReceivedHeader",
    "dataset_encoding",
    "encode_file_meta",
    "inflate_bounded",
    "read_header",
    "read_received_header",
]

# Our implementation identity in the File Meta Information (PS3.7 §D.3.3.2).
IMPLEMENTATION_CLASS_UID = "2.25.270431947357296262113384587331046591817"
IMPLEMENTATION_VERSION_NAME = "PNEUMO_010"

_SOP_CLASS_UID = Tag(0x0008, 0x0016)
_SOP_INSTANCE_UID = Tag(0x0008, 0x0018)
_STUDY_UID = Tag(0x0020, 0x000D)
_SERIES_UID = Tag(0x0020, 0x000E)
_STUDY_RELATED_INSTANCES = Tag(0x0020, 0x1208)
# The only header elements the receive path reads (never pixels, never PHI).
_HEADER_TAGS = [
    _SOP_CLASS_UID,
    _SOP_INSTANCE_UID,
    _STUDY_UID,
    _SERIES_UID,
    _STUDY_RELATED_INSTANCES,
]

# Transfer syntaxes whose data set is not Explicit VR Little Endian (PS3.5 §10, Annex A).
_IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
_EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED_TRANSFER_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.4.204",
    }  # Deflated Explicit VR LE, Deflated Image Frame
)

# Of an inflated data set, only this prefix is kept for reading the header:
# the elements up to (0020,1208) are a few KiB in practice.
_HEADER_PREFIX_BYTES = 8 * 1024 * 1024
_INFLATE_STEP = 1 << 20


class HeaderError(Exception):
    """A received data set's header cannot be read. The message names no value."""


class InflationLimitExceeded(HeaderError):
    """A deflated data set inflates to more than the configured cap."""


@dataclass(frozen=True)
class ReceivedHeader:
    """The header values the spool files an instance by, as stored (None when absent/empty).

    Not validated here: the spool checks them against the UID grammar and the
    C-STORE command.
    """

    study_uid: str | None
    series_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None
    number_of_study_related_instances: str | None


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, Explicit VR Little Endian (PS3.10 §7.1, PS3.5 §7.1.2)."""
    if vr == b"OB":  # 2 reserved bytes and a 32-bit length
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    """An even-length value: UI padded with NUL, other strings with space (PS3.5 §6.2)."""
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, calling_aet: str
) -> bytes:
    """Preamble, ``DICM`` prefix and File Meta Information (PS3.10 §7.1).

    Encoded directly rather than through pydicom's writer (a measurable share
    of a small instance's CPU time); ``tests/dicom_receive/test_part10.py``
    checks the bytes equal pydicom's ``write_file_meta_info`` output.
    """
    body = b"".join(
        [
            _meta_element(0x0001, b"OB", b"\x00\x01"),  # File Meta Information Version
            _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
            _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
            _meta_element(0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
            _meta_element(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
            _meta_element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
            *([_meta_element(0x0016, b"AE", _padded(calling_aet, b" "))] if calling_aet else []),
        ]
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


def dataset_encoding(transfer_syntax_uid: str) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated) of a data set in this transfer syntax.

    PS3.5 §10: everything except Implicit VR Little Endian and the retired
    Explicit VR Big Endian is Explicit VR Little Endian; deflated syntaxes
    compress the whole data set (PS3.5 §A.5).
    """
    if transfer_syntax_uid == _IMPLICIT_VR_LITTLE_ENDIAN:
        return True, True, False
    if transfer_syntax_uid == _EXPLICIT_VR_BIG_ENDIAN:
        return False, False, False
    if transfer_syntax_uid in _DEFLATED_TRANSFER_SYNTAXES:
        return False, True, True
    try:
        ts = UID(transfer_syntax_uid)
        return bool(ts.is_implicit_VR), bool(ts.is_little_endian), bool(ts.is_deflated)
    except (ValueError, AttributeError):  # a private syntax pydicom does not know
        return False, True, False


def inflate_bounded(
    data: bytes | bytearray | memoryview, *, limit: int, keep: int = _HEADER_PREFIX_BYTES
) -> bytes:
    """Inflate a raw DEFLATE stream (RFC 1951, as PS3.5 §A.5 uses it) without holding it whole.

    Inflates in 1 MiB steps, counting every byte, and returns only the first
    ``keep`` bytes. Memory stays at ``keep`` plus one step whatever the
    stream expands to.

    Raises:
        InflationLimitExceeded: the stream inflates to more than ``limit`` bytes.
        HeaderError: the stream is not valid DEFLATE data.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    kept = bytearray()
    total = 0
    view = memoryview(data).cast("B")
    try:
        for start in range(0, len(view), _INFLATE_STEP):
            out = inflater.decompress(view[start : start + _INFLATE_STEP], _INFLATE_STEP)
            while True:
                total += len(out)
                if total > limit:
                    raise InflationLimitExceeded(
                        f"deflated data set inflates beyond the {limit}-byte limit"
                    )
                if len(kept) < keep:
                    kept += out[: keep - len(kept)]
                if not inflater.unconsumed_tail:
                    break
                out = inflater.decompress(inflater.unconsumed_tail, _INFLATE_STEP)
            if inflater.eof:
                break
        tail = inflater.flush()
    except zlib.error:
        raise HeaderError("deflated data set is not valid DEFLATE data") from None
    total += len(tail)
    if total > limit:
        raise InflationLimitExceeded(f"deflated data set inflates beyond the {limit}-byte limit")
    if len(kept) < keep:
        kept += tail[: keep - len(kept)]
    return bytes(kept)


def _past_header(tag: BaseTag, vr: str | None, length: int) -> bool:
    # Elements are in ascending tag order (PS3.5 §7.1): nothing we need follows.
    return bool(tag > _STUDY_RELATED_INSTANCES)


def _raw_text(ds: Dataset, tag: BaseTag) -> str | None:
    """The text of a string element (UI, IS) as stored, or None when absent/empty.

    UI values are padded with NUL, other strings with space (PS3.5 §6.2).
    """
    if tag not in ds:
        return None
    value = ds.get_item(tag).value
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("ascii", "replace")
    elif value is None:
        return None
    else:
        text = str(value)
    text = text.strip("\x00 ")
    return text or None


def read_received_header(
    data: bytes | bytearray | memoryview, transfer_syntax_uid: str, *, max_inflated_bytes: int
) -> ReceivedHeader:
    """Read the filing UIDs from a received data set (no file meta) held in memory.

    Only the elements up to (0020,1208) are parsed; values are taken from the
    raw elements without pydicom's value conversion, so a malformed value is
    never echoed into a log by pydicom. A deflated data set is inflated
    completely (to learn its size) but only a header prefix is kept.

    Raises:
        InflationLimitExceeded: a deflated data set inflates beyond ``max_inflated_bytes``.
        HeaderError: the header cannot be parsed (the message names the exception type only).
    """
    implicit, little, deflated = dataset_encoding(transfer_syntax_uid)
    source = (
        io.BytesIO(inflate_bounded(data, limit=max_inflated_bytes))
        if deflated
        else io.BytesIO(data)
    )
    try:
        ds = read_dataset(
            source, implicit, little, stop_when=_past_header, specific_tags=list(_HEADER_TAGS)
        )
        values = {tag: _raw_text(ds, tag) for tag in _HEADER_TAGS}
    except Exception as exc:  # pydicom raises many types on malformed data
        raise HeaderError(f"data set header unreadable ({type(exc).__name__})") from None
    return ReceivedHeader(
        study_uid=values[_STUDY_UID],
        series_uid=values[_SERIES_UID],
        sop_instance_uid=values[_SOP_INSTANCE_UID],
        sop_class_uid=values[_SOP_CLASS_UID],
        number_of_study_related_instances=values[_STUDY_RELATED_INSTANCES],
    )


def read_header(path: str | PathLike[str], *, specific_tags: list[str] | None = None) -> Dataset:
    """A Part 10 file's data set without Pixel Data (and anything after it).

    ``stop_before_pixels`` stops at the first pixel data element
    (7FE0,0010 and its float variants), so a large image costs only its
    header; ``specific_tags`` narrows it further. ``force=True`` reads files
    without a preamble too.

    Raises:
        OSError: the file cannot be opened.
        pydicom.errors.InvalidDicomError, ValueError, EOFError: the file is not
            readable DICOM (pydicom's own error types).
    """
    return pydicom.dcmread(
        Path(path), stop_before_pixels=True, specific_tags=specific_tags, force=True
    )
