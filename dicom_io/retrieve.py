"""Getting a study back from the PACS: Query/Retrieve SCU (PS3.4 Annex C), Study Root.

When the spool no longer holds a study's files (retention deleted them), the
worker asks the PACS for them again:

* :func:`find_study_instances`: C-FIND (PS3.4 §C.4.1) at SERIES level, then at
  IMAGE level for each series, lists the study's instances (series, SOP
  Instance and SOP Class UIDs), so we know what to ask for and which
  presentation contexts a C-GET needs.
* :func:`retrieve_study`, :attr:`RetrieveMethod.GET`: C-GET (PS3.4 §C.4.3).
  Our SCU is also the Storage SCP on the same association (SCP/SCU role
  selection, PS3.7 §D.3.3.4); each received data set is written by
  :meth:`dicom_io.spool.Spool.store`, the listener's own durable write path,
  before the sub-operation is answered Success.
* :func:`retrieve_study`, :attr:`RetrieveMethod.MOVE`: C-MOVE (PS3.4 §C.4.2)
  to our own listener's AE title. The PACS must know that AE title (its
  address); the listener receives the instances as any other C-STORE, into the
  same spool. A listener that already dispatched the study sees the
  instances arrive again and dispatches it once more (an *amended* dispatch,
  :mod:`dicom_io.assembly`).

Each C-FIND, C-GET or C-MOVE request has an association of its own:
pynetdicom 3.0's reactor thread can take the response to a second request
sent right after a first one on the same association (it resumes between the
two), and the lost response is dropped with a warning.

Either way the outcome is a :class:`RetrieveResult`: which SOP Instance UIDs
were asked for, which are in the spool now (with their paths), which are not,
and why (C-GET/C-MOVE status codes, PS3.4 §C.4.2.1.5/§C.4.3.1.4). Failures to
associate or to query raise :class:`RetrieveError`, whose text names the PACS
(``AE@host:port``), the operation and a status code: never a value from a data
set.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_io.config import Destination, TLSConfig, validate_ae_title
from dicom_io.listener import REFUSAL_STATUS, STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS
from dicom_io.send import request_association, require_peer_verification
from dicom_io.spool import Spool, SpoolRefusal, SpoolWriteError
from dicom_io.uids import is_valid_uid, require_uid

__all__ = [
    "PacsAddress",
    "PacsInstance",
    "RetrieveError",
    "RetrieveFailure",
    "RetrieveMethod",
    "RetrieveResult",
    "find_study_instances",
    "retrieve_study",
]

log = logging.getLogger(__name__)

# C-FIND/C-GET/C-MOVE statuses (PS3.4 §C.4.1.1.4, §C.4.2.1.5, §C.4.3.1.4).
_PENDING = (0xFF00, 0xFF01)
_WARNING_SUBOPS_FAILED = 0xB000
_NO_STATUS = -1  # no response: timeout, abort or association lost

# PS3.8 §9.3.2.2: at most 128 presentation contexts (odd IDs 1..255); one is the
# C-GET context itself.
_MAX_STORAGE_CONTEXTS = 126
_UNCOMPRESSED: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
# Stored files are sent as they are kept when we accept their transfer syntax;
# a PACS that cannot transcode needs a context in exactly that one (Orthanc
# accepts these; dcmqrscp accepts only uncompressed syntaxes for C-GET).
_COMPRESSED = [
    JPEG2000Lossless,
    JPEG2000,
    JPEGLosslessSV1,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    RLELossless,
    DeflatedExplicitVRLittleEndian,
]
# When the PACS does not return SOP Class UID (an optional C-FIND return key):
# the classes a chest radiograph study holds.
_FALLBACK_CLASSES = (
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ComputedRadiographyImageStorage,
    SecondaryCaptureImageStorage,
)


class RetrieveMethod(str, enum.Enum):
    """How instances are fetched from the PACS."""

    GET = "get"
    """C-GET: the instances come back on our own association (PS3.4 §C.4.3)."""
    MOVE = "move"
    """C-MOVE to our listener's AE title: the PACS opens an association to it (PS3.4 §C.4.2)."""

    def __str__(self) -> str:
        return self.value


class PacsAddress(Destination):
    """The PACS's Query/Retrieve SCP, written ``AE@host:port`` (``PNEUMO_PACS``).

    The same value as a result :class:`dicom_io.config.Destination` (AE title
    rules of PS3.5 §6.2, a host, a port 1-65535), named for its role.

    Raises:
        ValueError: an invalid AE title, an empty host or a port out of range.
    """

    @classmethod
    def parse(cls, text: str) -> PacsAddress:
        """Parse ``AE@host:port``.

        Raises:
            ValueError: ``text`` is not of that form, or a part is invalid.
        """
        try:
            parsed = Destination.parse(text)
        except ValueError as exc:
            raise ValueError(f"PACS address: {exc}") from None
        return cls(parsed.ae_title, parsed.host, parsed.port)


