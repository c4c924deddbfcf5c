"""Sending DICOM objects to a peer: C-STORE SCU (PS3.4 Annex B) with retries.

``send_files`` sends files (or every file under folders) to one destination.
What fails is retried with exponential backoff; nothing is ever deleted, so a
failed send leaves the objects on disk and the caller decides what to do.

A file whose transfer syntax the peer accepted is sent as it is on disk: its
data set bytes are streamed from the file (pynetdicom's chunked sending), not
parsed and re-encoded, which for a 3 MB heatmap SC was most of the sending
CPU. Only when the peer accepted the object's SOP class in another
uncompressed transfer syntax is the file read and converted.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from dicom_io.config import Destination, TLSConfig, validate_ae_title
from dicom_io.tuning import set_nodelay
from dicom_io.uids import is_valid_uid

__all__ = [
    "MAX_CONTEXTS",
    "SendResult",
    "client_ssl_context",
    "expand_paths",
    "request_association",
    "require_peer_verification",
    "send_files",
]

log = logging.getLogger(__name__)

# pynetdicom/PS3.8 §9.3.2.2: at most 128 presentation contexts per association
# (odd context IDs 1..255); stay below it.
MAX_CONTEXTS = 120
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

# ``send_c_store(path)`` streams the data set from the file instead of decoding
# it (pynetdicom >= 2.0); read at each call, so it only has to be set once.
pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True


@dataclass(frozen=True)
class SendResult:
    """Outcome of sending a set of files to one destination."""

    destination: Destination
    ok: bool
    sent: tuple[Path, ...]
    failed: tuple[tuple[Path, str], ...]  # (path, PHI-free reason)
    attempts: int


@dataclass(frozen=True)
class _Item:
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


def _is_success(status: int) -> bool:
    # PS3.4 §B.2.3: 0x0000 Success; 0x0001, 0x0107, 0x0116 and 0xB0xx are
    # Warnings - the object was stored.
    return status in (0x0000, 0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF


def expand_paths(paths: Sequence[Path]) -> list[Path]:
    """Files as given, plus every regular non-hidden file under given folders, sorted."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(
                sorted(
                    f
                    for f in p.rglob("*")
                    if f.is_file()
                    and not any(part.startswith(".") for part in f.relative_to(p).parts)
                )
            )
        else:
            out.append(p)
    return out


