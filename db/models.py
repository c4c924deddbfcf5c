"""The typed ORM schema: studies, instances, processing jobs, results and deliveries.

The Alembic migrations in ``db/migrations/versions`` are the schema of record; a
test checks that an upgraded empty database has exactly these tables, columns
and indexes.

PHI is kept to what the staff queries need: Patient ID, Accession Number and
Study Date (indexed lookups) and Patient's Age (the intended-use check). No
names, no birth dates.
"""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Deterministic constraint names, so migrations and models agree on every dialect.
__all__ = [
    "model_label",
    "Base",
    "Delivery",
    "DeliveryStatus",
    "ImageResult",
    "Instance",
    "Job",
    "JobKind",
    "JobStatus",
    "ModelActivation",
    "ModelVersion",
    "NAMING_CONVENTION",
    "Result",
    "ResultStatus",
    "SelectionStatus",
    "Study",
    "StudyStatus",
    "UID_LENGTH",
    "WorkerHeartbeat",
    "utcnow",
]

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID_LENGTH = 64  # PS3.5 §9.1


def utcnow() -> datetime:
    return datetime.now(UTC)


class StudyStatus(str, enum.Enum):
    """Where a study is in the pipeline."""

    RECEIVING = "receiving"  # instances arriving, not yet dispatched
    QUEUED = "queued"  # process_study enqueued
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"  # an attempt failed; a retry is scheduled
    DEAD_LETTER = "dead-letter"  # the last retry failed; needs a person


class SelectionStatus(str, enum.Enum):
    PENDING = "pending"  # received, not yet looked at by a worker
    SELECTED = "selected"
    SKIPPED = "skipped"  # see Instance.skip_reason (codes from dicom_io.selection)


class JobKind(str, enum.Enum):
    PROCESS = "process"
    DELIVER = "deliver"


class JobStatus(str, enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    RETRYING = "retrying"
    DEAD_LETTER = "dead-letter"


class ResultStatus(str, enum.Enum):
    COMPLETE = "complete"  # at least one usable image was read by the model
    NO_USABLE_IMAGE = "no-usable-image"  # every instance skipped or not a chest X-ray


class DeliveryStatus(str, enum.Enum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # VARCHAR + CHECK (not a native PG enum): adding a value later is a plain migration.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON,
        list[str]: JSON,
    }


class ModelVersion(Base):
    """A model weights file that produced results (name, version and file hash)."""

    __tablename__ = "model_version"
    __table_args__ = (UniqueConstraint("name", "version", "sha256"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    threshold: Mapped[float] = mapped_column(Float)
    intended_population: Mapped[str] = mapped_column(Text, default="")
    max_age_years: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def label(self) -> str:
        """How people name it: ``pneumonet-1.0.0``."""
        return model_label(self.name, self.version)


class ModelActivation(Base):
    """One ``pneumo models activate``: the model version new work loads, and from which file.

    Append-only: the newest row (highest id) is the active model, one for the
    whole installation (:mod:`db.models_registry`); earlier rows are the
    history of who activated what, when. ``path`` is the weights file as the
    workers see it; its sha256 must equal the model version's, or the worker
    refuses to load it.
    """

    __tablename__ = "model_activation"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    activated_by: Mapped[str] = mapped_column(String(128))  # OS user (CLI) or token user (API)
    activated_at: Mapped[datetime] = mapped_column(default=utcnow)

    model_version: Mapped[ModelVersion] = relationship()


def model_label(name: str, version: str) -> str:
    """The one spelling of a model version for people: ``<name>-<version>``."""
    return f"{name}-{version}"


class Study(Base):
    __tablename__ = "study"
    __table_args__ = (
        Index(None, "patient_id"),
        Index(None, "accession_number"),
        Index(None, "study_date"),
        Index(None, "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))  # PHI: staff lookup
    accession_number: Mapped[str | None] = mapped_column(String(16))  # PHI: staff lookup
    study_date: Mapped[date | None] = mapped_column(Date)
    patient_age: Mapped[str | None] = mapped_column(String(4))  # AS VR, e.g. "007Y"
    status: Mapped[StudyStatus] = mapped_column(
        _enum(StudyStatus, "study_status"), default=StudyStatus.RECEIVING
    )
    revision: Mapped[int] = mapped_column(Integer, default=0)  # 0 = never dispatched
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    republished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    """When the reconciler last re-published its wake-up (worker.reconciler); None = never."""
    last_error: Mapped[str | None] = mapped_column(Text)  # never PHI: exception type + message

    instances: Mapped[list[Instance]] = relationship(back_populates="study", order_by="Instance.id")
    results: Mapped[list[Result]] = relationship(back_populates="study", order_by="Result.id")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.id")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    series_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    selection: Mapped[SelectionStatus] = mapped_column(
        _enum(SelectionStatus, "selection_status"), default=SelectionStatus.PENDING
    )
    skip_reason: Mapped[str | None] = mapped_column(String(128))

    study: Mapped[Study] = relationship(back_populates="instances")


class Job(Base):
    """One processing (or delivery) attempt: which queue, which host, when, what went wrong."""

    __tablename__ = "job"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind, "job_kind"))
    task_id: Mapped[str | None] = mapped_column(String(64))
    queue: Mapped[str | None] = mapped_column(String(64))
    worker_host: Mapped[str | None] = mapped_column(String(255))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus, "job_status"), default=JobStatus.RUNNING, index=True
    )
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(nullable=True)
    error: Mapped[str | None] = mapped_column(Text)

    study: Mapped[Study] = relationship(back_populates="jobs")


