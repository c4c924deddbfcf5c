"""Who may see what, who saw what, and what staff said: API tokens, the audit trail, feedback.

* **Tokens** are bearer secrets given once to a person with one :class:`Role`; only
  the SHA-256 of a token is stored, so a copy of the database lets nobody sign in.
* **Audit events** follow the spirit of IHE ATNA (who, in which role, did what, to
  which study, when, from where). The product only ever inserts them: this module
  offers no update or delete, the ORM refuses both, and the migration adds a
  database trigger that refuses them too.
* **Feedback** is a radiologist's verdict on one revision of a study's result: the
  ground truth later monitoring of the model in production will use.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, event, select, update
from sqlalchemy.orm import Mapped, Mapper, Session, mapped_column

from db.models import UID_LENGTH, Base, Study, _enum, utcnow

__all__ = [
    "Agreement",
    "ApiToken",
    "AuditAction",
    "AuditEvent",
    "AuditRow",
    "Feedback",
    "FeedbackRow",
    "FinalLabel",
    "Identity",
    "Permission",
    "Role",
    "TOKEN_PREFIX",
    "TokenRow",
    "audit_events",
    "create_token",
    "feedback_rows",
    "hash_token",
    "identify",
    "list_tokens",
    "record_audit",
    "record_feedback",
    "revoke_token",
]

TOKEN_PREFIX = "pnt_"  # lets secret scanners and people recognise a pneumo token
USER_LENGTH = 64


class Permission(str, enum.Enum):
    """One thing a request may do."""

    READ = "read"
    """See studies, results, images and models (patient data)."""
    FEEDBACK = "feedback"
    """Agree or disagree with a result and give the final label."""
    REPROCESS = "reprocess"
    """Queue a stored study again."""
    MANAGE_TOKENS = "manage-tokens"
    """Create, list and revoke tokens; read the audit trail."""


class Role(str, enum.Enum):
    """What a token holder is; each role grants a fixed set of :class:`Permission`."""

    VIEWER = "viewer"
    """Reads results."""
    RADIOLOGIST = "radiologist"
    """Reads results and gives feedback on them."""
    OPERATOR = "operator"
    """Reads results and reprocesses studies."""
    ADMIN = "admin"
    """Manages tokens and reads the audit trail (and results)."""

    def allows(self, permission: Permission) -> bool:
        return permission in _GRANTS[self]


_GRANTS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.READ}),
    Role.RADIOLOGIST: frozenset({Permission.READ, Permission.FEEDBACK}),
    Role.OPERATOR: frozenset({Permission.READ, Permission.REPROCESS}),
    Role.ADMIN: frozenset({Permission.READ, Permission.MANAGE_TOKENS}),
}


class AuditAction(str, enum.Enum):
    """What an audited request did."""

    LIST_STUDIES = "list-studies"
    """Searched or listed studies (patient IDs and accessions were shown)."""
    READ_STUDY = "read-study"
    """Opened one study's result."""
    READ_IMAGE = "read-image"
    """Fetched an image of a study."""
    READ_HEATMAP = "read-heatmap"
    """Fetched a heatmap of a study."""
    READ_FHIR = "read-fhir"
    """Read FHIR DiagnosticReports."""
    GIVE_FEEDBACK = "give-feedback"
    """Recorded feedback on a result."""
    REPROCESS = "reprocess"
    """Queued a study again."""
    EXPORT_FEEDBACK = "export-feedback"
    """Exported every feedback row."""
    READ_AUDIT = "read-audit"
    """Read the audit trail."""
    CREATE_TOKEN = "create-token"
    """Created a token."""
    REVOKE_TOKEN = "revoke-token"
    """Revoked a token."""
    SIGN_IN = "sign-in"
    """Signed in to the worklist page."""
    SIGN_IN_FAILED = "sign-in-failed"
    """Presented an unknown or revoked token."""


class Agreement(str, enum.Enum):
    """The radiologist's verdict on the model's finding."""

    AGREE = "agree"
    DISAGREE = "disagree"


