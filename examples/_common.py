"""Shared by the examples: where their SDK objects keep the state.

    python examples/X.py          this host's meshd (MESHD_SOCKET=PATH picks another socket)
    python examples/X.py DIR      no daemon: everything lives in the directory DIR
                                  (DIR comes first, before any option of the script)

With no argument, `SessionRegistry`, `CollaborationHub` and `SharedMemory` below are the
`sessions` SDK's own classes, so the seed code in the examples runs exactly as written.
With a directory they are stand-ins that build the SDK objects on that directory:
`SessionRegistry(DIR)`, `CollaborationHub(registry=SessionRegistry(DIR), messages_path=DIR)`
and `SharedMemory(DIR)`. Every object (and every process) using the same directory shares
the same state.

Errors from the SDK (no daemon running, no permission on its socket, an unknown session)
are printed as one line instead of a traceback.
"""

from __future__ import annotations

import sys

import sessions
from sessions import SessionsError

__all__ = ["DIRECTORY", "SessionRegistry", "CollaborationHub", "SharedMemory", "where"]

DIRECTORY: str | None = sys.argv[1] if len(sys.argv) > 1 else None
if DIRECTORY is not None and DIRECTORY.startswith("-"):   # an option (`keepalive.py --seconds 2`)
    DIRECTORY = None

if DIRECTORY is None:
    from sessions import CollaborationHub, SessionRegistry, SharedMemory
else:
    def SessionRegistry() -> sessions.SessionRegistry:  # noqa: N802 - stands in for the class
        return sessions.SessionRegistry(DIRECTORY)

    def CollaborationHub() -> sessions.CollaborationHub:  # noqa: N802
        registry = sessions.SessionRegistry(DIRECTORY)
        return sessions.CollaborationHub(registry=registry, messages_path=DIRECTORY)

    def SharedMemory() -> sessions.SharedMemory:  # noqa: N802
        return sessions.SharedMemory(DIRECTORY)


def where() -> str:
    """One line saying where the state lives (asks the daemon, so it fails early if none)."""
    if DIRECTORY is not None:
        return f"directory {DIRECTORY} (no daemon)"
    info = sessions.SessionRegistry().node_info()
    return f"meshd node {info['node_id'][:12]} at {info['socket']}"


def _excepthook(exc_type, exc, tb):  # type: ignore[no-untyped-def]
    if issubclass(exc_type, SessionsError):
        print(f"❌ {exc}", file=sys.stderr)     # the interpreter still exits with status 1
    else:
        sys.__excepthook__(exc_type, exc, tb)


sys.excepthook = _excepthook