@dataclass(frozen=True)
class PacsInstance:
    """One instance the PACS lists for a study (C-FIND IMAGE level)."""

    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str = ""
    """Empty when the PACS does not return SOP Class UID (an optional key)."""


@dataclass(frozen=True)
class RetrieveFailure:
    """A requested instance that is not in the spool after the retrieve, and why."""

    sop_instance_uid: str
    reason: str
    """PHI-free: ``not on the PACS``, or the status of the C-GET/C-MOVE that should have brought it."""
    status: int | None = None
    """The final C-GET/C-MOVE status (PS3.4 §C.4.2.1.5, §C.4.3.1.4), when one was received."""


@dataclass(frozen=True)
class RetrieveResult:
    """What one :func:`retrieve_study` asked for and what it got."""

    pacs: PacsAddress
    method: RetrieveMethod
    study_uid: str
    requested: tuple[str, ...]
    """SOP Instance UIDs asked for (every instance the PACS lists when none were named)."""
    received: Mapping[str, Path] = field(default_factory=dict)
    """SOP Instance UID -> its spool path, for each requested instance now in the spool."""
    failed: tuple[RetrieveFailure, ...] = ()
    statuses: tuple[int, ...] = ()
    """The final status of each C-GET/C-MOVE request sent (-1: no response)."""

    @property
    def ok(self) -> bool:
        """True when every requested instance is in the spool."""
        return not self.failed


class RetrieveError(Exception):
    """The PACS could not be asked: association refused or lost, query failed.

    The message names the PACS, the operation and a status; never data-set values.
    """


def _status_text(code: int) -> str:
    return "no response" if code == _NO_STATUS else f"status 0x{code:04X}"


def _ok_final(code: int) -> bool:
    # Success, or Warning "sub-operations complete, one or more failures"
    # (PS3.4 §C.4.2.1.5): the per-instance check in the spool tells which.
    return code in (0x0000, _WARNING_SUBOPS_FAILED)


@contextmanager
def _association(
    pacs: PacsAddress,
    contexts: Sequence[PresentationContext],
    *,
    calling_ae: str,
    tls: TLSConfig | None,
    timeout: float,
    ext_neg: list[Any] | None = None,
    handlers: list[Any] | None = None,
) -> Iterator[Association]:
    """An established association with the PACS, released on exit.

    Raises:
        RetrieveError: the association was rejected, aborted or could not be opened.
    """
    try:
        assoc = request_association(
            pacs,
            contexts,
            calling_ae=calling_ae,
            tls=tls,
            timeout=timeout,
            ext_neg=ext_neg,
            handlers=handlers,
        )
    except Exception as exc:  # e.g. TLS handshake errors
        raise RetrieveError(f"association with PACS {pacs} failed ({type(exc).__name__})") from None
    if not assoc.is_established:
        what = "rejected" if assoc.is_rejected else "failed"
        raise RetrieveError(f"association with PACS {pacs} {what}")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        assoc.ae.shutdown()


def _find(assoc: Association, pacs: PacsAddress, identifier: Dataset) -> Iterator[Dataset]:
    """The matches of one Study Root C-FIND.

    Raises:
        RetrieveError: the C-FIND ended in a failure status or without a response.
    """
    final = _NO_STATUS
    for status, match in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        code = int(getattr(status, "Status", _NO_STATUS)) if status else _NO_STATUS
        if code in _PENDING:
            if match is not None:
                yield match
            continue
        final = code
    if final != 0x0000:
        raise RetrieveError(
            f"C-FIND at {identifier.QueryRetrieveLevel} level on PACS {pacs}: {_status_text(final)}"
        )


def _query_instances(
    pacs: PacsAddress, study_uid: str, *, calling_ae: str, tls: TLSConfig | None, timeout: float
) -> list[PacsInstance]:
    def find(identifier: Dataset) -> list[Dataset]:
        contexts = [build_context(StudyRootQueryRetrieveInformationModelFind)]
        with _association(pacs, contexts, calling_ae=calling_ae, tls=tls, timeout=timeout) as a:
            return list(_find(a, pacs, identifier))

    series = Dataset()
    series.QueryRetrieveLevel = "SERIES"
    series.StudyInstanceUID = study_uid
    series.SeriesInstanceUID = ""
    series_uids = sorted(
        {
            str(m.get("SeriesInstanceUID", "") or "")
            for m in find(series)
            if is_valid_uid(str(m.get("SeriesInstanceUID", "") or ""))
        }
    )
    found: dict[str, PacsInstance] = {}
    for series_uid in series_uids:
        image = Dataset()
        image.QueryRetrieveLevel = "IMAGE"
        image.StudyInstanceUID = study_uid
        image.SeriesInstanceUID = series_uid
        image.SOPInstanceUID = ""
        image.SOPClassUID = ""
        for m in find(image):
            sop_uid = str(m.get("SOPInstanceUID", "") or "")
            sop_class = str(m.get("SOPClassUID", "") or "")
            if is_valid_uid(sop_uid):
                found[sop_uid] = PacsInstance(
                    series_uid, sop_uid, sop_class if is_valid_uid(sop_class) else ""
                )
    return list(found.values())


