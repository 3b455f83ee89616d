"""A small append-only log in front of SQLite for blind writes (memory sets).

A set is acknowledged once its record is in this file (one write() for a whole batch;
with fsync durability, one fdatasync too): that survives kill -9 of the daemon. Batches
of records are then folded into SQLite in one transaction, after which the file is
emptied; on start, whatever is still in it is folded in first. Records carry the
version and clock stamp they were given when logged, and applying them is idempotent, so
folding twice (a crash between the commit and the truncation) changes nothing.

Frame: 4-byte big-endian length, 4-byte CRC32 of the payload, payload (msgpack). A torn
or corrupt tail (a crash in the middle of a write that was never acknowledged) ends the
replay.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any

import msgpack

_HEADER = struct.Struct(">II")
JOURNAL_NAME = "journal"


class Journal:
    def __init__(self, data_dir: str | Path, fsync: bool = False) -> None:
        self.path = Path(data_dir) / JOURNAL_NAME
        self.fsync = fsync
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self.appended = 0

    @staticmethod
    def frame(record: Any) -> bytes:
        payload = msgpack.packb(record, use_bin_type=True)
        return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload

    def append(self, frames: list[bytes]) -> None:
        """Write frames durably enough to acknowledge them (see the module docstring)."""
        data = b"".join(frames)
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        if self.fsync:
            os.fdatasync(self.fd)
        self.appended += len(frames)

    def read_all(self) -> list[Any]:
        """Every whole, intact record, in order; stops at a torn or corrupt tail."""
        data = self.path.read_bytes()
        out, pos = [], 0
        while pos + _HEADER.size <= len(data):
            size, crc = _HEADER.unpack_from(data, pos)
            payload = data[pos + _HEADER.size: pos + _HEADER.size + size]
            if len(payload) < size or zlib.crc32(payload) != crc:
                break
            try:
                out.append(msgpack.unpackb(payload, raw=False))
            except Exception:
                break
            pos += _HEADER.size + size
        return out

    def clear(self) -> None:
        os.ftruncate(self.fd, 0)
        if self.fsync:
            os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
