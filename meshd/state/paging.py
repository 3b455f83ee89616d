"""Pages of list reads: the handlers of paged commands (`meshd.wire.ipc.PAGED`) take
`limit`/`offset` from their arguments, in SQL where they can, so that a read never holds
more rows than a page (see `commands._paged`)."""

from __future__ import annotations

from typing import Any


def page_sql(a: dict[str, Any]) -> str:
    """The LIMIT/OFFSET clause of a paged read (empty for an internal, unpaged call)."""
    limit = a.get("limit")
    return "" if limit is None else f" LIMIT {int(limit)} OFFSET {int(a.get('offset') or 0)}"


def page_slice(rows: list[Any], a: dict[str, Any]) -> list[Any]:
    limit = a.get("limit")
    if limit is None:
        return rows
    offset = int(a.get("offset") or 0)
    return rows[offset:offset + int(limit)]
