"""The one exception tree of meshd and of its SDK.

    MeshError                      base; every error carries a stable string `code`
    ├── InvalidArgument (ValueError)    a request or record failed validation
    │   └── TooLarge                    over a configured size limit
    ├── NotFound (LookupError)          a session, key or message that does not exist
    ├── ProtocolError                   a frame that is not a valid request/reply
    │   ├── UnsupportedVersion          protocol version we do not speak
    │   └── UnknownCommand              command name we do not know
    ├── StoreError                      the local database failed
    ├── DaemonUnavailable (ConnectionError)  no daemon answers on the socket
    ├── Timeout (TimeoutError)          no answer before the call's deadline
    ├── RemoteError                     an error code this side does not know
    ├── ClaimBusy                       a claim is held by another session
    ├── NoQuorum                        no majority of the voters answered in time
    └── LeaseLost                       a lease to renew is gone (lapsed or taken)

The codes travel over IPC, so an error raised in the daemon is re-raised as the same
class in the client. Leaf module: stdlib only.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base of every meshd error."""

    code = "internal"


class InvalidArgument(MeshError, ValueError):
    """A request or record failed validation; nothing was written."""

    code = "invalid_argument"


class TooLarge(InvalidArgument):
    """A frame or value is over a configured size limit."""

    code = "too_large"


class NotFound(MeshError, LookupError):
    """The session, key or message does not exist."""

    code = "not_found"


class ProtocolError(MeshError):
    """A frame that is not a well-formed request or reply."""

    code = "bad_request"


class UnsupportedVersion(ProtocolError):
    """The peer speaks a protocol version we do not."""

    code = "unsupported_version"


class UnknownCommand(ProtocolError):
    """The command name is not one we serve."""

    code = "unknown_command"


class StoreError(MeshError):
    """The local database failed (disk full, corruption, locked too long)."""

    code = "store_error"


class DaemonUnavailable(MeshError, ConnectionError):
    """No daemon answers on the local socket."""

    code = "unavailable"


class Timeout(MeshError, TimeoutError):
    """The call's deadline passed before an answer came."""

    code = "timeout"


class RemoteError(MeshError):
    """The daemon answered with an error code this client does not know."""

    code = "remote_error"


class ClaimBusy(MeshError):
    """The resource is claimed by another session: names the holder and how long its
    lease may still run at most (it may be released or renewed meanwhile)."""

    code = "claim_busy"

    def __init__(self, message: str = "", holder: str = "", expires_in: float = 0.0) -> None:
        super().__init__(message)
        self.holder = holder
        self.expires_in = expires_in


class NoQuorum(MeshError):
    """No majority of the claim voters answered in time; nothing was granted (a claim
    under a partition is granted only on the majority side)."""

    code = "no_quorum"


class LeaseLost(MeshError):
    """The lease is gone: it lapsed, was released, or another session holds the resource
    now. The holder must stop acting on it."""

    code = "lease_lost"


_BY_CODE: dict[str, type[MeshError]] = {
    cls.code: cls
    for cls in (
        MeshError, InvalidArgument, TooLarge, NotFound, ProtocolError, UnsupportedVersion,
        UnknownCommand, StoreError, DaemonUnavailable, Timeout, RemoteError,
        ClaimBusy, NoQuorum, LeaseLost,
    )
}


def from_code(code: str, message: str) -> MeshError:
    """Rebuild the exception a daemon reported, so callers can catch the same class."""
    cls = _BY_CODE.get(code)
    if cls is None:
        err = RemoteError(f"{code}: {message}")
        err.code = code
        return err
    return cls(message)
