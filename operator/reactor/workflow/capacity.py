"""At most N cells at once; waiters start in priority order (the operator: creation time),
not in the order they happened to ask."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any


class CapacityGate:
    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.in_use = 0
        self._waiters: list[tuple[Any, int, asyncio.Future]] = []
        self._tie = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for *_, fut in self._waiters if not fut.done())

    def would_wait(self) -> bool:
        return self.in_use >= self.limit or self.waiting > 0

    @asynccontextmanager
    async def slot(self, priority: Any = 0) -> AsyncIterator[None]:
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: Any) -> None:
        if not self.would_wait():
            self.in_use += 1
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._tie), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # granted and cancelled in the same breath: hand the slot on
            raise

    def _release(self) -> None:
        self.in_use -= 1
        while self._waiters and self.in_use < self.limit:
            *_, future = heapq.heappop(self._waiters)
            if not future.done():
                self.in_use += 1
                future.set_result(None)
