"""Memory-aware admission in the capacity gate (fast: no opencode; memory readings are
injected so the arithmetic is checked exactly). The max-agents bound: test_capacity.py."""

from __future__ import annotations

import asyncio

from reactor.infra.memory import MemoryReading
from reactor.workflow.capacity import (
    WAITING_FOR_CAPACITY,
    WAITING_FOR_MEMORY,
    CapacityGate,
    MemoryAdmission,
)

MiB = 1 << 20


class FakePod:
    """A pod whose memory the test sets: a base usage plus each live cell's current size."""

    def __init__(self, limit_mib: int | None, base_mib: int = 100):
        self.limit = None if limit_mib is None else limit_mib * MiB
        self.base = base_mib * MiB
        self.cells: dict[str, int] = {}

    def read(self) -> MemoryReading:
        return MemoryReading(self.limit, self.base + sum(self.cells.values()))

    def cell_usage(self) -> dict[str, int]:
        return dict(self.cells)


async def run_cells(gate: CapacityGate, names: list[str], hold: asyncio.Event, log: list, pod: FakePod | None = None,
                    size_mib: int = 0, reasons: dict | None = None):
    async def one(name: str, priority: int):
        async def on_reason(reason: str, message: str) -> None:
            if reasons is not None:
                reasons.setdefault(name, []).append(reason)

        async with gate.slot(priority, on_reason):
            log.append(("start", name, gate.in_use))
            if pod is not None:
                pod.cells[name] = size_mib * MiB
            await hold.wait()
            if pod is not None:
                pod.cells.pop(name)
            log.append(("end", name))

    return [asyncio.create_task(one(name, i)) for i, name in enumerate(names)]


async def until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_memory_admits_only_what_the_limit_covers():
    # 1000 MiB limit, 100 MiB base, cells of 300 MiB measured at 300: 100 + 3 x 300 = 1000.
    pod = FakePod(limit_mib=1000)
    gate = CapacityGate(10, MemoryAdmission(pod.read, pod.cell_usage, cell_peak=300 * MiB), poll=0.02)
    hold, log, reasons = asyncio.Event(), [], {}
    tasks = await run_cells(gate, [f"c{i}" for i in range(6)], hold, log, pod, size_mib=300, reasons=reasons)
    await until(lambda: gate.waiting == 3)
    assert gate.in_use == 3 and gate.wait_reason()[0] == WAITING_FOR_MEMORY
    assert "a cell needs 300 MiB" in gate.wait_reason()[1]
    assert all(reasons[f"c{i}"] == [WAITING_FOR_MEMORY] for i in (3, 4, 5))
    hold.set()
    await asyncio.gather(*tasks)
    assert gate.peak_in_use == 3, "never more cells than the memory holds"
    assert max(entry[2] for entry in log if entry[0] == "start") == 3


async def test_an_admitted_cell_reserves_its_peak_before_it_uses_memory():
    """A burst: cells admitted but not yet grown (their server still starting) count at their
    peak, so a burst cannot overshoot the limit before the usage shows it."""
    pod = FakePod(limit_mib=1000)
    gate = CapacityGate(10, MemoryAdmission(pod.read, pod.cell_usage, cell_peak=300 * MiB), poll=0.02)
    hold, log = asyncio.Event(), []
    tasks = await run_cells(gate, [f"c{i}" for i in range(6)], hold, log, pod=None)  # cells never show usage
    await until(lambda: gate.waiting == 3)
    assert gate.in_use == 3
    hold.set()
    await asyncio.gather(*tasks)


async def test_a_larger_cell_raises_the_peak_estimate():
    pod = FakePod(limit_mib=1000)
    admission = MemoryAdmission(pod.read, pod.cell_usage, cell_peak=200 * MiB)
    pod.cells["big"] = 400 * MiB
    assert admission.check(live=1).peak == 400 * MiB
    assert admission.check(live=1).admitted  # 1000 - 500 = 500 >= 400
    pod.cells["big2"] = 400 * MiB
    assert not admission.check(live=2).admitted  # 1000 - 900 = 100 < 400


async def test_no_limit_means_only_max_agents_counts():
    pod = FakePod(limit_mib=None)
    gate = CapacityGate(2, MemoryAdmission(pod.read, pod.cell_usage, cell_peak=10_000 * MiB))
    hold, log = asyncio.Event(), []
    tasks = await run_cells(gate, ["a", "b", "c"], hold, log, pod, size_mib=5000)
    await until(lambda: gate.in_use == 2 and gate.waiting == 1)
    assert gate.wait_reason()[0] == WAITING_FOR_CAPACITY
    hold.set()
    await asyncio.gather(*tasks)


async def test_the_reason_changes_from_capacity_to_memory_while_waiting():
    pod = FakePod(limit_mib=1000)
    gate = CapacityGate(1, MemoryAdmission(pod.read, pod.cell_usage, cell_peak=300 * MiB), poll=0.02)
    first_done, reasons = asyncio.Event(), {}

    async def first():
        async with gate.slot(0):
            await first_done.wait()
            pod.base = 800 * MiB  # something else in the pod grew meanwhile

    async def second():
        async def on_reason(reason, message):
            reasons.setdefault("second", []).append(reason)
            if reason == WAITING_FOR_MEMORY:
                pod.base = 100 * MiB  # and shrank again: the poller lets it in
        async with gate.slot(1, on_reason):
            pass

    a, b = asyncio.create_task(first()), asyncio.create_task(second())
    await until(lambda: gate.waiting == 1)
    first_done.set()
    await asyncio.gather(a, b)
    assert reasons["second"] == [WAITING_FOR_CAPACITY, WAITING_FOR_MEMORY]
    await gate.aclose()
