"""Where an API object's calls go: this host's daemon (no path given) or a directory of
its own (a path given), which works with no daemon at all and is shared by every process
and object that uses the same directory."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from meshd.errors import InvalidArgument
from meshd.state.commands import Commands
from meshd.state.store import Store
from meshd.wire.ipc import validate_args
from sessions._client import Client, shared_client
from sessions._core import collect_pages
from sessions._ops import Op

_stores: dict[str, Store] = {}
_commands: dict[str, Commands] = {}
_stores_lock = threading.Lock()


def directory_store(directory: str | os.PathLike[str]) -> Store:
    """One Store per directory per process; SQLite's locking shares it across processes."""
    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise InvalidArgument(f"{path} is a file; the sessions API wants a directory")
    key = str(path.resolve())
    with _stores_lock:
        store = _stores.get(key)
        if store is None or store.pid != os.getpid():
            store = _stores[key] = Store(key, shared=True)
            _commands.pop(key, None)
        return store


def directory_commands(store: Store) -> Commands:
    """The command table bound to a directory's store (one per store, as the daemon has
    one for its own), so directory mode answers exactly as the daemon would."""
    key = str(store.data_dir)
    with _stores_lock:
        commands = _commands.get(key)
        if commands is None or commands.store is not store:
            commands = _commands[key] = Commands(store)
        return commands


class DaemonBackend:
    """Calls go to the daemon over its local socket."""

    def __init__(self, socket: str | None = None, timeout: float | None = None) -> None:
        self.client: Client = shared_client(socket, timeout)
        self.directory: str | None = None

    def run(self, op: Op) -> Any:
        args = validate_args(op.command, op.args)        # bad input fails before sending
        if op.paged:
            return op.convert(collect_pages(lambda at: self.client.call(
                op.command, validate_args(op.command, op.page(at["offset"])))))
        return op.result(args, self.client.call(op.command, args))


class DirectoryBackend:
    """Calls run against a database in a directory, in this process."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.store = directory_store(directory)
        self.commands = directory_commands(self.store)
        self.directory = str(self.store.data_dir)

    def run(self, op: Op) -> Any:
        args = validate_args(op.command, op.args)
        if op.command == "node.info":
            return op.convert({"node_id": self.store.node_id, "data_dir": self.directory,
                               "mode": "directory"})
        if op.command == "mesh.peers":
            return op.convert([])                 # a directory has no peers
        if op.command.startswith("mesh."):
            raise InvalidArgument(f"{op.command} needs a daemon: a sessions directory is "
                                  f"not part of a mesh")
        if op.paged:
            return op.convert(collect_pages(lambda at: self.commands.execute(
                op.command, validate_args(op.command, op.page(at["offset"])))))
        return op.result(args, self.commands.execute(op.command, args))


Backend = DaemonBackend | DirectoryBackend


def backend_for(path: str | os.PathLike[str] | None, socket: str | None = None,
                timeout: float | None = None) -> Backend:
    if path is not None:
        return DirectoryBackend(path)
    return DaemonBackend(socket, timeout)
