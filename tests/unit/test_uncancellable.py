"""A delete then the operator's SIGTERM, by construction: a teardown run through uncancellable() ends
whatever number of cancellations land on its caller, and wherever they land."""

from __future__ import annotations

import asyncio
import time

import pytest

from reactor.workflow.tcr import uncancellable

STEPS = ["sleep(0)", "to_thread", "timer", "event", "subprocess"]


async def teardown(done: list[str], at_step, event: asyncio.Event) -> None:
    """Something with each kind of await point a real teardown has."""
    for step in STEPS:
        at_step(step)
        if step == "sleep(0)":
            await asyncio.sleep(0)
        elif step == "to_thread":
            await asyncio.to_thread(time.sleep, 0.01)
        elif step == "timer":
            await asyncio.sleep(0.01)
        elif step == "event":
            asyncio.get_running_loop().call_later(0.01, event.set)
            await event.wait()
        else:
            process = await asyncio.create_subprocess_exec("true")
            await process.wait()
        done.append(step)


CANCELS = (
    # the first cancellation lands in the work, the next at one await point of the teardown
    [("work", step) for step in STEPS]
    # the run was ending by itself; cancellations land at two await points in a row (the
    # delete, then the operator's shutdown), or at three
    + [(a, b) for a, b in zip(STEPS, STEPS[1:])]
    + [("sleep(0)", "timer", "subprocess"), ("work", "to_thread", "event")]
)


@pytest.mark.parametrize("cancel_at", CANCELS, ids=lambda c: "+".join(c))
async def test_cancellations_at_any_await_points_do_not_stop_the_teardown(cancel_at):
    done: list[str] = []
    in_work = asyncio.Event()
    run: asyncio.Task | None = None

    def at_step(step: str) -> None:
        if step in cancel_at:
            run.cancel()

    async def task_run() -> None:
        try:
            if "work" in cancel_at:
                in_work.set()
                await asyncio.sleep(60)
        finally:
            await uncancellable(teardown(done, at_step, asyncio.Event()))

    run = asyncio.create_task(task_run())
    if "work" in cancel_at:
        await in_work.wait()
        run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert done == STEPS, "the teardown ran every step"


async def test_the_result_and_the_error_of_the_inner_work_are_the_callers():
    async def work():
        await asyncio.sleep(0)
        return 42

    async def broken():
        await asyncio.sleep(0)
        raise RuntimeError("teardown failed")

    assert await uncancellable(work()) == 42
    with pytest.raises(RuntimeError, match="teardown failed"):
        await uncancellable(broken())


async def test_a_cancel_is_raised_after_the_inner_work_ends_not_before():
    finished = []

    async def work():
        await asyncio.sleep(0.05)
        finished.append(time.monotonic())

    async def caller():
        await uncancellable(work())

    task = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished, "the work ended before the cancellation reached the caller"
