"""The capacity gate (--max-agents): at most N slots, waiters served in priority order."""

from __future__ import annotations

import asyncio

import pytest

from reactor.workflow.capacity import CapacityGate


async def test_never_more_than_the_limit_and_waiters_start_in_priority_order():
    gate = CapacityGate(2)
    inside, peak, order = 0, 0, []
    release = asyncio.Event()

    async def task(name: str, priority: int) -> None:
        nonlocal inside, peak
        async with gate.slot(priority):
            inside += 1
            peak = max(peak, inside)
            order.append(name)
            await release.wait()
            inside -= 1

    first = [asyncio.create_task(task(f"first-{i}", 0)) for i in range(2)]
    await asyncio.sleep(0)
    assert gate.in_use == 2 and gate.would_wait()
    # Asked in the order c, a, b; served by priority: a (1), b (2), c (3).
    waiters = [asyncio.create_task(task(name, prio)) for name, prio in (("c", 3), ("a", 1), ("b", 2))]
    await asyncio.sleep(0)
    assert gate.waiting == 3
    release.set()
    await asyncio.gather(*first, *waiters)
    assert peak == 2
    assert order[2:] == ["a", "b", "c"]
    assert gate.in_use == 0 and gate.waiting == 0


async def test_a_cancelled_waiter_gives_up_its_place():
    gate = CapacityGate(1)
    holder_done = asyncio.Event()

    async def holder():
        async with gate.slot():
            await holder_done.wait()

    held = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(gate.slot().__aenter__())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    holder_done.set()
    await held
    assert gate.in_use == 0
    async with gate.slot():  # the slot was not lost to the cancelled waiter
        assert gate.in_use == 1


def test_limit_must_be_positive():
    with pytest.raises(ValueError):
        CapacityGate(0)
