"""The DICOM listener: Verification and Storage SCP in front of the spool.

* C-ECHO (Verification, PS3.4 Annex A) and C-STORE (Storage, PS3.4 Annex B)
  for every Storage SOP class pynetdicom knows plus the retired/trial ones of
  pydicom's UID dictionary, with every transfer syntax pynetdicom can
  negotiate. A CT or SR that arrives with a chest study is stored too;
  deciding what the model reads happens later (``dicom_io.selection``).
  Private SOP classes are not accepted (that would need pynetdicom's
  process-wide ``UNRESTRICTED_STORAGE_SERVICE`` switch).
* The received data set bytes are written as-is (see ``dicom_io.spool``).
  C-STORE status (PS3.4 §B.2.3, Table B.2-1):

  ========  ==============================================================
  0x0000    Success, only after the instance is durably in the spool
  0xA700    Refused: Out of Resources (disk full, spool or journal write
            failed, or a deflated data set inflating beyond
            ``ListenerConfig.max_inflated_bytes``)
  0xA900    Error: Data Set Does Not Match SOP Class (missing/invalid UIDs)
  0xC000    Error: Cannot Understand (header unreadable)
  ========  ==============================================================

* Association negotiation (PS3.8 §7.1.1.9): an unknown calling AE title is
  rejected permanently (result 1, source 1 "service user", reason 3
  "calling AE title not recognized") when an allow-list is configured (``*``
  in it accepts any caller; ``ListenerConfig`` requires one or the other
  beyond loopback). An allowed AE title calling from an address its
  ``AE@address`` entries do not cover is rejected the same way (checked on
  EVT_REQUESTED, before negotiation; see ``ListenerConfig.allows_peer``); when
  the spool's free space falls below the reserve, or the association limit is
  reached, the association is rejected *transiently* (result 2, source 3,
  reason 2 "local limit exceeded") so the sender retries later.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydicom._uid_dict import UID_dictionary
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification, register_uid  # type: ignore[attr-defined]

from dicom_io.assembly import AssemblySink, JournalWriteError, ReadyStudy, StudyAssembler
from dicom_io.config import ListenerConfig, TLSConfig
from dicom_io.sanitize import redact_library_logs
from dicom_io.spool import (
    RefusalKind,
    Spool,
    SpooledInstance,
    SpoolRefusal,
    SpoolWriteError,
    StoreOutcome,
)
from dicom_io.tuning import server_contexts, tune_allocator, tune_connection

if TYPE_CHECKING:
    from dicom_io.receivers import ReceivingProcesses

__all__ = [
    "REFUSAL_STATUS",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DATASET_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "Listener",
    "build_ssl_context",
    "storage_sop_classes",
]

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


# Storage SOP classes pydicom knows but pynetdicom's list lacks: retired and
# trial classes under the storage arc (PS3.6 Annex A), e.g. the retired
# Ultrasound Image Storage 1.2.840.10008.5.1.4.1.1.6 old modalities still send.
_STORAGE_ARC = "1.2.840.10008.5.1.4.1.1."


_registered_extra = False
_register_lock = threading.Lock()


def storage_sop_classes() -> list[str]:
    """Every Storage SOP class UID the listener accepts.

    The extra (retired/trial) classes are registered with pynetdicom's Storage
    service once, else pynetdicom would accept the context but abort on the
    C-STORE for lack of a service class.
    """
    global _registered_extra
    known = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    extra = {
        uid: f"PneumoExtra_{entry[4] or uid.replace('.', '_')}"
        for uid, entry in UID_dictionary.items()
        if entry[1] == "SOP Class"
        and uid.startswith(_STORAGE_ARC)
        and "Storage" in entry[0]
        and uid not in known
    }
    with _register_lock:
        if not _registered_extra:
            for uid, keyword in extra.items():
                register_uid(uid, keyword, StorageServiceClass)
            _registered_extra = True
    return sorted(known | set(extra))


# Below this multiple of the free-space reserve the listener warns (still receiving).
_WATERMARK_FACTOR = 2
_WATERMARK_WARN_INTERVAL = 60.0

REFUSAL_STATUS: dict[RefusalKind, int] = {
    RefusalKind.INVALID_UID: STATUS_DATASET_MISMATCH,
    RefusalKind.UID_MISMATCH: STATUS_DATASET_MISMATCH,
    RefusalKind.UNREADABLE: STATUS_CANNOT_UNDERSTAND,
    RefusalKind.TOO_LARGE: STATUS_OUT_OF_RESOURCES,
}
"""The C-STORE status for each way the spool refuses an instance (also used by C-GET)."""


def _status(code: int, comment: str) -> Dataset:
    """A C-STORE response status with a PHI-free Error Comment (0000,0902), ≤ 64 chars."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class _SpoolGuardedAE(AE):
    """An AE that reports an association limit of 0 while the spool is short of space.

    pynetdicom rejects an association transiently with "local limit exceeded"
    when its active associations exceed ``maximum_associations`` (PS3.8
    §7.1.1.9); reusing that path gives the PACS exactly the answer we want:
    try again later.
    """

    def __init__(self, ae_title: str, space_ok: Callable[[], bool]) -> None:
        super().__init__(ae_title=ae_title)
        self._space_ok = space_ok

    @property
    def maximum_associations(self) -> int:
        limit: int = AE.maximum_associations.fget(self)  # type: ignore[attr-defined]
        if not self._space_ok():
            return 0
        return limit

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        AE.maximum_associations.fset(self, value)  # type: ignore[attr-defined]


