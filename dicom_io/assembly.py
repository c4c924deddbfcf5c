"""Study assembly: decide when a received study is complete and hand it on.

DICOM has no "end of study" message, so completeness is inferred. A pending
study becomes ready at the first of:

* ``quiet``: no instance of it arrived for ``quiet_seconds``;
* ``released``: every association that carried it was *released* (A-RELEASE,
  PS3.8 §7.2) and ``release_grace_seconds`` passed without new arrivals;
  an aborted association does not count, the quiet window covers it;
* ``expected-count``: the sender announced Number of Study Related Instances
  (0020,1208) and that many distinct instances are in the spool;
* ``recovered``: the study was pending when the listener stopped, or the
  spool holds instances of it that its journal does not list as dispatched
  (a crash between spooling a late instance and the journal update); after a
  restart it is re-dispatched once the quiet window has passed.

Instances arriving after a dispatch make the study pending again and cause an
*amended* dispatch carrying all instances. A duplicate SOP Instance UID with
identical bytes is a no-op; with different bytes the file was replaced by the
spool and the replacement is recorded in the study's journal (``replaced``
counter and the last replaced SOP Instance UIDs) and logged.

State that must survive a restart lives in ``<spool>/.state/<study_uid>.json``
(written with :func:`dicom_io.durable.write_atomic`: temp file, fsync, rename,
directory fsync; 0600): whether the study is pending, how often and with which
instances it was dispatched, and the replacement record. The instance list
itself is always rebuilt from the spool directory, which is the truth. When
the write that marks a study pending fails,
:meth:`StudyAssembler.instance_stored` raises :class:`JournalWriteError` and
the listener answers the C-STORE with a failure, never Success.

One timer thread serves all studies; the ``on_ready`` callback runs on it. A
callback that raises is logged (without PHI) and retried with backoff: a study
is never dropped.
"""

from __future__ import annotations

import enum
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from dicom_io.durable import write_atomic
from dicom_io.spool import Spool, SpooledInstance, StoreOutcome, StoreResult
from dicom_io.uids import is_valid_uid, require_uid

__all__ = ["AssemblySink", "JournalWriteError", "ReadyStudy", "StudyAssembler", "Trigger"]

log = logging.getLogger(__name__)

STATE_VERSION = 1
_MAX_REPLACED_RECORDED = 50
_MAX_RETRY_SECONDS = 300.0


# Associations remembered between their connection closing and their release being
# reported (normally microseconds apart); the oldest are forgotten beyond this.
_MAX_CLOSED_UNRELEASED = 256


class Trigger(str, enum.Enum):
    """Why a study was declared ready."""

    QUIET = "quiet"
    """No instance of the study arrived for the quiet window."""
    RELEASED = "released"
    """Every association that carried it was released (PS3.8 §7.2), plus the grace period."""
    EXPECTED_COUNT = "expected-count"
    """Number of Study Related Instances (0020,1208) instances are in the spool."""
    RECOVERED = "recovered"
    """Pending when the listener stopped (or found on disk but not dispatched); re-dispatched."""

    def __str__(self) -> str:  # so "%s" and f-strings give the code
        return self.value


class JournalWriteError(Exception):
    """The study's journal could not be written durably; the instance must not be acknowledged."""


@dataclass(frozen=True)
class ReadyStudy:
    """A study handed to the consumer: all of its instances received so far."""

    study_uid: str
    instances: tuple[SpooledInstance, ...]
    amended: bool  # True if this study was dispatched before
    trigger: Trigger

    def __post_init__(self) -> None:
        # Accept the code as a string too (older callers); an unknown one is refused.
        object.__setattr__(self, "trigger", Trigger(self.trigger))


class AssemblySink(Protocol):
    """What the listener's C-STORE handlers report to: :class:`StudyAssembler`, or in a
    receiving process (:mod:`dicom_io.receivers`) the proxy of its listener's assembler."""

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def instance_stored(self, result: StoreResult, association_id: int | None = None) -> None:
        """Record a durably spooled instance; raises :class:`JournalWriteError` when the
        study journal could not be written (the instance must not be acknowledged)."""

    def association_released(self, association_id: int) -> None: ...

    def association_closed(self, association_id: int) -> None: ...


