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
of records of one append, i.e. of one batch of requests; a record is `[command, args,
version, hlc, routes]`, see `meshd.state.pipeline`; earlier versions wrote it without
`routes`, and such records are read too). A frame that does not check out (a flipped byte, a length gone wrong, a
write cut short by a crash or a truncated file) costs only itself: the reader looks for
the next frame that does check out and goes on from there, and reports what it skipped
(`Damage`), so a damaged spot loses the writes of one batch, not the rest of the segment.
"""

from __future__ import annotations

import heapq
import logging
import os
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgpack

log = logging.getLogger("meshd.journal")

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
        self.sizes = [os.fstat(fd).st_size for fd in self.fds]
        self.active = 0
        self.appended = 0
        self.damage: list[Damage] = []     # what the last read_all() had to skip

    @staticmethod
    def frame(records: list[Any]) -> bytes:
        payload = msgpack.packb(records, use_bin_type=True)
        return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload

    def append(self, records: list[Any]) -> None:
        """Write records to the active segment (one frame), durably enough to acknowledge
        them. When that fails (a full disk writes part of it), the part is cut off again:
        the caller refuses those writes, and later frames must not follow a torn one."""
        if not records:
            return
        data = self.frame(records)
        fd = self.fds[self.active]
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if self.fsync:
                os.fdatasync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, self.sizes[self.active])
            except OSError:
                pass                    # the reader skips the torn frame then
            raise
        self.sizes[self.active] += len(data)
        self.appended += len(records)

    def rotate(self) -> int:
        """Make the other segment active; returns the one that was active. The caller must
        have emptied the other segment first (everything in it is committed)."""
        old = self.active
        self.active = (old + 1) % SEGMENTS
        return old

    def read_all(self) -> list[Any]:
        """Every whole, intact record of both segments, in stamp order (a record's
        fourth item is its hlc stamp, and those only grow)."""
        out: list[Any] = []
        self.damage = []
        for path in self.paths:
            records, damage = read_segment(path.read_bytes())
            out.extend(records)
            self.damage.extend(replace(d, segment=path.name) for d in damage)
        for d in self.damage:           # an acknowledged write never vanishes without a word
            log.error("%s: %d unreadable byte(s) at offset %d%s: about %d journaled write(s) "
                      "lost (acknowledged ones, unless a crash cut the write short)",
                      self.paths[0].parent / d.segment, d.size, d.offset,
                      ", to the end" if d.tail else ", read on past them", d.lost)
        out.sort(key=lambda r: r[3] if isinstance(r, list) and len(r) in _RECORD_SIZES else 0)
        return out

    def damage_counters(self) -> dict[str, int]:
        """The last read_all()'s damage, as counters for `sessions info`."""
        if not self.damage:
            return {}
        return {"journal.damaged": len(self.damage),
                "journal.lost_writes": sum(d.lost for d in self.damage),
                "journal.skipped_bytes": sum(d.size for d in self.damage)}

    def clear(self, segment: int | None = None) -> None:
        """Empty one segment (None: both)."""
        for i in range(SEGMENTS) if segment is None else (segment,):
            os.ftruncate(self.fds[i], 0)
            self.sizes[i] = 0
            if self.fsync:
                os.fdatasync(self.fds[i])

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


@dataclass(frozen=True)
class Damage:
    """A stretch of a segment that held no readable frame: `lost` is how many records it
    held as far as can be told (from the frame's own count when that survived, else from
    the records whose start can still be seen); `tail` says it ran to the end of the
    segment (a write cut short by a crash is never acknowledged, a truncated file is)."""

    segment: str
    offset: int
    size: int
    lost: int
    tail: bool


