"""Who is calling: a Bearer token, or the worklist's session cookie holding one.

Tokens are checked against their SHA-256 (:func:`db.access.identify`). The session
cookie is HttpOnly and SameSite=Strict; a POST authenticated by the cookie must
also carry the CSRF token derived from it (:func:`csrf_token`), so another site
cannot make a signed-in browser post.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from db import access
from db.access import AuditAction, Identity, Permission
from pneumo.api.context import context_of

__all__ = [
    "COOKIE_NAME",
    "CSRF_FIELD",
    "Caller",
    "NotSignedIn",
    "caller_for",
    "client_address",
    "csrf_token",
    "page_caller",
    "require",
]

COOKIE_NAME = "pneumo_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"

_bearer = HTTPBearer(auto_error=False, description="a token from `pneumo tokens create`")


@dataclass(frozen=True)
class Caller:
    """An authenticated request: who, from where, and whether by cookie."""

    identity: Identity
    client: str
    token: str
    by_cookie: bool

    @property
    def csrf(self) -> str:
        return csrf_token(self.token)


class NotSignedIn(Exception):
    """A page was asked for without a valid session (the app redirects to sign-in)."""


def csrf_token(session_token: str) -> str:
    """The CSRF token of a session: an HMAC of a fixed label under the session's token."""
    return hmac.new(session_token.encode(), b"pneumo-csrf", hashlib.sha256).hexdigest()[:32]


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def caller_for(request: Request, token: str | None, *, by_cookie: bool) -> Caller | None:
    """The caller a token identifies; None for an unknown or revoked token.

    A rejected token is audited as a failed sign-in (no user known).
    """
    if not token:
        return None
    ctx = context_of(request)
    with ctx.session() as session:
        identity = access.identify(session, token)
        if identity is None:
            access.record_audit(
                session, user="-", role=None, action=AuditAction.SIGN_IN_FAILED,
                client=client_address(request),
            )  # fmt: skip
    if identity is None:
        return None
    return Caller(identity, client_address(request), token, by_cookie)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


def require(permission: Permission) -> Callable[..., Caller]:
    """A dependency: the caller, who must hold ``permission`` (401 / 403 otherwise)."""

    def dependency(
        request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
    ) -> Caller:
        token: str | None
        if credentials is not None:
            token, by_cookie = credentials.credentials, False
        else:
            token, by_cookie = request.cookies.get(COOKIE_NAME), True
        if not token:
            raise _unauthorized("a Bearer token is required")
        caller = caller_for(request, token, by_cookie=by_cookie)
        if caller is None:
            raise _unauthorized("unknown or revoked token")
        if not caller.identity.allows(permission):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"role {caller.identity.role.value} may not {permission.value}",
            )
        if by_cookie and request.method not in ("GET", "HEAD", "OPTIONS"):
            sent = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent, caller.csrf):
                raise HTTPException(status.HTTP_403_FORBIDDEN, detail="CSRF token missing or wrong")
        return caller

    return dependency


def page_caller(request: Request) -> Caller:
    """A dependency for pages: the signed-in caller (any role may read), else sign-in."""
    caller = caller_for(request, request.cookies.get(COOKIE_NAME), by_cookie=True)
    if caller is None:
        raise NotSignedIn
    if not caller.identity.allows(Permission.READ):  # pragma: no cover - every role reads
        raise HTTPException(status.HTTP_403_FORBIDDEN)
    return caller