class Result(Base):
    """The model's answer for one study, one model version, one revision of the study."""

    __tablename__ = "result"
    __table_args__ = (
        UniqueConstraint("study_id", "model_version_id", "revision"),
        Index(None, "finding"),
        Index(None, "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    status: Mapped[ResultStatus] = mapped_column(_enum(ResultStatus, "result_status"))
    probability: Mapped[float | None] = mapped_column(Float)  # max over usable images
    finding: Mapped[bool | None] = mapped_column(Boolean)
    threshold: Mapped[float] = mapped_column(Float)
    ood: Mapped[bool] = mapped_column(Boolean, default=False)  # some image not a chest X-ray
    outside_intended_use: Mapped[bool] = mapped_column(Boolean, default=False)
    flags: Mapped[list[str]] = mapped_column(default=list)
    summary: Mapped[str] = mapped_column(Text, default="")
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    sr_path: Mapped[str | None] = mapped_column(Text)
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # stage -> seconds
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    study: Mapped[Study] = relationship(back_populates="results")
    model_version: Mapped[ModelVersion] = relationship()
    images: Mapped[list[ImageResult]] = relationship(
        back_populates="result", order_by="ImageResult.id"
    )
    deliveries: Mapped[list[Delivery]] = relationship(
        back_populates="result", order_by="Delivery.id"
    )


class ImageResult(Base):
    __tablename__ = "image_result"
    __table_args__ = (UniqueConstraint("result_id", "instance_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("result.id", ondelete="CASCADE"))
    instance_id: Mapped[int] = mapped_column(ForeignKey("instance.id", ondelete="CASCADE"))
    probability: Mapped[float] = mapped_column(Float)
    ood_score: Mapped[float] = mapped_column(Float)
    is_chest: Mapped[bool] = mapped_column(Boolean)
    finding: Mapped[bool] = mapped_column(Boolean)
    sc_sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    sc_path: Mapped[str | None] = mapped_column(Text)

    result: Mapped[Result] = relationship(back_populates="images")
    instance: Mapped[Instance] = relationship()


class Delivery(Base):
    """Delivery state of one result to one destination (``AE@host:port``)."""

    __tablename__ = "delivery"
    __table_args__ = (UniqueConstraint("result_id", "destination"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("result.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(300))
    status: Mapped[DeliveryStatus] = mapped_column(
        _enum(DeliveryStatus, "delivery_status"), default=DeliveryStatus.PENDING, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(nullable=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    result: Mapped[Result] = relationship(back_populates="deliveries")


class WorkerHeartbeat(Base):
    """A Celery worker's sign of life, written every few seconds by its main process.

    ``active_tasks`` lists the task ids the worker was running at ``beat_at``:
    a ``running`` job whose worker beats without its task is no longer running
    (worker.heartbeat, worker.reconciler).
    """

    __tablename__ = "worker_heartbeat"

    worker: Mapped[str] = mapped_column(String(255), primary_key=True)  # Celery node name
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    beat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    active_tasks: Mapped[list[str]] = mapped_column(default=list)