def find_study_instances(
    pacs: PacsAddress,
    study_uid: str,
    *,
    calling_ae: str = "PNEUMO",
    tls: TLSConfig | None = None,
    timeout_seconds: float = 30.0,
) -> tuple[PacsInstance, ...]:
    """The instances the PACS holds for ``study_uid`` (Study Root C-FIND, SERIES then IMAGE level).

    Hierarchical queries (PS3.4 §C.4.1.3.1): the series are listed first, then
    each series' instances, so the query works on PACSs that refuse an IMAGE
    level query without a Series Instance UID. Sorted by series, then SOP
    Instance UID.

    Raises:
        InvalidUIDError: ``study_uid`` is not a valid UID (PS3.5 §9.1).
        ValueError: ``calling_ae`` is not a valid AE title, or ``tls`` has no ``ca_file``.
        RetrieveError: the association failed or a C-FIND did not succeed.
    """
    study_uid = require_uid(study_uid, "Study Instance UID")
    calling_ae = validate_ae_title(calling_ae)
    require_peer_verification(tls)
    instances = _query_instances(
        pacs, study_uid, calling_ae=calling_ae, tls=tls, timeout=timeout_seconds
    )
    return tuple(sorted(instances, key=lambda i: (i.series_uid, i.sop_instance_uid)))


def _storage_contexts(sop_classes: Collection[str]) -> list[PresentationContext]:
    """Storage contexts (SCP role) for the classes a C-GET will bring back.

    Per class one context for the uncompressed syntaxes and, while the limit
    allows, one per common compressed syntax (an acceptor picks a single
    syntax per context), so a PACS can send each file as it stores it.
    """
    classes = sorted(set(sop_classes))
    per_class = 1 + len(_COMPRESSED)
    with_compressed = len(classes) * per_class <= _MAX_STORAGE_CONTEXTS
    contexts: list[PresentationContext] = []
    for sop_class in classes:
        contexts.append(build_context(sop_class, _UNCOMPRESSED))
        if with_compressed:
            contexts += [build_context(sop_class, ts) for ts in _COMPRESSED]
    return contexts[:_MAX_STORAGE_CONTEXTS]


class _GetReceiver:
    """The Storage SCP side of a C-GET association: writes through the spool."""

    def __init__(self, spool: Spool, calling_aet: str) -> None:
        self.spool = spool
        self.calling_aet = calling_aet
        self.stored: dict[str, Path] = {}
        self.refused = 0

    def handle_store(self, event: Any) -> int | Dataset:
        req = event.request
        try:
            result = self.spool.store(
                req.DataSet,
                sop_class_uid=str(req.AffectedSOPClassUID or ""),
                sop_instance_uid=str(req.AffectedSOPInstanceUID or ""),
                transfer_syntax_uid=str(event.context.transfer_syntax),
                calling_aet=self.calling_aet,
            )
        except SpoolRefusal as exc:
            self.refused += 1
            log.warning("C-GET sub-operation refused: %s", exc)  # attributes only, no values
            return REFUSAL_STATUS[exc.kind]
        except SpoolWriteError as exc:
            self.refused += 1
            log.error("C-GET sub-operation not stored: %s", exc)
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # never answer Success for what is not durable
            self.refused += 1
            log.error("C-GET sub-operation failed unexpectedly (%s)", type(exc).__name__)
            return STATUS_OUT_OF_RESOURCES
        self.stored[result.instance.sop_instance_uid] = result.instance.path
        return STATUS_SUCCESS


def _retrieve_identifiers(
    study_uid: str, wanted: list[PacsInstance], whole_study: bool
) -> list[Dataset]:
    if whole_study:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = study_uid
        return [ds]
    identifiers = []
    for inst in wanted:
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = inst.series_uid
        ds.SOPInstanceUID = inst.sop_instance_uid
        identifiers.append(ds)
    return identifiers


def _final_status(responses: Iterator[tuple[Dataset, Dataset | None]]) -> int:
    final = _NO_STATUS
    for status, _identifier in responses:
        code = int(getattr(status, "Status", _NO_STATUS)) if status else _NO_STATUS
        if code not in _PENDING:
            final = code
    return final


