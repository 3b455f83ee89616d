"""The dashboard (`meshd --http`, docs/dashboard.md): an aiohttp server on the daemon's
loop with a page, a JSON API, live updates and /metrics. aiohttp is an optional
dependency (`pip install 'meshd[http]'`): import `meshd.ipc.web.server` only when --http
is given."""

from __future__ import annotations

from typing import Any, Callable


def server_class() -> Any:
    """`meshd.ipc.web.server.WebServer`, or a clear error when aiohttp is not installed."""
    try:
        from meshd.ipc.web.server import WebServer
    except ImportError as exc:
        from meshd.errors import MeshError
        raise MeshError(f"--http needs aiohttp ({exc.name or exc} is not installed): "
                        "pip install 'meshd[http]'") from None
    return WebServer


def load_metrics(info: Callable[[], dict[str, Any]],
                 peers: Callable[[], list[dict[str, Any]]] | None = None) -> Any | None:
    """The Prometheus metrics of `meshd.ipc.web.metrics`, when prometheus-client is
    installed; else None (no /metrics)."""
    try:
        from meshd.ipc.web.metrics import Metrics
    except ImportError:
        return None
    return Metrics(info, peers)


def http_problem(address: str, token_file: str | None) -> str | None:
    """Why `--http ADDRESS` cannot be served (before the daemon starts), else None: a
    malformed address, or a non-loopback one without --http-token-file."""
    import ipaddress
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        return f"--http wants HOST:PORT, e.g. 127.0.0.1:8947; got {address!r}"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not token_file:
        return (f"{address} is not a loopback address: anyone who can reach it could read "
                "the mesh's sessions, messages and memory, so serving it needs "
                "--http-token-file FILE (a secret of at least 16 characters, mode 0600). "
                "Or use a loopback address, e.g. --http 127.0.0.1:8947")
    return None
