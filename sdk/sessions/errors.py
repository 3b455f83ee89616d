"""The SDK's exceptions: the same tree as the daemon's (`meshd.errors`), so an error raised
in the daemon is caught here as the same class. `SessionsError` is the base."""

from meshd.errors import (
    DaemonUnavailable,
    InvalidArgument,
    MeshError,
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
#: Raised when a message names a session the registry does not know.
SessionNotFound = NotFound

__all__ = [
    "SessionsError", "MeshError", "DaemonUnavailable", "InvalidArgument", "NotFound",
    "SessionNotFound", "ProtocolError", "RemoteError", "StoreError", "Timeout", "TooLarge",
    "UnknownCommand", "UnsupportedVersion",
]