def retrieve_study(
    pacs: PacsAddress,
    study_uid: str,
    spool: Spool,
    *,
    method: RetrieveMethod = RetrieveMethod.GET,
    sop_instance_uids: Collection[str] | None = None,
    calling_ae: str = "PNEUMO",
    move_destination: str | None = None,
    tls: TLSConfig | None = None,
    timeout_seconds: float = 30.0,
) -> RetrieveResult:
    """Bring a study's instances (all, or ``sop_instance_uids``) from the PACS into ``spool``.

    The PACS is queried first (:func:`find_study_instances`); requested
    instances it does not list fail as ``not on the PACS``. With every
    instance wanted, one STUDY level request is sent; otherwise one IMAGE level
    request per instance (hierarchical keys: study, series, SOP Instance UID).

    ``RetrieveMethod.GET`` writes each received data set with
    :meth:`Spool.store` (durable before its sub-operation is answered).
    ``RetrieveMethod.MOVE`` asks the PACS to send to ``move_destination``
    (default: ``calling_ae``, our listener's AE title), a listener writing to
    this same ``spool``. Either way the spool is the judge: a requested
    instance whose file is there afterwards counts as received. Each request
    has its own association; one that cannot be opened after the first fails
    its instances (``no response``).

    Raises:
        InvalidUIDError: ``study_uid`` is not a valid UID (PS3.5 §9.1).
        ValueError: an AE title is invalid, or ``tls`` has no ``ca_file``.
        RetrieveError: the association failed or the C-FIND did not succeed.
    """
    study_uid = require_uid(study_uid, "Study Instance UID")
    method = RetrieveMethod(method)
    calling_ae = validate_ae_title(calling_ae)
    move_aet = validate_ae_title(move_destination or calling_ae)
    require_peer_verification(tls)

    listed = find_study_instances(
        pacs, study_uid, calling_ae=calling_ae, tls=tls, timeout_seconds=timeout_seconds
    )
    by_uid = {i.sop_instance_uid: i for i in listed}
    requested = tuple(
        sorted(by_uid) if sop_instance_uids is None else sorted(set(sop_instance_uids))
    )
    failed = [RetrieveFailure(uid, "not on the PACS") for uid in requested if uid not in by_uid]
    wanted = [by_uid[uid] for uid in requested if uid in by_uid]
    if not wanted:
        return RetrieveResult(pacs, method, study_uid, requested, {}, tuple(failed))
    whole_study = len(wanted) == len(listed)

    statuses: list[int] = []
    receiver = _GetReceiver(spool, pacs.ae_title)
    identifiers = _retrieve_identifiers(study_uid, wanted, whole_study)
    if method is RetrieveMethod.GET:
        classes = {i.sop_class_uid for i in wanted if i.sop_class_uid}
        if any(not i.sop_class_uid for i in wanted):
            classes |= {str(c) for c in _FALLBACK_CLASSES}
        storage = _storage_contexts(classes)
        contexts = [build_context(StudyRootQueryRetrieveInformationModelGet), *storage]
        roles: list[Any] | None = [
            build_role(str(cx.abstract_syntax), scp_role=True) for cx in storage
        ]
        handlers: list[Any] | None = [(evt.EVT_C_STORE, receiver.handle_store)]
    else:
        contexts = [build_context(StudyRootQueryRetrieveInformationModelMove)]
        roles = handlers = None
    for identifier in identifiers:
        try:
            with _association(
                pacs,
                contexts,
                calling_ae=calling_ae,
                tls=tls,
                timeout=timeout_seconds,
                ext_neg=roles,
                handlers=handlers,
            ) as assoc:
                if method is RetrieveMethod.GET:
                    responses = assoc.send_c_get(
                        identifier, StudyRootQueryRetrieveInformationModelGet
                    )
                else:
                    responses = assoc.send_c_move(
                        identifier, move_aet, StudyRootQueryRetrieveInformationModelMove
                    )
                statuses.append(_final_status(responses))
        except RetrieveError:
            if not statuses:  # the first request could not be made: report, do not guess
                raise
            statuses.append(_NO_STATUS)

    received: dict[str, Path] = {}
    for n, inst in enumerate(wanted):
        path = receiver.stored.get(inst.sop_instance_uid) or spool.instance_path(
            study_uid, inst.series_uid, inst.sop_instance_uid
        )
        if path.is_file():
            received[inst.sop_instance_uid] = path
            continue
        code = statuses[0 if whole_study else n]
        why = "not received" if _ok_final(code) else f"{method.value} failed"
        failed.append(
            RetrieveFailure(
                inst.sop_instance_uid,
                f"{why} ({_status_text(code)})",
                None if code == _NO_STATUS else code,
            )
        )
    result = RetrieveResult(
        pacs, method, study_uid, requested, received, tuple(failed), tuple(statuses)
    )
    log.info(
        "study %s: C-%s from %s: %d of %d instance(s) received, %d failed",
        study_uid,
        method.value.upper(),
        pacs,
        len(received),
        len(requested),
        len(failed),
    )
    return result
