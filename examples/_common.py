"""Shared by the examples: build the SDK objects for a daemon (no argument) or a directory."""

from __future__ import annotations

import sys

from sessions import CollaborationHub, SessionRegistry, SharedMemory


def objects() -> tuple[SessionRegistry, CollaborationHub, SharedMemory]:
    """`python examples/X.py` talks to this host's meshd (MESHD_SOCKET picks another one);
    `python examples/X.py DIR` keeps everything in DIR with no daemon."""
    if len(sys.argv) > 1:
        registry = SessionRegistry(sys.argv[1])
        return registry, CollaborationHub(registry=registry), SharedMemory(sys.argv[1])
    return SessionRegistry(), CollaborationHub(), SharedMemory()
