"""The blocking and the asyncio SDK are one API: the same public methods with the same
parameters (names, order, defaults), so code moves between them by adding `await`."""

from __future__ import annotations

import inspect

import pytest

from sessions import CollaborationHub, SessionRegistry, SharedMemory
from sessions.aio import AsyncCollaborationHub, AsyncSessionRegistry, AsyncSharedMemory

PAIRS = [(SessionRegistry, AsyncSessionRegistry), (CollaborationHub, AsyncCollaborationHub),
         (SharedMemory, AsyncSharedMemory)]


def public(cls: type) -> dict[str, object]:
    return {n: getattr(cls, n) for n in dir(cls) if not n.startswith("_")
            and callable(getattr(cls, n))}


@pytest.mark.parametrize("blocking, aio", PAIRS, ids=lambda c: c.__name__)
def test_same_methods_same_parameters(blocking: type, aio: type) -> None:
    b, a = public(blocking), public(aio)
    assert set(b) == set(a), (sorted(set(b) - set(a)), sorted(set(a) - set(b)))
    for name in sorted(b):
        pb = [(p.name, p.kind, p.default) for p in inspect.signature(b[name]).parameters.values()]
        pa = [(p.name, p.kind, p.default) for p in inspect.signature(a[name]).parameters.values()]
        assert pb == pa, f"{blocking.__name__}.{name}: {pb} != {pa}"


@pytest.mark.parametrize("blocking, aio", PAIRS, ids=lambda c: c.__name__)
def test_the_asyncio_methods_are_coroutines_or_return_the_async_twin(blocking, aio) -> None:
    for name, fn in public(aio).items():
        if name == "keepalive":                      # returns an async context manager
            continue
        assert inspect.iscoroutinefunction(fn), f"{aio.__name__}.{name} is not a coroutine"
