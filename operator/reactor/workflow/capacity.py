"""At most N cells at once, and (optionally) only while memory allows another; waiters start
in priority order (the operator: creation time), not in the order they happened to ask.

Memory-aware admission: a cell is admitted only while the headroom (limit minus working set)
covers one cell's peak *after* reserving, for every live cell, the growth still ahead of it up
to that peak (a cell that has not started its server yet reserves a whole peak). The peak is
the configured estimate or the largest cell measured so far, whichever is larger.
``--max-agents`` stays the upper bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from reactor.infra.memory import MemoryReading
from reactor.workflow.types import Reason

WAITING_FOR_CAPACITY, WAITING_FOR_MEMORY = Reason.WAITING_FOR_CAPACITY, Reason.WAITING_FOR_MEMORY
MiB = 1 << 20

# Called with (reason, message) when a waiter starts waiting and whenever its reason changes.
ReasonCallback = Callable[[Reason, str], Awaitable[None]]


@dataclass(frozen=True)
class Admission:
    admitted: bool
    free: int  # bytes left after reserving the live cells' growth (may be negative)
    peak: int  # what one more cell needs

    def message(self) -> str:
        return f"{max(0, self.free) // MiB} MiB free after reserving the running cells' peaks, a cell needs {self.peak // MiB} MiB"


class MemoryAdmission:
    def __init__(self, read: Callable[[], MemoryReading], cells: Callable[[], dict[str, int]], cell_peak: int):
        self.read, self.cells = read, cells
        self.cell_peak = cell_peak  # configured estimate, bytes
        self.observed_peak = 0  # the largest cell measured

    @property
    def peak(self) -> int:
        return max(self.cell_peak, self.observed_peak)

    def check(self, live: int) -> Admission:
        reading = self.read()
        if reading.limit is None:  # nothing to protect (and no need to look at every process)
            return Admission(True, 1 << 62, self.peak)
        usage = self.cells()
        self.observed_peak = max([self.observed_peak, *usage.values()])
        peak = self.peak
        measured = sorted(usage.values(), reverse=True)[:live]
        reserve = sum(max(0, peak - used) for used in measured) + max(0, live - len(measured)) * peak
        free = reading.limit - reading.usage - reserve
        return Admission(free >= peak, free, peak)


@dataclass(order=True)
class _Waiter:
    priority: Any
    tie: int
    future: asyncio.Future = field(compare=False)
    changed: asyncio.Event = field(compare=False, default_factory=asyncio.Event)
    reason: tuple[Reason, str] | None = field(compare=False, default=None)


class CapacityGate:
    def __init__(self, limit: int, memory: MemoryAdmission | None = None, poll: float = 1.0):
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.memory = memory
        self.poll = poll  # while memory holds waiters back: how often to look again
        self.in_use = 0
        self.peak_in_use = 0
        self._waiters: list[_Waiter] = []
        self._tie = itertools.count()
        self._poller: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.future.done())

    def _admission(self) -> Admission | None:
        return self.memory.check(self.in_use) if self.memory is not None else None

    def would_wait(self) -> bool:
        return self.wait_reason() is not None

    def wait_reason(self) -> tuple[Reason, str] | None:
        """(reason, message) a new task would wait for now, or None if it would start."""
        if self.in_use >= self.limit:
            return WAITING_FOR_CAPACITY, f"waiting for capacity: {self.in_use}/{self.limit} agents busy"
        admission = self._admission()
        if admission is not None and not admission.admitted:
            return WAITING_FOR_MEMORY, f"waiting for memory: {admission.message()}"
        if self.waiting:
            return WAITING_FOR_CAPACITY, f"waiting for capacity: {self.waiting} task(s) ahead"
        return None

    @asynccontextmanager
    async def slot(self, priority: Any = 0, on_reason: ReasonCallback | None = None) -> AsyncIterator[None]:
        await self._acquire(priority, on_reason)
        try:
            yield
        finally:
            self._release()

    def _take(self) -> None:
        self.in_use += 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)

    async def _acquire(self, priority: Any, on_reason: ReasonCallback | None) -> None:
        reason = self.wait_reason()
        if reason is None:
            self._take()
            return
        waiter = _Waiter(priority, next(self._tie), asyncio.get_running_loop().create_future(), reason=reason)
        heapq.heappush(self._waiters, waiter)
        self._ensure_poller()
        try:
            if on_reason is not None:
                await on_reason(*reason)
            while not waiter.future.done():
                changed = asyncio.ensure_future(waiter.changed.wait())
                try:
                    await asyncio.wait({waiter.future, changed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                if not waiter.future.done() and waiter.changed.is_set():
                    waiter.changed.clear()
                    if on_reason is not None and waiter.reason is not None:
                        await on_reason(*waiter.reason)
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release()  # granted and cancelled in the same breath: hand the slot on
            else:
                waiter.future.cancel()
            raise

    def _release(self) -> None:
        self.in_use -= 1
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():
                heapq.heappop(self._waiters)
                continue
            if self.in_use >= self.limit:
                return
            admission = self._admission()
            if admission is not None and not admission.admitted:
                self._ensure_poller()
                return
            heapq.heappop(self._waiters)
            self._take()
            head.future.set_result(None)

    def _ensure_poller(self) -> None:
        """Memory frees without a release (cells shrink, the page cache is dropped): while
        anyone waits, look again every ``poll`` seconds and tell waiters their new reason."""
        if self.memory is None or (self._poller is not None and not self._poller.done()):
            return
        self._poller = asyncio.get_running_loop().create_task(self._poll(), name="capacity memory poll")

    async def _poll(self) -> None:
        while self.waiting:
            await asyncio.sleep(self.poll)
            self._grant()
            reason = self.wait_reason() if self.waiting else None
            if reason is None:
                continue
            for waiter in self._waiters:
                if not waiter.future.done() and waiter.reason is not None and waiter.reason[0] != reason[0]:
                    waiter.reason = reason
                    waiter.changed.set()

    async def aclose(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
