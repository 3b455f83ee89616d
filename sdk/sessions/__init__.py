"""sessions: the Python SDK of meshd.

    from sessions import SessionRegistry, CollaborationHub, SharedMemory

With no argument each class talks to this host's meshd; with a directory it works in that
directory with no daemon. `sessions.aio` has the same calls for asyncio.
"""

from sessions.claims import Claims, Lease
from sessions.collaboration import CollaborationHub
from sessions.errors import (
    ClaimBusy,
    DaemonUnavailable,
    InvalidArgument,
    LeaseLost,
    MeshError,
    NoQuorum,
    NotFound,
    ProtocolError,
    RemoteError,
    SessionNotFound,
    SessionsError,
    StoreError,
    Timeout,
    TooLarge,
    UnknownCommand,
    UnsupportedVersion,
)
from sessions.keepalive import KeepAlive
from sessions.memory import SharedMemory
from sessions.models import MemoryEntry, MemoryType, Message, MessageType, Session, SessionStatus
from sessions.models import MemoryEvent, MemoryVersion
from sessions.registry import SessionRegistry

__version__ = "0.1.0"

__all__ = [
    "SessionRegistry", "SessionStatus", "Session", "CollaborationHub", "MessageType", "Message",
    "SharedMemory", "MemoryType", "MemoryEntry", "SessionsError", "DaemonUnavailable",
    "InvalidArgument", "NotFound", "SessionNotFound", "Timeout", "TooLarge", "MeshError",
    "ProtocolError", "RemoteError", "StoreError", "UnknownCommand", "UnsupportedVersion",
    "KeepAlive", "MemoryEvent", "MemoryVersion", "Claims", "Lease", "ClaimBusy", "NoQuorum", "LeaseLost",
]
