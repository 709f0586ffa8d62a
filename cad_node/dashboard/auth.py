"""The dashboard's login: one admin token, given as a bearer token, as the basic-authentication password
(any user name), or once in the login form, which sets a session cookie.

The cookie holds an expiry time and its HMAC under a key derived from the token, never the token itself;
changing the token ends every session.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time

from starlette.requests import Request

SESSION_COOKIE = "cad_node_session"
SESSION_S = 12 * 3600
REALM = "cad-node"


class LoginRequired(Exception):  # noqa: N818 (an outcome, not an error: the handler shows the login page)
    """The request carries no valid token or session."""


class Authenticator:
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the dashboard needs an admin token: set CAD_NODE_ADMIN_TOKEN")
        self._token = token.encode()
        self._session_key = hashlib.sha256(b"cad-node dashboard session\0" + self._token).digest()

    def is_token(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self._token)

    def accepts(self, request: Request) -> bool:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            return self.is_token(credentials.strip())
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return False
            return self.is_token(decoded.partition(":")[2])
        return self.session_valid(request.cookies.get(SESSION_COOKIE, ""))

    def new_session(self, now: float | None = None) -> str:
        expires = str(int((time.time() if now is None else now) + SESSION_S))
        return f"{expires}.{self._sign(expires)}"

    def session_valid(self, cookie: str, now: float | None = None) -> bool:
        expires, _, signature = cookie.partition(".")
        if not expires.isdigit() or not hmac.compare_digest(signature, self._sign(expires)):
            return False
        return int(expires) > (time.time() if now is None else now)

    def _sign(self, text: str) -> str:
        return hmac.new(self._session_key, text.encode(), hashlib.sha256).hexdigest()


def wants_html(request: Request) -> bool:
    """A browser navigating (it gets the login form), rather than a tool (it gets a basic challenge)."""
    return "text/html" in request.headers.get("accept", "")


def challenge(request: Request) -> str:
    # No basic challenge to browsers: it would open the browser's own password prompt over the form.
    if wants_html(request):
        return f'Bearer realm="{REALM}"'
    return f'Basic realm="{REALM}", charset="UTF-8", Bearer realm="{REALM}"'


def safe_next(path: str) -> str:
    """Where to go after login: a path on this site only (no open redirect)."""
    if path.startswith("/") and not path.startswith(("//", "/\\")):
        return path
    return "/"
