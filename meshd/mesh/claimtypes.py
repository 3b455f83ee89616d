"""The claims interface shared by `MeshClaims` (voters, `meshd.mesh.claims`) and
`HostClaims` (this host only, `meshd.mesh.claims_host`): the grant record, the protocol
the daemon serves claims through, and the checks both apply to a request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from meshd.config import Config
from meshd.errors import InvalidArgument
from meshd.wire import schema as s
from meshd.wire.peer import FrameType, address


class Sender(Protocol):
    """What claims need of a transport (the real one and `fakenet`'s both have it)."""

    def send(self, addr: str, ftype: FrameType, body: dict[str, Any]) -> bool: ...


@dataclass(frozen=True)
class Grant:
    """A lease as its holder sees it. `valid_for` is counted from before the request that
    got it, already shortened by gamma; the holder must stop acting when it runs out."""

    resource: str
    holder: str            # session id
    token: int             # fencing token: the ballot that won the acquisition
    valid_for: float       # s the holder may act from now
    ttl: float
    scope: str             # "mesh" (voters) or "host" (no voters configured)
    at_wall: float = field(default_factory=time.time, compare=False, repr=False)  # display

    def view(self) -> dict[str, Any]:
        """For the local API (msgpack-able); `expires_at` is wall time, display only."""
        exp = datetime.fromtimestamp(self.at_wall + self.valid_for, timezone.utc)
        return {"resource": self.resource, "holder": self.holder, "token": self.token,
                "valid_for": round(self.valid_for, 3), "ttl": self.ttl, "scope": self.scope,
                "expires_at": exp.isoformat(timespec="milliseconds").replace("+00:00", "Z")}


class Claims(Protocol):
    """What the daemon serves claims with: `MeshClaims` (voters) or `HostClaims`."""

    scope: str

    async def acquire(self, resource: str, holder: str, ttl: float, wait: float = 0.0
                      ) -> Grant: ...

    async def renew(self, resource: str, holder: str, token: int) -> Grant: ...

    async def release(self, resource: str, holder: str, token: int) -> bool: ...

    async def holder(self, resource: str) -> Grant | None: ...

    async def list(self, prefix: str | None = None) -> list[Grant]: ...

    def session_gone(self, session_id: str) -> None: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...


def check_voters(voters: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """3 or 5 distinct "host:port" addresses (1 is accepted with a warning: no fault
    tolerance at all); anything else is an InvalidArgument naming the problem."""
    out = tuple(address(v, "voter") for v in voters)
    if len(set(out)) != len(out):
        raise InvalidArgument("--voters lists an address twice")
    if len(out) not in (1, 3, 5):
        raise InvalidArgument(f"--voters needs 3 or 5 addresses (a majority must survive a "
                              f"failure), not {len(out)}")
    return out


#: The shortest TTL granted: a lease must outlast a round trip and the renewal that keeps it.
MIN_TTL = 0.1


def check_request(config: Config, resource: str, holder: str, ttl: float) -> float:
    """Checks a claim request; returns the TTL granted: a TTL above `claim_max_ttl` (the
    bound the voters' quarantine covers) is lowered to it, and the grant says so."""
    s.ident(resource, "resource")
    s.ident(holder, "holder")
    if type(ttl) not in (int, float) or not MIN_TTL <= ttl < float("inf"):
        raise InvalidArgument(f"ttl must be a number of seconds, at least {MIN_TTL:g}")
    return float(min(ttl, config.claim_max_ttl))
