"""The administrators' API token page: every user's tokens, and revoking one. Admin role only (403).

=======  =================================  ======================================================================
GET      /admin/tokens                      all tokens (``user=NAME`` for one user's): owner, name, created,
                                            expires, last used, state; a revoke button on each active one
POST     /admin/tokens/{token_id}/revoke    revoke it (CSRF token as on every form; audited ``token_revoke``),
                                            then back to the list (303)
=======  =================================  ======================================================================

Tokens are created on the server (``vald-md users token NAME``): the page never shows a token, only its id.
Reading the page is audited (``audit_view``, ``what: api_tokens``).
"""

from __future__ import annotations

import uuid
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.exceptions import HTTPException

from app import audit
from app.web.deps import AdminUser, DbDep
from app.web.templating import render

router = APIRouter(prefix="/admin/tokens", tags=["admin"], include_in_schema=False)



@router.get("", response_class=HTMLResponse)
def tokens_page(request: Request, admin: AdminUser, db: DbDep,
                user: Annotated[str | None, Query(max_length=64)] = None) -> HTMLResponse:
    """Every user's API tokens (or ``user``'s), newest first."""
    users = audit.list_users(db)
    names = {u.id: u.username for u in users}
    owner = audit.get_user(db, username=user) if user else None
    if user and owner is None:
        raise HTTPException(404, f"There is no user called {user.strip().lower()!r}.")
    tokens = audit.list_api_tokens(db, owner.id if owner is not None else None)
    audit.append_event(db, audit.AuditAction.AUDIT_VIEW, user=admin.user,
                       detail={"what": "api_tokens", "filters": ["user"] if user else []})
    now = audit.utc_now()
    rows = [{"token": t, "owner": names.get(t.user_id, "?"), "state": audit.api_token_state(t, now)} for t in tokens]
    return render(request, "admin_tokens.html", {"rows": rows, "owner": owner, "users": users})


@router.post("/{token_id}/revoke")
def revoke_token(token_id: str, admin: AdminUser, db: DbDep,
                 user: Annotated[str | None, Query(max_length=64)] = None) -> RedirectResponse:
    """Revoke one token (idempotent), then show the list again."""
    try:
        audit.revoke_api_token(db, uuid.UUID(token_id), actor=admin.user)
    except (ValueError, audit.TokenNotFoundError):
        raise HTTPException(404, "There is no API token with that id.") from None
    back = "/admin/tokens" + (f"?{urlencode({'user': user})}" if user else "")
    return RedirectResponse(back, status_code=303)