@dataclass
class _Study:
    study_uid: str
    instances: dict[str, SpooledInstance]
    dispatch_count: int = 0
    dispatched: set[str] = field(default_factory=set)
    pending: bool = False
    recovered: bool = False
    last_arrival: float = 0.0
    last_touch: float = 0.0
    open_assocs: set[int] = field(default_factory=set)
    released_at: float | None = None
    expected: int | None = None
    generation: int = 0
    retry_at: float | None = None
    failures: int = 0
    in_flight: bool = False
    replaced: int = 0
    replaced_recent: list[str] = field(default_factory=list)
    journal_stale: bool = False  # the last journal write failed


class StudyAssembler:
    """Collects spooled instances per study and dispatches complete studies."""

    def __init__(
        self,
        spool: Spool,
        on_ready: Callable[[ReadyStudy], None],
        *,
        quiet_seconds: float = 5.0,
        release_grace_seconds: float = 1.0,
        evict_after_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spool = spool
        self.on_ready = on_ready
        self.quiet = float(quiet_seconds)
        self.grace = float(release_grace_seconds)
        self.evict_after = float(evict_after_seconds)
        self._clock = clock
        self._studies: dict[str, _Study] = {}
        self._assoc_studies: dict[int, set[str]] = {}
        # Associations whose connection closed before their release was reported:
        # pynetdicom reports the close (its network thread) and the release (the
        # association's thread) from two threads, in either order.
        self._closed_unreleased: dict[int, set[str]] = {}
        self._cond = threading.Condition()
        # Journal writes are serialised so an older snapshot never overwrites a newer one.
        self._journal_lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------
    def start(self) -> None:
        """Recover pending studies from the journal and start the timer thread."""
        self.recover()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pneumo-assembly", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the timer thread. Pending studies stay pending in the journal."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def recover(self) -> int:
        """Load studies a previous run left pending; return how many.

        A study is pending when its journal says so, when it has files but no
        journal (a crash between the first instance and its journal write), or
        when files on disk are missing from the journal's dispatched set (a
        late instance spooled, then a crash before its journal update).
        Instances are compared by file name only; nothing is read.
        """
        now = self._clock()
        recovered = 0
        known_state: set[str] = set()
        for state_file in sorted(self.spool.state_dir.glob("*.json")):
            uid = state_file.name[: -len(".json")]
            if not is_valid_uid(uid):
                continue
            known_state.add(uid)
            state = self._read_state(uid)
            if state is None or state.get("pending") or self._undispatched_on_disk(uid, state):
                recovered += self._recover_one(uid, state or {}, now)
        for uid in self.spool.study_uids_on_disk():
            if uid not in known_state:
                recovered += self._recover_one(uid, {}, now)
        if recovered:
            log.info("recovered %d pending studies from the spool journal", recovered)
        return recovered

    def _undispatched_on_disk(self, uid: str, state: dict[str, Any]) -> bool:
        dispatched = set(state.get("dispatched", []))
        return not self.spool.sop_uids_on_disk(uid) <= dispatched

    def _recover_one(self, uid: str, state: dict[str, Any], now: float) -> int:
        instances = self.spool.scan_study(uid)
        if not instances:
            return 0
        study = self._study_from_state(uid, state, instances)
        study.pending = True
        study.recovered = True
        study.last_arrival = study.last_touch = now
        with self._cond:
            self._studies[uid] = study
            self._cond.notify_all()
        try:
            self._write_state(study)
        except JournalWriteError:
            pass  # logged; still pending in memory, and found on disk again after a restart
        return 1

    # --- events from the listener ---------------------------------------
    def instance_stored(self, result: StoreResult, association_id: int | None = None) -> None:
        """Record an instance the spool has durably written.

        Raises:
            JournalWriteError: the study's journal could not be written; the
                caller must not acknowledge the instance (the sender's retry
                writes the journal again).
        """
        inst = result.instance
        uid = inst.study_uid
        with self._cond:
            study = self._studies.get(uid)
        if study is None:
            study = self._load_study(uid)  # disk I/O outside the lock
        now = self._clock()
        write_state = False
        with self._cond:
            study = self._studies.setdefault(uid, study)
            duplicate = result.outcome is StoreOutcome.DUPLICATE
            if not duplicate or inst.sop_instance_uid not in study.instances:
                # An identical duplicate keeps the first record (and its received_at).
                study.instances[inst.sop_instance_uid] = inst
            study.last_touch = now
            already_dispatched = inst.sop_instance_uid in study.dispatched
            changed = not duplicate or not already_dispatched
            if result.outcome is StoreOutcome.REPLACED:
                study.replaced += 1
                study.replaced_recent = (study.replaced_recent + [inst.sop_instance_uid])[
                    -_MAX_REPLACED_RECORDED:
                ]
                write_state = True
                log.warning(
                    "instance %s of study %s replaced by different bytes (replaced=%d)",
                    inst.sop_instance_uid,
                    uid,
                    study.replaced,
                )
            if study.journal_stale:
                write_state = True
            if changed:
                if not study.pending:
                    write_state = True
                study.pending = True
                study.generation += 1
                study.recovered = False
                study.retry_at = None
            if study.pending:
                # Any arrival extends the quiet window of a pending study.
                study.last_arrival = now
                study.released_at = None
                if association_id is not None:
                    study.open_assocs.add(association_id)
                    self._assoc_studies.setdefault(association_id, set()).add(uid)
                    self._closed_unreleased.pop(association_id, None)  # an id reused
                if result.expected_count:
                    study.expected = result.expected_count
            self._cond.notify_all()
        if write_state:
            self._write_state(study)

    def association_released(self, association_id: int) -> None:
        """The peer released the association cleanly (A-RELEASE)."""
        self._association_ended(association_id, released=True)

    def association_closed(self, association_id: int) -> None:
        """The association ended (abort or connection loss, or after a release)."""
        self._association_ended(association_id, released=False)

    def _association_ended(self, association_id: int, *, released: bool) -> None:
        """Close the association's studies; a release reported after the close still counts.

        The studies of an association closed without (yet) a release are kept
        aside, a bounded few, so that its release, when it is reported second,
        starts their grace period instead of leaving them to the quiet window.
        """
        now = self._clock()
        with self._cond:
            uids = self._assoc_studies.pop(association_id, None)
            if uids is None and released:
                uids = self._closed_unreleased.pop(association_id, None)
            elif uids is not None and not released:
                self._closed_unreleased[association_id] = uids
                while len(self._closed_unreleased) > _MAX_CLOSED_UNRELEASED:
                    del self._closed_unreleased[next(iter(self._closed_unreleased))]
            for uid in uids or ():
                study = self._studies.get(uid)
                if study is None:
                    continue
                study.open_assocs.discard(association_id)
                if released and study.pending and not study.open_assocs:
                    study.released_at = now
            self._cond.notify_all()

    # --- introspection ----------------------------------------------------
    def pending_study_uids(self) -> list[str]:
        with self._cond:
            return sorted(uid for uid, s in self._studies.items() if s.pending)

    def study_record(self, study_uid: str) -> dict[str, Any]:
        """The persisted journal of a study (dispatch count, replacements...)."""
        return self._read_state(require_uid(study_uid, "Study Instance UID")) or {}

    # --- the timer thread -------------------------------------------------
    def _due(self, study: _Study) -> tuple[float, Trigger]:
        if study.retry_at is not None:
            return study.retry_at, Trigger.RECOVERED if study.recovered else Trigger.QUIET
        quiet_trigger = Trigger.RECOVERED if study.recovered else Trigger.QUIET
        options = [(study.last_arrival + self.quiet, quiet_trigger)]
        if study.released_at is not None and not study.open_assocs:
            options.append((study.released_at + self.grace, Trigger.RELEASED))
        if study.expected is not None and len(study.instances) >= study.expected:
            options.append((study.last_arrival, Trigger.EXPECTED_COUNT))
        return min(options, key=lambda o: o[0])

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                now = self._clock()
                ready: list[tuple[_Study, Trigger]] = []
                next_due = now + 60.0
                for uid, study in list(self._studies.items()):
                    if not study.pending:
                        if now - study.last_touch > self.evict_after and not study.in_flight:
                            del self._studies[uid]
                        continue
                    if study.in_flight:
                        continue
                    due, trigger = self._due(study)
                    if due <= now:
                        ready.append((study, trigger))
                    else:
                        next_due = min(next_due, due)
                if not ready:
                    self._cond.wait(timeout=max(0.0, next_due - now))
                    continue
                snapshots = []
                for study, trigger in ready:
                    study.in_flight = True
                    snapshots.append(
                        (
                            study,
                            study.generation,
                            ReadyStudy(
                                study_uid=study.study_uid,
                                instances=tuple(
                                    sorted(
                                        study.instances.values(),
                                        key=lambda i: (i.series_uid, i.sop_instance_uid),
                                    )
                                ),
                                amended=study.dispatch_count > 0,
                                trigger=trigger,
                            ),
                        )
                    )
            for study, generation, ready_study in snapshots:
                self._dispatch(study, generation, ready_study)

    def _dispatch(self, study: _Study, generation: int, ready: ReadyStudy) -> None:
        try:
            self.on_ready(ready)
        except Exception as exc:  # a consumer bug must not lose the study
            with self._cond:
                study.in_flight = False
                study.failures += 1
                delay = min(_MAX_RETRY_SECONDS, max(self.quiet, 0.5) * 2 ** (study.failures - 1))
                study.retry_at = self._clock() + delay
                self._cond.notify_all()
            log.error(
                "study-ready callback failed for study %s (%s); retrying in %.1fs",
                ready.study_uid,
                type(exc).__name__,
                delay,
            )
            return
        with self._cond:
            study.in_flight = False
            study.failures = 0
            study.retry_at = None
            study.dispatch_count += 1
            study.dispatched = {i.sop_instance_uid for i in ready.instances}
            study.last_touch = self._clock()
            if study.generation == generation:
                study.pending = False
                study.recovered = False
            self._cond.notify_all()
        log.info(
            "study %s ready: %d instances, trigger=%s, amended=%s",
            ready.study_uid,
            len(ready.instances),
            ready.trigger,
            ready.amended,
        )
        try:
            self._write_state(study)
        except JournalWriteError:
            # Logged; at worst the study is dispatched again after a restart.
            pass

    # --- journal ------------------------------------------------------------
    def _state_path(self, study_uid: str) -> Path:
        return self.spool.state_dir / f"{require_uid(study_uid, 'Study Instance UID')}.json"

    def _read_state(self, study_uid: str) -> dict[str, Any] | None:
        try:
            state = json.loads(self._state_path(study_uid).read_text())
            return state if isinstance(state, dict) else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("journal of study %s unreadable; rebuilding from spool", study_uid)
            return None

    def _study_from_state(
        self, uid: str, state: dict[str, Any], instances: list[SpooledInstance]
    ) -> _Study:
        return _Study(
            study_uid=uid,
            instances={i.sop_instance_uid: i for i in instances},
            dispatch_count=int(state.get("dispatch_count", 0)),
            dispatched=set(state.get("dispatched", [])),
            pending=bool(state.get("pending", False)),
            replaced=int(state.get("replaced", 0)),
            replaced_recent=list(state.get("replaced_recent", [])),
        )

    def _load_study(self, uid: str) -> _Study:
        state = self._read_state(uid) or {}
        study = self._study_from_state(uid, state, self.spool.scan_study(uid))
        study.last_touch = self._clock()
        return study

    def _write_state(self, study: _Study) -> None:
        with self._journal_lock:
            self._write_state_locked(study)

    def _write_state_locked(self, study: _Study) -> None:
        with self._cond:
            state = {
                "version": STATE_VERSION,
                "study_uid": study.study_uid,
                "pending": study.pending,
                "dispatch_count": study.dispatch_count,
                "dispatched": sorted(study.dispatched),
                "instances": len(study.instances),
                "replaced": study.replaced,
                "replaced_recent": list(study.replaced_recent),
                "updated_at": datetime.now(UTC).isoformat(),
            }
        try:
            write_atomic(self._state_path(study.study_uid), json.dumps(state).encode())
        except OSError as exc:
            with self._cond:
                study.journal_stale = True
            log.error("could not write journal of study %s: %s", study.study_uid, exc.strerror)
            raise JournalWriteError("study journal write failed") from None
        with self._cond:
            study.journal_stale = False
