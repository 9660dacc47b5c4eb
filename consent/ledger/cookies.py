"""Setting cookies the safe way, in one place: HttpOnly always, Secure whenever the request
came over https (directly or as reported by a trusted proxy), SameSite always (Lax default).
Any route that sets a cookie must use ``set_cookie`` (tests check every Set-Cookie header)."""

from __future__ import annotations

from typing import Literal

from starlette.requests import Request
from starlette.responses import Response


def is_https(request: Request) -> bool:
    """True when the client's connection is https (uvicorn's proxy_headers rewrite the scheme)."""
    return request.url.scheme == "https"


def set_cookie(response: Response, request: Request, name: str, value: str, *, max_age: int | None = None,
               path: str = "/", same_site: Literal["lax", "strict", "none"] = "lax") -> None:
    """Set a cookie with HttpOnly, SameSite and (on https) Secure. SameSite=None needs https."""
    secure = is_https(request)
    if same_site == "none" and not secure:
        same_site = "lax"  # browsers reject SameSite=None without Secure
    response.set_cookie(name, value, max_age=max_age, path=path, httponly=True, secure=secure,
                        samesite=same_site)


def delete_cookie(response: Response, request: Request, name: str, *, path: str = "/") -> None:
    """Expire a cookie set by ``set_cookie`` (same flags, so browsers match it)."""
    response.delete_cookie(name, path=path, httponly=True, secure=is_https(request), samesite="lax")
