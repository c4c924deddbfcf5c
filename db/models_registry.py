"""Which model version new work uses: activations of model versions (``pneumo models activate``).

One model is active for the whole installation: the model version of the
newest :class:`db.models.ModelActivation` row (highest id), with the weights
file recorded there. Activations are appended, never updated, so the table is
also the history of who activated what and when. Reading the active model is
one query on the primary key (:func:`active_model`): cheap enough for a worker
to ask at the start of every study and notice a new activation without a
restart.

A model version is registered (:func:`db.repository.ensure_model_version`)
with the sha256 of its weights file; the worker checks the file against that
sha256 before it loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.diff import UnknownVersion
from db.models import ModelActivation, ModelVersion, model_label
from db.queries import model_version_matches

__all__ = [
    "ActiveModel",
    "RegisteredVersion",
    "activate",
    "active_model",
    "activation_paths",
    "registered_versions",
]


@dataclass(frozen=True)
class ActiveModel:
    """The model version new work loads, and the weights file it is loaded from."""

    activation_id: int
    """Changes with every activation: a worker reloads when it sees a new one."""
    model_version_id: int
    name: str
    version: str
    sha256: str
    """What the weights file must hash to."""
    threshold: float
    path: str
    """The weights file, as the workers see it."""
    activated_by: str
    activated_at: datetime

    @property
    def label(self) -> str:
        return model_label(self.name, self.version)


@dataclass(frozen=True)
class RegisteredVersion:
    """A model version row, as :func:`registered_versions` finds it."""

    model_version_id: int
    name: str
    version: str
    sha256: str
    threshold: float

    @property
    def label(self) -> str:
        return model_label(self.name, self.version)


def active_model(session: Session) -> ActiveModel | None:
    """The active model; None when no model was ever activated (the configured file is used)."""
    row = session.execute(
        select(
            ModelActivation.id,
            ModelActivation.model_version_id,
            ModelVersion.name,
            ModelVersion.version,
            ModelVersion.sha256,
            ModelVersion.threshold,
            ModelActivation.path,
            ModelActivation.activated_by,
            ModelActivation.activated_at,
        )
        .join(ModelVersion, ModelVersion.id == ModelActivation.model_version_id)
        .order_by(ModelActivation.id.desc())
        .limit(1)
    ).one_or_none()
    return None if row is None else ActiveModel(*row)


def activate(session: Session, model_version_id: int, path: str, activated_by: str) -> ActiveModel:
    """Make ``model_version_id``, loaded from ``path``, the model new work uses.

    The caller has checked that ``path`` hashes to the version's sha256 (the
    worker checks it again before loading).

    Raises:
        LookupError: no model version has ``model_version_id``.
        ValueError: ``path`` or ``activated_by`` is empty.
    """
    if not path.strip():
        raise ValueError("path must not be empty")
    if not activated_by.strip():
        raise ValueError("activated_by must not be empty")
    if session.get(ModelVersion, model_version_id) is None:
        raise LookupError(f"no model version with id {model_version_id}")
    session.add(
        ModelActivation(model_version_id=model_version_id, path=path, activated_by=activated_by)
    )
    session.flush()
    active = active_model(session)
    assert active is not None  # the row just added
    return active


def registered_versions(session: Session, label: str) -> list[RegisteredVersion]:
    """The model versions ``label`` ("1.0.0" or "pneumonet-1.0.0") names, newest first.

    Raises:
        UnknownVersion: no model version is called ``label``.
    """
    rows = session.execute(
        select(
            ModelVersion.id,
            ModelVersion.name,
            ModelVersion.version,
            ModelVersion.sha256,
            ModelVersion.threshold,
        )
        .where(model_version_matches(label))
        .order_by(ModelVersion.id.desc())
    ).all()
    if not rows:
        raise UnknownVersion.listing_known(session, label)
    return [RegisteredVersion(*row) for row in rows]


def activation_paths(session: Session, model_version_id: int) -> list[str]:
    """The weights files ``model_version_id`` was activated from, newest first, each once."""
    paths = session.execute(
        select(ModelActivation.path)
        .where(ModelActivation.model_version_id == model_version_id)
        .order_by(ModelActivation.id.desc())
    ).scalars()
    return list(dict.fromkeys(paths))
