"""The SDK's exceptions: the same tree as the daemon's (`meshd.errors`), so an error raised
in the daemon is caught here as the same class. `SessionsError` is the base."""

from meshd.errors import (
    ClaimBusy,
    DaemonUnavailable,
    InvalidArgument,
    LeaseLost,
    MeshError,
    NoQuorum,
    NotFound,
    ProtocolError,
    RemoteError,
    StoreError,
    Timeout,
    TooLarge,
    UnknownCommand,
    UnsupportedVersion,
)

SessionsError = MeshError
#: Raised when a call names a session the registry does not know.
SessionNotFound = NotFound

# These classes are raised to SDK users, who import them from `sessions`; a traceback
# says `sessions.NotFound: ...`, the name to catch, rather than the daemon's module.
for _cls in (DaemonUnavailable, InvalidArgument, MeshError, NotFound, ProtocolError, RemoteError,
             StoreError, Timeout, TooLarge, UnknownCommand, UnsupportedVersion, ClaimBusy,
             NoQuorum, LeaseLost):
    _cls.__module__ = "sessions"
del _cls

__all__ = [
    "SessionsError", "MeshError", "DaemonUnavailable", "InvalidArgument", "NotFound",
    "SessionNotFound", "ProtocolError", "RemoteError", "StoreError", "Timeout", "TooLarge",
    "UnknownCommand", "UnsupportedVersion", "ClaimBusy", "NoQuorum", "LeaseLost",
]
