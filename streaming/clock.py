"""Clocks for pacing. Every deadline is computed from an integer frame index, never by accumulating sleeps, so the
output cannot drift. `FakeClock` is a virtual clock for tests: time only moves when every task is waiting on it.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep_until(self, deadline: float) -> None: ...


class MonotonicClock:
    """The wall clock (time.monotonic)."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0)


class FakeClock:
    """Virtual time. `run(main)` drives a coroutine: whenever the event loop has nothing left to do, the clock
    jumps to the earliest pending deadline. `advance(seconds)` simulates work that takes time (a slow model)."""

    def __init__(self, start: float = 1000.0):
        self._now = start
        self._timers: list[tuple[float, int, asyncio.Future]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    async def sleep_until(self, deadline: float) -> None:
        # A deadline already passed still queues, behind earlier deadlines: a busy task yields in time order.
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (max(deadline, self._now), next(self._seq), future))
        await future

    def _fire_due(self) -> bool:
        fired = False
        while self._timers and self._timers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._timers)
            if not future.done():
                future.set_result(None)
                fired = True
        return fired

    async def run(self, main, limit: float = 1e7):
        """Run coroutine `main` under virtual time; returns its result."""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(main)
        while not task.done():
            for _ in range(1000):  # let everything runnable run (the loop's ready queue drains)
                await asyncio.sleep(0)
                if not getattr(loop, "_ready", None) or task.done():
                    break
            if task.done():
                break
            if self._fire_due():
                continue
            pending = [t for t in self._timers if not t[2].done()]
            if not pending:
                await asyncio.sleep(0.001)  # nothing scheduled on the clock: something else (a thread) is working
                continue
            self._now = max(self._now, min(t[0] for t in pending))
            if self._now > limit:
                raise TimeoutError("FakeClock limit reached")
            self._fire_due()
        return task.result()