def _inspect(path: Path) -> _Item | str:
    """The SOP class and transfer syntax of a Part 10 file, or a reason it cannot be sent."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except FileNotFoundError:
        return "file not found"
    except Exception as exc:
        return f"not a readable DICOM file ({type(exc).__name__})"
    ts = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if not is_valid_uid(ts):
        return "no transfer syntax in file meta"
    if not is_valid_uid(sop_class):
        return "no valid SOP Class UID"
    return _Item(path=path, sop_class_uid=sop_class, transfer_syntax_uid=ts)


def request_association(
    peer: Destination,
    contexts: Sequence[PresentationContext],
    *,
    calling_ae: str,
    tls: TLSConfig | None,
    timeout: float,
    ext_neg: list[Any] | None = None,
    handlers: list[Any] | None = None,
) -> Association:
    """Ask ``peer`` for an association as SCU (over verified TLS when ``tls``); the caller
    checks ``is_established`` and releases it. Our own AE's threads stop with the association.

    Raises:
        ValueError: ``tls`` without a CA file.
        Exception: whatever pynetdicom raises while connecting (e.g. a TLS handshake error).
    """
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = list(contexts)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    tls_args = (client_ssl_context(tls), None) if tls is not None else None
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        ext_neg=ext_neg,
        evt_handlers=handlers,
        tls_args=tls_args,  # type: ignore[arg-type]  # pynetdicom: hostname may be None
    )
    if assoc.is_established:
        # Small DIMSE writes must not wait on Nagle/delayed-ACK.
        set_nodelay(getattr(getattr(assoc.dul, "socket", None), "socket", None))
    return assoc


def require_peer_verification(tls: TLSConfig | None) -> None:
    """Refuse TLS without a CA file: the peer's certificate must be verified.

    Raises:
        ValueError: ``tls`` is set and has no ``ca_file``.
    """
    if tls is not None and tls.ca_file is None:
        raise ValueError(
            "TLSConfig.ca_file is required when sending over TLS: the peer's "
            "certificate must be verified"
        )


def client_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """Client-side DICOM TLS (PS3.15 Annex B.9): the peer is verified, our certificate presented.

    The peer's certificate must chain to ``tls.ca_file`` (``CERT_REQUIRED``).
    Host names are not matched: PACS peers are usually addressed by IP and
    their certificates rarely carry it, so trust is anchored in the
    (hospital's own) CA instead.
    """
    require_peer_verification(tls)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(tls.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED  # already the default for TLS_CLIENT; stated
    ctx.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
    return ctx


def _contexts_for(sop_class: str, ts: str) -> list[PresentationContext]:
    """The file's own transfer syntax in a context of its own, so a peer that supports it
    can accept it (and the file goes as stored); for an uncompressed file, the other
    uncompressed syntax in a second context as the fallback to convert to."""
    contexts = [build_context(sop_class, [ts])]
    if UID(ts) in _UNCOMPRESSED:
        contexts += [build_context(sop_class, [u]) for u in _UNCOMPRESSED if u != ts]
    return contexts


def _batches(items: list[_Item]) -> list[tuple[list[_Item], list[PresentationContext]]]:
    """Group items so each association needs at most MAX_CONTEXTS contexts."""
    out: list[tuple[list[_Item], list[PresentationContext]]] = []
    keys: set[tuple[str, str]] = set()
    current: list[_Item] = []
    contexts: list[PresentationContext] = []
    for item in items:
        key = (item.sop_class_uid, item.transfer_syntax_uid)
        if key not in keys:
            needed = _contexts_for(*key)
            if current and len(contexts) + len(needed) > MAX_CONTEXTS:
                out.append((current, contexts))
                current, contexts, keys = [], [], set()
            keys.add(key)
            contexts += needed
        current.append(item)
    if current:
        out.append((current, contexts))
    return out


def _payload(assoc: Association, item: _Item) -> Path | Dataset:
    """What to pass to ``send_c_store``: the path (bytes streamed as stored) when the
    peer accepted the file's own transfer syntax, else the parsed data set, which
    pynetdicom converts to the uncompressed syntax the peer accepted.

    Raises:
        OSError, pydicom.errors.InvalidDicomError: the file cannot be read for conversion.
    """
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == item.sop_class_uid and cx.transfer_syntax[0] == UID(
            item.transfer_syntax_uid
        ):
            return item.path
    return pydicom.dcmread(item.path)


def _send_once(
    items: list[_Item],
    destination: Destination,
    calling_ae: str,
    tls: TLSConfig | None,
    timeout: float,
) -> tuple[list[Path], list[tuple[Path, str]]]:
    sent: list[Path] = []
    failed: list[tuple[Path, str]] = []
    for batch, contexts in _batches(items):
        try:
            assoc = request_association(
                destination, contexts, calling_ae=calling_ae, tls=tls, timeout=timeout
            )
        except Exception as exc:  # e.g. TLS handshake errors
            failed += [(i.path, f"association failed ({type(exc).__name__})") for i in batch]
            continue
        if not assoc.is_established:
            reason = "association rejected" if assoc.is_rejected else "association failed"
            failed += [(i.path, reason) for i in batch]
            continue
        try:
            for n, item in enumerate(batch):
                if not assoc.is_established:
                    failed += [(i.path, "association lost") for i in batch[n:]]
                    break
                try:
                    status = assoc.send_c_store(_payload(assoc, item))
                except ValueError:  # pynetdicom: no accepted context fits this object
                    failed.append((item.path, "peer accepted no presentation context for it"))
                    continue
                except Exception as exc:
                    failed.append((item.path, f"send failed ({type(exc).__name__})"))
                    continue
                code = int(getattr(status, "Status", -1)) if status else -1
                if code == -1:
                    failed.append((item.path, "no response (timeout or abort)"))
                elif _is_success(code):
                    sent.append(item.path)
                else:
                    failed.append((item.path, f"status 0x{code:04X}"))
        finally:
            if assoc.is_established:
                assoc.release()
    return sent, failed


def send_files(
    paths: Sequence[Path],
    destination: Destination,
    *,
    calling_ae: str = "PNEUMO",
    retries: int = 3,
    backoff_seconds: float = 2.0,
    tls: TLSConfig | None = None,
    timeout_seconds: float = 30.0,
) -> SendResult:
    """Send files (or all files under folders) to ``destination`` by C-STORE.

    Failures are retried up to ``retries`` times, waiting ``backoff_seconds``,
    then twice that, and so on; only what failed is sent again. Files that are
    not readable DICOM are reported as failed without retrying. Nothing is
    deleted. With ``tls`` the peer's certificate is verified against
    ``tls.ca_file``.

    Raises:
        ValueError: ``calling_ae`` is not a valid AE title, or ``tls`` has no
            ``ca_file`` (an unverified peer is never sent PHI).
    """
    calling_ae = validate_ae_title(calling_ae)
    require_peer_verification(tls)
    files = expand_paths(paths)
    items: list[_Item] = []
    unreadable: list[tuple[Path, str]] = []
    for f in files:
        inspected = _inspect(f)
        if isinstance(inspected, str):
            unreadable.append((f, inspected))
        else:
            items.append(inspected)

    sent: list[Path] = []
    pending = items
    last_failed: list[tuple[Path, str]] = []
    attempts = 0
    while pending:
        attempts += 1
        ok, last_failed = _send_once(pending, destination, calling_ae, tls, timeout_seconds)
        sent += ok
        if not last_failed:
            break
        if attempts > retries:
            break
        delay = backoff_seconds * 2 ** (attempts - 1)
        log.warning(
            "send to %s: %d of %d objects failed (attempt %d), retrying in %.1fs",
            destination,
            len(last_failed),
            len(pending),
            attempts,
            delay,
        )
        time.sleep(delay)
        failed_paths = {p for p, _ in last_failed}
        pending = [i for i in pending if i.path in failed_paths]

    failed = tuple(unreadable + last_failed)
    if failed:
        log.error(
            "send to %s: %d objects not sent after %d attempts", destination, len(failed), attempts
        )
    return SendResult(
        destination=destination,
        ok=not failed,
        sent=tuple(sent),
        failed=failed,
        attempts=attempts,
    )
