"""Layer 2: the replicated records in SQLite (WAL). Synchronous, no sockets, no event loop,
so both the daemon and the SDK's directory mode use it."""

from meshd.state.store import Store

__all__ = ["Store"]
