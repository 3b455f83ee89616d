"""What the dashboard's modules share: bounds, the token and address checks, paging and
errors as JSON (docs/dashboard.md, "Security")."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import stat
from typing import TYPE_CHECKING, Any, Callable

from aiohttp import web

from meshd.errors import MeshError

if TYPE_CHECKING:
    import zmq.asyncio

log = logging.getLogger("meshd.http")

MAX_BODY_BYTES = 64 * 1024          # request bodies (aiohttp answers 413 beyond)
MAX_SSE = 16                        # event-stream connections at once (503 beyond)
DEFAULT_LIMIT, MAX_LIMIT = 50, 200  # list pages
MAX_TEXT = 4000                     # characters of a body or value in a list (then cut)
OVERVIEW_TEXT = 600                 # ... in the live overview
TICK = 0.5                          # s between looks for changes (only while someone watches)
KEEPALIVE = 15.0                    # s between SSE comments on a quiet stream
MIN_TOKEN = 16
COOKIE = "meshd_token"
TOKEN_CHARS = re.compile(r"^[A-Za-z0-9._~+/=-]+$")
HUMAN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$")
STATIC = ("index.html", "app.js", "app.css")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_TYPES = {"html": "text/html", "js": "text/javascript", "css": "text/css"}

NodeInfo = Callable[[], dict[str, Any]]
Peers = Callable[[], list[dict[str, Any]]]


class HttpConfigError(MeshError):
    code = "invalid_argument"


def parse_http(address: str) -> tuple[str, int]:
    """HOST:PORT ([v6]:PORT) of --http."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise HttpConfigError(f"--http wants HOST:PORT, e.g. 127.0.0.1:8947; got {address!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_token(path: str) -> str:
    """The token of --http-token-file: owner-only, at least MIN_TOKEN characters."""
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise HttpConfigError(f"cannot read the --http-token-file {path}: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise HttpConfigError(f"the --http-token-file {path} is readable by others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    if len(token) < MIN_TOKEN or not TOKEN_CHARS.match(token):
        raise HttpConfigError(f"the --http-token-file {path} must hold one token of at least "
                              f"{MIN_TOKEN} characters of A-Z a-z 0-9 . _ ~ + / = - (e.g. from "
                              "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token


def _cut(text: Any, n: int) -> tuple[Any, bool]:
    if isinstance(text, str) and len(text) > n:
        return text[:n], True
    return text, False


def _page(request: web.Request) -> tuple[int, int]:
    try:
        limit = int(request.query.get("limit", DEFAULT_LIMIT))
        offset = int(request.query.get("offset", 0))
    except ValueError:
        raise _error(400, "bad_request", "limit and offset must be integers") from None
    if not 1 <= limit <= MAX_LIMIT or offset < 0:
        raise _error(400, "bad_request", f"limit must be 1..{MAX_LIMIT}, offset >= 0")
    return limit, offset


def _error(status: int, code: str, message: str) -> web.HTTPException:
    cls = {400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 403: web.HTTPForbidden,
           404: web.HTTPNotFound, 415: web.HTTPUnsupportedMediaType,
           421: web.HTTPMisdirectedRequest, 502: web.HTTPBadGateway,
           503: web.HTTPServiceUnavailable}[status]
    return cls(text=json.dumps({"error": code, "message": message}),
               content_type="application/json")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=repr, ensure_ascii=False)
