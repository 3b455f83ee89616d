"""Virtual time for the mesh's protocols: an asyncio loop on which sleeping costs nothing.

SWIM is all timers (a probe every `probe_interval`, a suspicion that dies after
`suspicion_timeout`), so tests that wait on a real clock take seconds per scenario and
still race the machine's load. On a `VirtualTimeLoop` the clock stands still while
callbacks run and, when only timers are left, jumps straight to the next one: a test of
30 s of LAN timings runs in the time its callbacks take, and always in the same order for
the same seeds. (memberlist's tests get the same from a mock transport and short timers;
asyncio lets us go further and keep the real timers.)

The loop does no I/O: its selector never reports a ready file, so it is only for code
whose inputs are callbacks and timers, such as `meshd.mesh.fakenet`. Give the code under
test `clock=loop.time`, so what it reads and what asyncio sleeps on are one clock.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from typing import Any, Awaitable, Callable, Mapping, TypeVar

T = TypeVar("T")

#: Where virtual time starts: not 0, which some code reads as "never" (last_contact).
EPOCH = 1000.0


class _NoIOSelector(selectors.BaseSelector):
    """Keeps the registrations asyncio makes (its self-pipe) and never reports one ready;
    `select(timeout)` is where the loop would block, so that is where time jumps."""

    def __init__(self, advance: Callable[[float], None]) -> None:
        self._advance = advance
        self._keys: dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd in self._keys:
            raise KeyError(f"{fileobj!r} is already registered")
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._keys.pop(fd)

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            # No timer and nothing ready: a real loop would wait for I/O, which never
            # comes here. Fail rather than hang.
            raise RuntimeError("virtual-time loop is idle with nothing scheduled")
        if timeout > 0:
            self._advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return dict(self._keys)

    def close(self) -> None:
        self._keys.clear()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose `time()` is a virtual clock that advances only when
    the loop would otherwise wait. `real_budget` (s of real time, None = unbounded) stops
    a run that never lets time pass (a callback that reschedules itself at once)."""

    def __init__(self, real_budget: float | None = None) -> None:
        self._now = EPOCH
        self._started = time.perf_counter()
        self._budget = real_budget
        super().__init__(_NoIOSelector(self._advance))

    def time(self) -> float:
        return self._now

    def _advance(self, dt: float) -> None:
        self._now += dt
        if self._budget is not None and time.perf_counter() - self._started > self._budget:
            raise TimeoutError(f"virtual-time run took more than {self._budget} s of real "
                               f"time (virtual {self._now - EPOCH:.1f} s)")

    def elapsed(self) -> float:
        """Virtual seconds since the loop was made."""
        return self._now - EPOCH


def run(main: Callable[[], Awaitable[T]], real_budget: float | None = 30.0) -> T:
    """Run `main()` to completion on a fresh `VirtualTimeLoop` (the virtual-time
    `asyncio.run`), closing the loop and whatever tasks it left."""
    with asyncio.Runner(loop_factory=lambda: VirtualTimeLoop(real_budget)) as runner:
        return runner.run(main())  # type: ignore[arg-type]
