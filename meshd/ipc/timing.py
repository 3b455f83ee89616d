"""Timing served requests for the metrics (`meshd.ipc.web.metrics`, `Metrics.observe`).

The IPC server is told an `Observe` (or None: nothing is timed) and tells it each served
request's command and seconds, measured on the loop with `now()` (`time.perf_counter`) from when
serving it starts until its answer is ready (time spent waiting in the socket's queue, or
as a deferred slice, is not included):

- store commands run in one transaction per batch (group commit) and are answered only
  once it commits, so every request of a batch gets the *whole batch's* duration (not a
  share of it): that is the latency each of them saw. The `_sum` of the histogram is then
  larger than the time the loop was busy (a batch of 100 sets of 1 ms counts 100 ms). A
  big batch served in slices (`meshd.ipc.batches`): each request gets its slice's duration;
- journaled writes (memory sets, sends): the same, for the journal append of their batch;
- local commands (node.info, streams, mesh control): each its own handler and reply;
- claims, answered when the voters have answered: from the request until the answer.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable, Iterable

#: Told (command, seconds) for each served request.
Observe = Callable[[str, float], None]
#: The clock requests are timed with.
now = time.perf_counter


def observe_each(observe: Observe | None, commands: Iterable[str], started: float) -> None:
    """Every one of `commands` took the time since `started` (a `time.perf_counter()`)."""
    if observe is None:
        return
    took = time.perf_counter() - started
    for command in commands:
        observe(command, took)


def timed(observe: Observe | None, command: str, work: Awaitable[Any]) -> Awaitable[Any]:
    """`work`, telling `observe` how long its result took to come (also when it fails);
    `work` itself when nothing is timed."""
    return work if observe is None else _timed(observe, command, work)


async def _timed(observe: Observe, command: str, work: Awaitable[Any]) -> Any:
    started = time.perf_counter()
    try:
        return await work
    finally:
        observe(command, time.perf_counter() - started)