def build_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """Server-side TLS context for DICOM TLS (PS3.15 Annex B.9), mutual when configured.

    Raises:
        ValueError: client certificates are required but no CA is given.
        ssl.SSLError, OSError: a certificate, key or CA file cannot be loaded.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    if tls.require_client_cert:
        if tls.ca_file is None:
            raise ValueError("mutual TLS needs a CA file to verify client certificates")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Listener:
    """C-ECHO/C-STORE SCP writing to the spool and assembling studies."""

    def __init__(
        self,
        config: ListenerConfig,
        on_study_ready: Callable[[ReadyStudy], None],
        on_instance_stored: Callable[[SpooledInstance], None] | None = None,
    ) -> None:
        self.config = config
        self.spool = self._open_spool()
        self.assembler = self._make_assembler(on_study_ready)
        self._on_instance_stored = on_instance_stored
        self._server: Any = None
        self._receivers: ReceivingProcesses | None = None  # receiving_processes > 1
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._low_space_warned_at = -_WATERMARK_WARN_INTERVAL
        self.stats = {
            "stored": 0,
            "duplicate": 0,
            "replaced": 0,
            "refused": 0,
            "failed": 0,
            "process_restarts": 0,  # receiving processes started again (dicom_io.receivers)
        }

    # --- lifecycle ----------------------------------------------------------
    def _open_spool(self) -> Spool:
        """The spool this process writes to; the listener owns (and recovers) its pool."""
        return Spool(self.config.spool_dir, max_inflated_bytes=self.config.max_inflated_bytes)

    def _make_assembler(self, on_study_ready: Callable[[ReadyStudy], None]) -> AssemblySink:
        """What the C-STORE handlers report to: this process's study assembler."""
        return StudyAssembler(
            self.spool,
            on_study_ready,
            quiet_seconds=self.config.study_quiet_seconds,
            release_grace_seconds=self.config.study_release_grace_seconds,
        )

    @property
    def port(self) -> int:
        """The bound TCP port (useful when the configuration asked for port 0)."""
        if self._receivers is not None:
            return self._receivers.port
        if self._server is None:
            raise RuntimeError("listener not started")
        return int(self._server.server_address[1])

    def _space_ok(self) -> bool:
        try:
            free = self.spool.free_bytes()
        except OSError:
            return False
        reserve = self.config.spool_reserve_bytes
        if free < _WATERMARK_FACTOR * reserve:
            self._warn_low_space(free)
        return free >= reserve

    def _warn_low_space(self, free: int) -> None:
        """Warn (at most once a minute) before the reserve is hit and receiving stops."""
        now = time.monotonic()
        with self._lock:
            if now - self._low_space_warned_at < _WATERMARK_WARN_INTERVAL:
                return
            self._low_space_warned_at = now
        log.warning(
            "spool free space low: %d MiB left, associations are refused below %d MiB",
            free >> 20,
            self.config.spool_reserve_bytes >> 20,
        )

    def _build_ae(self) -> AE:
        ae = _SpoolGuardedAE(self.config.ae_title, self._space_ok)
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = self.config.max_pdu
        if not self.config.allows_any_calling_ae:
            # Titles only; the address of each is checked in _handle_requested.
            ae.require_calling_aet = sorted(self.config.allowed_calling_aets)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for uid in storage_sop_classes():
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        """Recover pending studies, bind the socket and serve in background threads.

        Raises:
            OSError: the address cannot be bound (in use, not permitted).
            ssl.SSLError, OSError: the TLS certificate, key or CA cannot be loaded.
        """
        if self._server is not None or self._receivers is not None:
            return
        self._stopped.clear()
        redact_library_logs()
        self.assembler.start()
        if self.config.receiving_processes > 1:
            from dicom_io.receivers import ReceivingProcesses

            receivers = ReceivingProcesses(self)
            try:
                receivers.start()
            except BaseException:
                self.assembler.stop()
                raise
            self._receivers = receivers
            log.info(
                "listening as %s on %s:%d with %d receiving processes (tls=%s)",
                self.config.ae_title,
                self.config.host,
                self.port,
                self.config.receiving_processes,
                self.config.tls is not None,
            )
            return
        tune_allocator()  # this process receives: keep data set buffers on the heap
        ae = self._build_ae()
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._handle_open),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_RELEASED, self._handle_released),
            (evt.EVT_CONN_CLOSE, self._handle_closed),
            (evt.EVT_REJECTED, self._handle_rejected),
        ]
        if self.config.restricts_peer_addresses:
            handlers.append((evt.EVT_REQUESTED, self._handle_requested))
        ssl_context = build_ssl_context(self.config.tls) if self.config.tls else None
        try:
            self._server = self._serve(ae, handlers, ssl_context)
        except Exception:
            self.assembler.stop()
            raise
        log.info(
            "listening as %s on %s:%d (tls=%s)",
            self.config.ae_title,
            self.config.host,
            self.port,
            bool(ssl_context),
        )

    def _serve(self, ae: AE, handlers: list[Any], ssl_context: ssl.SSLContext | None) -> Any:
        """Bind the configured address and serve it in background threads; the server."""
        return ae.start_server(
            (self.config.host, self.config.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=ssl_context,
            contexts=server_contexts(ae),
        )

    def stop(self) -> None:
        """Stop accepting, close the server and the assembly timer. Nothing pending is lost."""
        with self._lock:
            server, self._server = self._server, None
            receivers, self._receivers = self._receivers, None
        if receivers is not None:
            receivers.stop()
        if server is not None:
            server.shutdown()
            # Unacknowledged C-STOREs on open associations are retried by the
            # sender; acknowledged ones are already durable.
            for assoc in list(server.ae.active_associations):
                try:
                    assoc.abort()
                except Exception:  # already closing
                    pass
        self.assembler.stop()
        self._stopped.set()

    def serve_forever(self) -> None:
        """Run until :meth:`stop` is called or the process gets KeyboardInterrupt."""
        self.start()
        try:
            while not self._stopped.wait(0.5):
                pass
        except KeyboardInterrupt:
            log.info("interrupted; stopping listener")
        finally:
            self.stop()

    def __enter__(self) -> Listener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- event handlers ----------------------------------------------------
    def _handle_store(self, event: Any) -> int | Dataset:
        req = event.request
        context = event.context
        calling = str(event.assoc.requestor.ae_title).strip()
        if not self._space_ok():
            self.count_event("failed")
            log.error("spool below free-space reserve: refusing C-STORE (0xA700)")
            return _status(STATUS_OUT_OF_RESOURCES, "spool free space below reserve")
        try:
            result = self.spool.store(
                req.DataSet,
                sop_class_uid=str(req.AffectedSOPClassUID or ""),
                sop_instance_uid=str(req.AffectedSOPInstanceUID or ""),
                transfer_syntax_uid=str(context.transfer_syntax),
                calling_aet=calling,
            )
        except SpoolRefusal as exc:
            self.count_event("refused")
            code = REFUSAL_STATUS[exc.kind]
            # The message names attributes only; never values (may be PHI).
            log.warning("C-STORE from %s refused (0x%04X): %s", calling, code, exc)
            return _status(code, str(exc))
        except SpoolWriteError as exc:
            self.count_event("failed")
            log.error("C-STORE from %s not stored (0xA700): %s", calling, exc)
            return _status(STATUS_OUT_OF_RESOURCES, "spool write failed")
        except Exception as exc:  # never let a bug become a false Success
            self.count_event("failed")
            # Type only at ERROR: exception texts from parsers may quote values.
            log.error("C-STORE from %s failed unexpectedly (%s)", calling, type(exc).__name__)
            log.debug("C-STORE failure details", exc_info=True)
            return _status(STATUS_OUT_OF_RESOURCES, "internal error")

        try:
            self.assembler.instance_stored(result, id(event.assoc))
        except JournalWriteError:
            # The file is durable but the journal does not say the study is
            # pending: no Success, so the sender retries and the retry
            # rewrites the journal (recovery would find the file too).
            self.count_event("failed")
            log.error("C-STORE from %s not acknowledged: journal write failed", calling)
            return _status(STATUS_OUT_OF_RESOURCES, "study journal write failed")
        except Exception as exc:  # instance is durable; recovery will find it
            log.error(
                "study assembly failed for study %s (%s)",
                result.instance.study_uid,
                type(exc).__name__,
            )
        self.count_event({"new": "stored"}.get(result.outcome.value, result.outcome.value))
        # An identical duplicate changes nothing, so it is not reported again.
        if result.outcome is not StoreOutcome.DUPLICATE:
            self.report_stored(result.instance)
        return STATUS_SUCCESS

    def report_stored(self, instance: SpooledInstance) -> None:
        """Hand a new or replaced instance to ``on_instance_stored`` (errors logged).

        Called for each instance this listener stores, and by
        :mod:`dicom_io.receivers` for those its receiving processes store.
        """
        if self._on_instance_stored is None:
            return
        try:
            self._on_instance_stored(instance)
        except Exception as exc:
            log.error(
                "on_instance_stored callback failed for instance %s (%s)",
                instance.sop_instance_uid,
                type(exc).__name__,
            )

    def count_event(self, key: str) -> None:
        """Add one to ``stats[key]`` (thread-safe).

        :mod:`dicom_io.receivers` counts what its receiving processes report
        through it.
        """
        with self._lock:
            self.stats[key] += 1

    def _handle_open(self, event: Any) -> None:
        tune_connection(event.assoc)

    def _handle_released(self, event: Any) -> None:
        self.assembler.association_released(id(event.assoc))

    def _handle_closed(self, event: Any) -> None:
        self.assembler.association_closed(id(event.assoc))

    def _handle_requested(self, event: Any) -> None:
        """Reject an allowed calling AE title calling from an address not allowed for it.

        EVT_REQUESTED runs before pynetdicom's own negotiation, which is skipped
        once the association is rejected here. Fails closed: any error rejects.
        """
        assoc = event.assoc
        try:
            calling = str(assoc.requestor.primitive.calling_ae_title).strip()
            if calling not in self.config.allowed_calling_aets:
                return  # an unknown AE title: pynetdicom's require_calling_aet rejects it
            address = str(assoc.requestor.address)
            allowed = self.config.allows_peer(calling, address)
        except Exception as exc:  # never accept because the check itself failed
            calling, address, allowed = "?", "?", False
            log.error("peer address check failed (%s): rejecting", type(exc).__name__)
        if allowed:
            return
        # AE title and IP address only: no PHI in an association request.
        log.warning(
            "association from %s at %s rejected: address not allowed for this AE title",
            calling,
            address,
        )
        # Permanent, service user, "calling AE title not recognised" (PS3.8
        # §7.1.1.9): the answer an unknown AE title gets.
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        assoc.kill()

    def _handle_rejected(self, event: Any) -> None:
        log.warning("association from %s rejected", str(event.assoc.requestor.ae_title).strip())
