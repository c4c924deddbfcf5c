"""Tokens hashed at rest, roles, the append-only audit trail, feedback, migration 0002."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, delete, inspect, select, text, update

from db import access, migrate
from db.access import (
    Agreement,
    ApiToken,
    AuditAction,
    AuditEvent,
    FinalLabel,
    Permission,
    Role,
)
from db.engine import session_scope
from db.models import Base, utcnow
from tests.api.seed import seed


def test_migration_matches_models_and_downgrades(db_url: str) -> None:
    migrate.upgrade(db_url)
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []
    migrate.downgrade(db_url, "0001")
    engine = create_engine(db_url)
    try:
        names = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"api_token", "audit_event", "feedback"}.isdisjoint(names) and "study" in names
    migrate.upgrade(db_url)


def test_tokens_are_stored_hashed_and_revocable(db_url: str) -> None:
    migrate.upgrade(db_url)
    with session_scope(db_url) as s:
        token_id, token = access.create_token(s, user="dr.house", role=Role.RADIOLOGIST)
    assert token.startswith(access.TOKEN_PREFIX) and len(token) > 40
    with session_scope(db_url) as s:
        stored = s.execute(select(ApiToken)).scalar_one()
        dump = " ".join(str(v) for v in s.execute(text("SELECT * FROM api_token")).one())
        identity = access.identify(s, token)
        assert access.identify(s, token + "x") is None
        assert access.identify(s, "Bearer " + token) is None
    assert token not in dump and stored.token_sha256 == access.hash_token(token)
    assert identity == access.Identity(token_id, "dr.house", Role.RADIOLOGIST)
    with session_scope(db_url) as s:
        assert access.revoke_token(s, token_id)
        assert not access.revoke_token(s, token_id)  # already revoked
        assert access.identify(s, token) is None
        rows = access.list_tokens(s)
    assert rows[0].revoked_at is not None
    with session_scope(db_url) as s, pytest.raises(ValueError, match="user"):
        access.create_token(s, user="  ", role=Role.VIEWER)


def test_roles_grant_fixed_permissions() -> None:
    assert Role.RADIOLOGIST.allows(Permission.FEEDBACK)
    assert not Role.VIEWER.allows(Permission.FEEDBACK)
    assert Role.OPERATOR.allows(Permission.REPROCESS) and not Role.OPERATOR.allows(
        Permission.FEEDBACK
    )
    assert Role.ADMIN.allows(Permission.MANAGE_TOKENS) and not Role.VIEWER.allows(
        Permission.MANAGE_TOKENS
    )
    assert all(role.allows(Permission.READ) for role in Role)


def test_audit_is_append_only(db_url: str) -> None:
    migrate.upgrade(db_url)
    with session_scope(db_url) as s:
        access.record_audit(
            s,
            user="u",
            role=Role.VIEWER,
            action=AuditAction.READ_STUDY,
            study_uid="1.2.3",
            client="10.0.0.1",
        )
        access.record_audit(s, user="v", role=None, action=AuditAction.LIST_STUDIES, client="cli")
    with session_scope(db_url) as s:
        rows = access.audit_events(s)
        assert [r.user for r in rows] == ["v", "u"]
        assert [r.user for r in access.audit_events(s, study_uid="1.2.3")] == ["u"]
        assert access.audit_events(s, since=utcnow() + timedelta(minutes=1)) == []
    assert rows[1].as_dict()["client"] == "10.0.0.1"
    with pytest.raises(PermissionError), session_scope(db_url) as s:  # the ORM refuses
        event = s.execute(select(AuditEvent).limit(1)).scalar_one()
        event.user = "someone else"
    for sql in (update(AuditEvent).values(user="x"), delete(AuditEvent)):  # the database refuses
        with pytest.raises(Exception, match="append-only"), session_scope(db_url) as s:
            s.execute(sql)
    with session_scope(db_url) as s:
        assert len(access.audit_events(s)) == 2


def test_feedback_per_study_and_revision(db_url: str, tmp_path: Path) -> None:
    studies = seed(db_url, tmp_path)
    uid = studies[0].study_uid
    with session_scope(db_url) as s:
        _, t1 = access.create_token(s, user="rad", role=Role.RADIOLOGIST)
        _, t2 = access.create_token(s, user="view", role=Role.VIEWER)
        radiologist, viewer = access.identify(s, t1), access.identify(s, t2)
    assert radiologist is not None and viewer is not None
    with session_scope(db_url) as s:
        with pytest.raises(PermissionError):
            access.record_feedback(
                s,
                study_uid=uid,
                revision=1,
                result_id=None,
                agreement=Agreement.AGREE,
                final_label=None,
                identity=viewer,
            )
        with pytest.raises(LookupError):
            access.record_feedback(
                s,
                study_uid="9.9",
                revision=1,
                result_id=None,
                agreement=Agreement.AGREE,
                final_label=None,
                identity=radiologist,
            )
        access.record_feedback(
            s,
            study_uid=uid,
            revision=1,
            result_id=None,
            agreement=Agreement.DISAGREE,
            final_label=FinalLabel.OTHER_FINDING,
            identity=radiologist,
        )
    with session_scope(db_url) as s:
        rows = access.feedback_rows(s)
        assert access.feedback_rows(s, study_uids=["9.9"]) == []
    assert [(r.study_uid, r.revision, r.agreement, r.final_label, r.user) for r in rows] == [
        (uid, 1, Agreement.DISAGREE, FinalLabel.OTHER_FINDING, "rad")
    ]
