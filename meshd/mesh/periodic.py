"""One periodic task: run a callable every interval on the daemon's loop, for as long as
the daemon runs, and stop it in one shape.

Every timer of the mesh (the probe round, anti-entropy, tombstone collection, the join
round, the router's rounds, the daemon's housekeeping) is the same loop: wait, run,
survive whatever the round raised, wait again. Written out by hand each time, they
drifted apart: one measured its period from the start of a round, one from its end, one
died on the first exception, each had its own stop() that cancelled and awaited. Here
that loop is written once; what differs between them is a parameter:

- `first`: the wait before the first round (None: one interval, as a loop that sleeps
  first; 0: at once, as the probe round and the join round);
- `fixed_rate`: the next round is due `interval` after the *start* of this one (the
  probe round: a probe that waited for its ACK does not stretch the protocol period),
  else `interval` after its end;
- `jitter`: each wait is multiplied by uniform(1 - jitter, 1 + jitter), drawn from `rng`
  (anti-entropy rounds at ±25 %, so nodes started together do not sync in step);
- `adaptive`: the callable's return value, when a number, is the wait before the next
  round instead of the interval (a round that adapts its period); None keeps the
  schedule. (Off by default, so a round that returns a count is not read as a wait.)

The callable may be a plain function or a coroutine function. An exception from it is
logged (`log.exception("<what> failed")`, the message each loop logged before) and
counted in `failures`; the next round runs as scheduled. Errors a round expects (a full
disk) are the round's own to catch and word.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from typing import Awaitable, Callable, Protocol, Union

#: What a periodic task runs: returns nothing, or the wait before the next round.
Round = Callable[[], Union[float, None, Awaitable[Union[float, None]]]]

_log = logging.getLogger("meshd.mesh")


class _Uniform(Protocol):
    def uniform(self, a: float, b: float) -> float: ...


class Periodic:
    """Runs `fn` every `interval` seconds on the running loop (see the module docstring);
    `start()` once the loop runs, `await stop()` to cancel it and wait until it is gone."""

    def __init__(self, fn: Round, interval: float, *, what: str, first: float | None = None,
                 fixed_rate: bool = False, jitter: float = 0.0, rng: _Uniform = random,
                 adaptive: bool = False, logger: logging.Logger = _log) -> None:
        self.fn = fn
        self.interval = interval
        self.what = what                  # "probe round": logged as "probe round failed"
        self.first = first
        self.fixed_rate = fixed_rate
        self.jitter = jitter
        self.rng = rng
        self.adaptive = adaptive
        self.log = logger
        self.rounds = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Schedule the rounds on the running loop (a second start is a no-op)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.what)

    async def stop(self) -> None:
        """Cancel the task and wait for it to end (whatever it raised is swallowed: a
        stop must not fail because a round did)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass

    def _wait(self, base: float) -> float:
        if self.jitter:
            base *= self.rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return base

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self._wait(self.interval) if self.first is None else self.first
        while True:
            if delay > 0 or self.first is None or self.rounds:
                await asyncio.sleep(max(0.0, delay))
            started = loop.time()
            nxt: float | None = None
            try:
                result = self.fn()
                if inspect.isawaitable(result):
                    result = await result
                if self.adaptive and result is not None:
                    nxt = float(result)  # type: ignore[arg-type]
            except asyncio.CancelledError:
                raise
            except Exception:
                self.failures += 1
                self.log.exception("%s failed", self.what)
            self.rounds += 1
            if nxt is not None:
                delay = nxt
            else:
                delay = self._wait(self.interval)
                if self.fixed_rate:
                    delay -= loop.time() - started


async def stop_all(*tasks: Periodic | None) -> None:
    """Stop several periodic tasks together (the one stop() shape of their owners)."""
    await asyncio.gather(*(t.stop() for t in tasks if t is not None))
