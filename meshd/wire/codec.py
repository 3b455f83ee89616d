"""msgpack encoding with hard limits, so a hostile frame costs at most its size to reject."""

from __future__ import annotations

from typing import Any

import msgpack

from meshd.errors import InvalidArgument, ProtocolError, TooLarge

#: Nesting depth a value may have. Deeper structures are almost always an attack or a bug,
#: and bounding it keeps validation iterative-cheap and recursion-safe.
MAX_DEPTH = 32

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not accepted")


def pack(obj: Any) -> bytes:
    """Encode a value; raise InvalidArgument naming the problem when msgpack can't carry it."""
    try:
        return msgpack.packb(obj, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgument(f"value cannot be encoded: {exc}") from exc


def unpack(data: bytes, max_bytes: int) -> Any:
    """Decode one frame after checking its size; any decoding failure is a ProtocolError."""
    if len(data) > max_bytes:
        raise TooLarge(f"frame of {len(data)} bytes is over the {max_bytes}-byte limit")
    try:
        return msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True, ext_hook=_reject_ext)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"frame is not valid msgpack: {type(exc).__name__}") from exc


_PLAIN = frozenset({str, bytes, float, bool, type(None)})


def check_value(value: Any, field: str = "value") -> Any:
    """Check that a user value is made only of what msgpack (and JSON users) can carry:
    None, bool, int (64-bit), float, str, bytes, lists and str-keyed maps; tuples become
    lists. Returns the normalised value. Raises InvalidArgument before anything is sent."""
    if type(value) in _PLAIN:
        return value                                   # the common case, checked fast
    return _detuple(value) if _walk(value, 0, field) else value


def _walk(v: Any, depth: int, field: str) -> bool:
    """Validate recursively (depth is bounded); True when a tuple needs copying to a list."""
    t = type(v)
    if t in _PLAIN:
        return False
    if t is int:
        if not _INT_MIN <= v <= _INT_MAX:
            raise InvalidArgument(f"{field} holds an integer out of the 64-bit range: {v}")
        return False
    if depth >= MAX_DEPTH:
        raise InvalidArgument(f"{field} is nested more than {MAX_DEPTH} levels deep")
    if t is dict:
        copy = False
        for k, x in v.items():
            if type(k) is not str and not isinstance(k, str):
                raise InvalidArgument(f"{field} has a non-string map key {k!r}")
            if type(x) not in _PLAIN:
                copy = _walk(x, depth + 1, field) or copy
        return copy
    if t is list or t is tuple:
        copy = t is tuple
        for x in v:
            if type(x) not in _PLAIN:
                copy = _walk(x, depth + 1, field) or copy
        return copy
    # subclasses (str-valued enums, IntEnum, OrderedDict, ...) take the slow path once
    if isinstance(v, (str, bytes, float)):
        return False
    if isinstance(v, int):
        return _walk(int(v), depth, field)
    if isinstance(v, dict):
        return _walk(dict(v), depth, field) or True
    if isinstance(v, (list, tuple)):
        return _walk(list(v), depth, field) or True
    raise InvalidArgument(f"{field} holds a {type(v).__name__}, which cannot be stored "
                          "(use None, bool, int, float, str, bytes, list or dict)")


def _detuple(v: Any) -> Any:
    """A copy with tuples (and list/dict subclasses) made plain lists and dicts."""
    if isinstance(v, (list, tuple)):
        return [_detuple(x) for x in v]
    if isinstance(v, dict):
        return {k: _detuple(x) for k, x in v.items()}
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int) and type(v) is not int:
        return int(v)
    return v
