"""``pneumo tokens``, ``audit``, ``feedback export`` and ``api`` address resolution."""

from __future__ import annotations

import argparse
import csv
import io
import json
from contextlib import redirect_stdout
from typing import Any

import pytest

from db import access
from db.access import Agreement, FinalLabel
from db.engine import session_scope
from pneumo.commands import staff
from pneumo.settings import load_settings
from tests.api.conftest import StaffDb

pytestmark = pytest.mark.postgres


def _run(argv: list[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    staff.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out = io.StringIO()
    with redirect_stdout(out):
        code = args.func(args)
    return int(code), out.getvalue()


@pytest.fixture
def env(staff_db: StaffDb, monkeypatch: pytest.MonkeyPatch) -> StaffDb:
    monkeypatch.setenv("PNEUMO_DATABASE_URL", staff_db.url)
    monkeypatch.setenv("PNEUMO_DATA_DIR", str(staff_db.data_dir))
    return staff_db


def test_tokens_create_list_revoke(env: StaffDb) -> None:
    code, out = _run(["tokens", "create", "--user", "dr.new", "--role", "radiologist"])
    token = out.strip()
    assert code == 0 and token.startswith("pnt_")
    with session_scope(env.url) as s:
        identity = access.identify(s, token)
    assert identity is not None and identity.user == "dr.new"
    code, out = _run(["tokens", "list", "--format", "json"])
    listing: list[dict[str, Any]] = json.loads(out)
    assert token not in out and listing[-1]["user"] == "dr.new"
    assert _run(["tokens", "revoke", str(listing[-1]["id"])])[0] == 0
    assert _run(["tokens", "revoke", str(listing[-1]["id"])])[0] == 1
    with session_scope(env.url) as s:
        assert access.identify(s, token) is None
    assert _run(["tokens", "create", "--user", " ", "--role", "viewer"])[0] == 2


def test_audit_and_feedback_export(env: StaffDb) -> None:
    uid = env.studies[0].study_uid
    with session_scope(env.url) as s:
        radiologist = access.identify(s, env.tokens["radiologist"])
        assert radiologist is not None
        access.record_feedback(s, study_uid=uid, revision=1, result_id=None, agreement=Agreement.AGREE,
                               final_label=FinalLabel.PNEUMONIA, identity=radiologist)  # fmt: skip
        access.record_audit(s, user="radiologist-user", role=access.Role.RADIOLOGIST,
                            action=access.AuditAction.READ_STUDY, study_uid=uid, client="10.1.2.3")  # fmt: skip
    code, out = _run(["feedback", "export", "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [(r["study_uid"], r["agreement"], r["final_label"]) for r in rows] == [
        (uid, "agree", "pneumonia")
    ]
    code, out = _run(["audit", "--study-uid", uid, "--format", "json"])
    events = json.loads(out)
    assert [(e["user"], e["action"], e["client"]) for e in events] == [
        ("radiologist-user", "read-study", "10.1.2.3")
    ]
    code, out = _run(["audit", "--user", "nobody"])
    assert out.strip() == "no audit events"
    code, out = _run(["audit"])
    assert "export-feedback" in out and "cli:" in out  # the export itself was audited


def test_api_address(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert staff.api_address(settings, None, None) == ("127.0.0.1", 8000)
    assert staff.api_address(settings, "0.0.0.0", 9000) == ("0.0.0.0", 9000)