#: Records have 5 items (4 in journals of earlier versions).
_RECORD_SIZES = (4, 5)
#: Where a record can begin: a fixarray of 4 or 5 items whose first item is a short
#: string (the command). Every frame's payload starts with its record list's header, then one.
_RECORD_STARTS = (b"\x94", b"\x95")
_FIXSTR = range(0xA0, 0xC0)
#: Sizes of a msgpack array header (fixarray, array 16, array 32) before the first record.
_LIST_HEADERS = (1, 3, 5)


def read_segment(data: bytes) -> tuple[list[Any], list[Damage]]:
    """The records of every frame that checks out, and the stretches that did not."""
    out: list[Any] = []
    damage: list[Damage] = []
    pos, end = 0, len(data)
    while pos < end:
        records = _frame_at(data, pos)
        if records is not None:
            out.extend(records)
            pos += _HEADER.size + _HEADER.unpack_from(data, pos)[0]
            continue
        nxt = _resync(data, pos)
        damage.append(Damage("", pos, nxt - pos, _lost_in(data, pos, nxt), nxt == end))
        pos = nxt
    return out, damage


def _frame_at(data: bytes, pos: int) -> list[Any] | None:
    """The records of the frame starting at `pos`, or None unless it is whole, matches its
    CRC and holds a list of records."""
    if pos + _HEADER.size > len(data):
        return None
    size, crc = _HEADER.unpack_from(data, pos)
    start = pos + _HEADER.size
    if size == 0 or start + size > len(data):
        return None
    payload = data[start:start + size]
    if zlib.crc32(payload) != crc:
        return None
    try:
        records = msgpack.unpackb(payload, raw=False)
    except Exception:
        return None
    if not isinstance(records, list) or not records or not all(
            isinstance(r, list) and len(r) in _RECORD_SIZES and isinstance(r[0], str)
            for r in records):
        return None
    return records


def _resync(data: bytes, pos: int) -> int:
    """Where the next frame that checks out begins after a bad one at `pos` (the end of the
    data when none does). Most damage leaves the length intact, so the frame it gives is
    tried first; else every place where a frame could begin, i.e. just before the start
    of a record (found with a C-speed search, not byte by byte)."""
    end = len(data)
    if pos + _HEADER.size <= end:
        nxt = pos + _HEADER.size + _HEADER.unpack_from(data, pos)[0]
        if nxt == end or (nxt < end and _frame_at(data, nxt) is not None):
            return nxt
    for hit in heapq.merge(*(_find_all(data, marker, pos + _HEADER.size + 1, end)
                             for marker in _RECORD_STARTS)):
        if hit + 1 < end and data[hit + 1] in _FIXSTR:
            for header in _LIST_HEADERS:
                start = hit - header - _HEADER.size
                if start > pos and _frame_at(data, start) is not None:
                    return start
    return end


def _lost_in(data: bytes, pos: int, nxt: int) -> int:
    """How many records the bad stretch [pos, nxt) held, as far as can be told: the
    frame's own count when its length is believable (it spans the stretch, or runs past
    the end of a cut segment), else the record starts still visible in it."""
    if nxt - pos > _HEADER.size:
        size = _HEADER.unpack_from(data, pos)[0]
        frame_end = pos + _HEADER.size + size
        if frame_end == nxt or (nxt == len(data) and frame_end > nxt):
            unpacker = msgpack.Unpacker()
            unpacker.feed(data[pos + _HEADER.size: pos + _HEADER.size + 5])
            try:
                count = int(unpacker.read_array_header())
            except Exception:
                count = 0
            if 1 <= count <= size // 16:        # (a record takes far more than 16 bytes)
                return count
    seen = sum(1 for marker in _RECORD_STARTS for i in _find_all(data, marker, pos, nxt)
               if i + 1 < nxt and data[i + 1] in _FIXSTR)
    return max(1, seen)


def _find_all(data: bytes, needle: bytes, start: int, stop: int):  # type: ignore[no-untyped-def]
    i = data.find(needle, start, stop)
    while i != -1:
        yield i
        i = data.find(needle, i + 1, stop)
