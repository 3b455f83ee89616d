"""A small append-only log in front of SQLite for blind writes (memory sets, sends).

A write is acknowledged once its record is in this log (one write() for a whole batch;
with fsync durability, one fdatasync too): that survives kill -9 of the daemon. Records
are then folded into SQLite in the background, a batch per transaction, and the log is
emptied once everything in it is committed; on start, whatever is still in it is folded
in first. Records carry the version and clock stamp they were given when logged, and
applying them is idempotent, so folding twice (a crash between the commit and the
truncation) changes nothing.

The log has two segment files. New records go to the active one; when a batch is handed
to the background fold, the other (empty) segment becomes active, so the handed-off
segment holds exactly that batch and can be emptied as soon as its transaction commits,
while appends go on. Both files are created once, so emptying one is a truncate, never a
new directory entry (which fsync durability would have to flush too).

Frame: 4-byte big-endian length, 4-byte CRC32 of the payload, payload (msgpack: the list
of records of one append, i.e. of one batch of requests). A torn or corrupt tail (a crash
in the middle of a write that was never acknowledged) ends the replay of that segment.
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
SEGMENTS = 2


class Journal:
    def __init__(self, data_dir: str | Path, fsync: bool = False) -> None:
        base = Path(data_dir) / JOURNAL_NAME
        self.paths = [base.with_name(f"{JOURNAL_NAME}.{i}") for i in range(SEGMENTS)]
        self.fsync = fsync
        self.fds = [os.open(p, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600) for p in self.paths]
        if fsync:                       # the files themselves must survive a power cut
            dfd = os.open(base.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self.active = 0
        self.appended = 0

    @staticmethod
    def frame(records: list[Any]) -> bytes:
        payload = msgpack.packb(records, use_bin_type=True)
        return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload

    def append(self, records: list[Any]) -> None:
        """Write records to the active segment (one frame), durably enough to acknowledge
        them."""
        if not records:
            return
        data = self.frame(records)
        fd = self.fds[self.active]
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if self.fsync:
            os.fdatasync(fd)
        self.appended += len(records)

    def rotate(self) -> int:
        """Make the other segment active; returns the one that was active. The caller must
        have emptied the other segment first (everything in it is committed)."""
        old = self.active
        self.active = (old + 1) % SEGMENTS
        return old

    def read_all(self) -> list[Any]:
        """Every whole, intact record of both segments, in stamp order (records are
        `[command, args, version, hlc]` and hlc stamps only grow)."""
        out: list[Any] = []
        for path in self.paths:
            out.extend(_read(path.read_bytes()))
        out.sort(key=lambda r: r[3] if isinstance(r, list) and len(r) == 4 else 0)
        return out

    def clear(self, segment: int | None = None) -> None:
        """Empty one segment (None: both)."""
        for i in range(SEGMENTS) if segment is None else (segment,):
            os.ftruncate(self.fds[i], 0)
            if self.fsync:
                os.fdatasync(self.fds[i])

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _read(data: bytes) -> list[Any]:
    out, pos = [], 0
    while pos + _HEADER.size <= len(data):
        size, crc = _HEADER.unpack_from(data, pos)
        payload = data[pos + _HEADER.size: pos + _HEADER.size + size]
        if len(payload) < size or zlib.crc32(payload) != crc:
            break
        try:
            records = msgpack.unpackb(payload, raw=False)
        except Exception:
            break
        if not isinstance(records, list):
            break
        out.extend(records)
        pos += _HEADER.size + size
    return out
