"""msgpack encoding with hard limits, so a hostile frame costs at most its size to reject."""

from __future__ import annotations

from typing import Any

import msgpack

from meshd.errors import InvalidArgument, ProtocolError, TooLarge

#: Nesting depth a value may have. Deeper structures are almost always an attack or a bug,
#: and bounding it keeps validation iterative-cheap and recursion-safe.
MAX_DEPTH = 32

_SCALARS = (str, bytes, bool, int, float, type(None))
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


def check_value(value: Any, field: str = "value") -> Any:
    """Check that a user value is made only of what msgpack (and JSON users) can carry:
    None, bool, int (64-bit), float, str, bytes, lists and str-keyed maps; tuples become
    lists. Returns the normalised value. Raises InvalidArgument before anything is sent."""
    kind = type(value)
    if kind is str or kind is bytes or kind is float or kind is bool or value is None:
        return value                                   # the common case, checked fast
    if kind is dict and not value:
        return value
    stack: list[tuple[Any, int]] = [(value, 0)]
    needs_copy = False
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidArgument(f"{field} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(v, bool) or v is None or isinstance(v, (str, bytes, float)):
            continue
        if isinstance(v, int):
            if not _INT_MIN <= v <= _INT_MAX:
                raise InvalidArgument(f"{field} holds an integer out of the 64-bit range: {v}")
            continue
        if isinstance(v, (list, tuple)):
            needs_copy = needs_copy or isinstance(v, tuple)
            stack.extend((x, depth + 1) for x in v)
            continue
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise InvalidArgument(f"{field} has a non-string map key {k!r}")
                stack.append((x, depth + 1))
            continue
        raise InvalidArgument(f"{field} holds a {type(v).__name__}, which cannot be stored "
                              "(use None, bool, int, float, str, bytes, list or dict)")
    return _detuple(value) if needs_copy else value


def _detuple(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_detuple(x) for x in v]
    if isinstance(v, dict):
        return {k: _detuple(x) for k, x in v.items()}
    return v