class FinalLabel(str, enum.Enum):
    """The radiologist's own reading of the study."""

    PNEUMONIA = "pneumonia"
    NO_PNEUMONIA = "no-pneumonia"
    OTHER_FINDING = "other-finding"


class ApiToken(Base):
    """A bearer token: who holds it, in which role; only its SHA-256 is kept."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(primary_key=True)
    user: Mapped[str] = mapped_column(String(USER_LENGTH))
    role: Mapped[Role] = mapped_column(_enum(Role, "role"))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)


class AuditEvent(Base):
    """One audited action. Insert-only (see the module docstring)."""

    __tablename__ = "audit_event"
    __table_args__ = (Index(None, "at"), Index(None, "user"), Index(None, "study_uid"))

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    user: Mapped[str] = mapped_column(String(USER_LENGTH))
    role: Mapped[Role | None] = mapped_column(_enum(Role, "role"), nullable=True)  # None: CLI
    action: Mapped[AuditAction] = mapped_column(_enum(AuditAction, "audit_action"))
    study_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH), nullable=True)
    client: Mapped[str] = mapped_column(String(64), default="")


class Feedback(Base):
    """A radiologist's verdict on one revision of a study's result; later rows supersede."""

    __tablename__ = "feedback"
    __table_args__ = (Index(None, "study_id", "revision"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"))
    revision: Mapped[int] = mapped_column(Integer)
    result_id: Mapped[int | None] = mapped_column(
        ForeignKey("result.id", ondelete="SET NULL"), nullable=True
    )
    agreement: Mapped[Agreement] = mapped_column(_enum(Agreement, "agreement"))
    final_label: Mapped[FinalLabel | None] = mapped_column(
        _enum(FinalLabel, "final_label"), nullable=True
    )
    user: Mapped[str] = mapped_column(String(USER_LENGTH))
    role: Mapped[Role] = mapped_column(_enum(Role, "role"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


def _refuse_change(_mapper: Mapper[Any], _connection: Any, target: AuditEvent) -> None:
    raise PermissionError("audit events are append-only")


event.listen(AuditEvent, "before_update", _refuse_change)
event.listen(AuditEvent, "before_delete", _refuse_change)


# --- tokens ---------------------------------------------------------------------------


def hash_token(token: str) -> str:
    """The stored form of a token: hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Identity:
    """Who a valid token belongs to."""

    token_id: int
    user: str
    role: Role

    def allows(self, permission: Permission) -> bool:
        return self.role.allows(permission)


@dataclass(frozen=True)
class TokenRow:
    """One line of ``pneumo tokens list`` (never the token itself)."""

    id: int
    user: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None


def _check_user(user: str) -> str:
    user = user.strip()
    if not user or len(user) > USER_LENGTH:
        raise ValueError(f"user: 1 to {USER_LENGTH} characters needed")
    return user


def create_token(session: Session, *, user: str, role: Role) -> tuple[int, str]:
    """Make a new token for ``user`` in ``role``; return (its id, the token).

    The token (32 random bytes) is returned once and never stored.

    Raises:
        ValueError: ``user`` is empty or longer than 64 characters.
    """
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user=_check_user(user), role=Role(role), token_sha256=hash_token(token))
    session.add(row)
    session.flush()
    return row.id, token


def identify(session: Session, token: str) -> Identity | None:
    """The holder of ``token``; None when it is unknown or revoked."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    row = session.execute(
        select(ApiToken.id, ApiToken.user, ApiToken.role).where(
            ApiToken.token_sha256 == hash_token(token), ApiToken.revoked_at.is_(None)
        )
    ).one_or_none()
    return None if row is None else Identity(int(row[0]), str(row[1]), Role(row[2]))


def list_tokens(session: Session) -> list[TokenRow]:
    rows = session.execute(select(ApiToken).order_by(ApiToken.id)).scalars()
    return [TokenRow(t.id, t.user, t.role, t.created_at, t.revoked_at) for t in rows]


def revoke_token(session: Session, token_id: int) -> bool:
    """Revoke a token by id; False when no such token is still active."""
    done = session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return bool(getattr(done, "rowcount", 0))


# --- audit ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRow:
    """One line of ``pneumo audit``."""

    at: datetime
    user: str
    role: Role | None
    action: AuditAction
    study_uid: str | None
    client: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "user": self.user,
            "role": None if self.role is None else self.role.value,
            "action": self.action.value,
            "study_uid": self.study_uid,
            "client": self.client,
        }


def record_audit(
    session: Session,
    *,
    user: str,
    role: Role | None,
    action: AuditAction,
    study_uid: str | None = None,
    client: str = "",
) -> None:
    """Append one audit event (committed with the caller's transaction)."""
    session.add(
        AuditEvent(
            at=utcnow(),
            user=user[:USER_LENGTH],
            role=role,
            action=action,
            study_uid=study_uid,
            client=client[:64],
        )
    )


def audit_events(
    session: Session,
    *,
    user: str | None = None,
    study_uid: str | None = None,
    since: datetime | None = None,
    limit: int = 1000,
) -> list[AuditRow]:
    """Audit events, newest first."""
    stmt = select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)
    if user is not None:
        stmt = stmt.where(AuditEvent.user == user)
    if study_uid is not None:
        stmt = stmt.where(AuditEvent.study_uid == study_uid)
    if since is not None:
        stmt = stmt.where(AuditEvent.at >= since)
    return [
        AuditRow(e.at, e.user, e.role, e.action, e.study_uid, e.client)
        for e in session.execute(stmt).scalars()
    ]


# --- feedback -------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackRow:
    """One recorded verdict, with the study it is about."""

    study_uid: str
    revision: int
    result_id: int | None
    agreement: Agreement
    final_label: FinalLabel | None
    user: str
    role: Role
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "revision": self.revision,
            "result_id": self.result_id,
            "agreement": self.agreement.value,
            "final_label": None if self.final_label is None else self.final_label.value,
            "user": self.user,
            "role": self.role.value,
            "created_at": self.created_at.isoformat(),
        }


def record_feedback(
    session: Session,
    *,
    study_uid: str,
    revision: int,
    result_id: int | None,
    agreement: Agreement,
    final_label: FinalLabel | None,
    identity: Identity,
) -> FeedbackRow:
    """Store a verdict on ``revision`` of the study.

    Raises:
        LookupError: no study has ``study_uid``.
        PermissionError: ``identity``'s role may not give feedback.
    """
    if not identity.allows(Permission.FEEDBACK):
        raise PermissionError(f"role {identity.role.value} may not give feedback")
    study_id = session.execute(
        select(Study.id).where(Study.study_uid == study_uid)
    ).scalar_one_or_none()
    if study_id is None:
        raise LookupError("no such study")
    row = Feedback(
        study_id=study_id,
        revision=revision,
        result_id=result_id,
        agreement=Agreement(agreement),
        final_label=None if final_label is None else FinalLabel(final_label),
        user=identity.user,
        role=identity.role,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return FeedbackRow(
        study_uid, revision, result_id, row.agreement, row.final_label, row.user, row.role,
        row.created_at,
    )  # fmt: skip


def feedback_rows(
    session: Session, *, study_uids: Sequence[str] | None = None
) -> list[FeedbackRow]:
    """Recorded feedback, oldest first; only for ``study_uids`` when given."""
    stmt = (
        select(Feedback, Study.study_uid)
        .join(Study, Feedback.study_id == Study.id)
        .order_by(Feedback.created_at, Feedback.id)
    )
    if study_uids is not None:
        stmt = stmt.where(Study.study_uid.in_(list(study_uids)))
    return [
        FeedbackRow(uid, f.revision, f.result_id, f.agreement, f.final_label, f.user, f.role,
                    f.created_at)
        for f, uid in session.execute(stmt).all()
    ]  # fmt: skip
