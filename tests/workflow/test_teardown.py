"""Row 1 on real cells: a teardown that a second (and third) cancellation lands on, at each
point where it waits, still ends with nothing left: no server, no worktree, no port.

The teardown coroutine is stepped through a wrapper that counts the times it yields to the
event loop; a first run counts them, then one run per await point cancels the task again
exactly there. The teardown itself is the real one (tcr._wind_down on a real cell)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import pytest

from reactor.infra.processes import find_marked_processes
from reactor_dev.testing.helpers import until
from reactor_dev.testing.repos import git, worktrees_of
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, hang
from reactor.workflow import tcr
from reactor.workflow.types import Phase, TaskSpec

pytestmark = pytest.mark.opencode


class Stepped:
    """Awaits ``coro``, calling ``on_yield(n)`` each time it yields to the event loop."""

    def __init__(self, coro: Coroutine[Any, Any, Any], on_yield: Callable[[int], None]):
        self.coro, self.on_yield = coro, on_yield

    def __await__(self) -> Generator[Any, Any, Any]:
        inner = self.coro.__await__()
        sent, thrown, count = None, None, 0
        while True:
            try:
                yielded = inner.throw(thrown) if thrown is not None else inner.send(sent)
            except StopIteration as stop:
                return stop.value
            count += 1
            self.on_yield(count)
            try:
                sent, thrown = (yield yielded), None
            except BaseException as exc:  # noqa: BLE001 - handed on to the coroutine
                sent, thrown = None, exc


@pytest.fixture
def instrumented(monkeypatch):
    """Lets a test step the teardown of the runs it names (by task id)."""
    hooks: dict[str, Callable[[int], None]] = {}
    original = tcr.uncancellable

    def uncancellable(coro):
        frame = coro.cr_frame
        cell = frame.f_locals.get("cell") if frame is not None else None
        if coro.__name__ == "_wind_down" and cell is not None and cell.spec.task_id in hooks:
            hook = hooks[cell.spec.task_id]

            async def stepped():
                return await Stepped(coro, hook)

            return original(stepped())
        return original(coro)

    monkeypatch.setattr(tcr, "uncancellable", uncancellable)
    return hooks


def spec(repo, model, task_id: str) -> TaskSpec:
    return TaskSpec(task_id=task_id, prompt=f"{task_id}: fix add()", repo=repo, test_command="true",
                    opencode_config=model.opencode_config(), timeout=300)


async def run_and_cancel(repo, engine, model, task_id: str, hooks: dict, second_cancel_at: int | None) -> int:
    """Run a task until its agent is mid-turn, cancel it, and cancel it again at the
    teardown's ``second_cancel_at``-th await point. Returns the teardown's await points."""
    points = 0
    run: asyncio.Task | None = None

    def on_yield(n: int) -> None:
        nonlocal points
        points = n
        if n == second_cancel_at:
            run.cancel()  # the operator's shutdown, after the delete
            run.cancel()  # and once more for good measure

    hooks[task_id] = on_yield
    executing = asyncio.Event()

    async def on_phase(event):
        if event.phase is Phase.EXECUTING:
            executing.set()

    run = asyncio.create_task(tcr.run_task(spec(repo, model, task_id), engine, on_phase))
    await executing.wait()
    await until(lambda: any(r["scenario"] == f"{task_id}:" and r["kind"] == "hang" for r in model.requests),
                120, f"{task_id} mid-turn")
    run.cancel()  # the delete
    with pytest.raises(asyncio.CancelledError):
        await run
    return points


async def test_the_teardown_ends_whatever_await_point_a_second_cancel_lands_on(repo, engine, instrumented):
    names = [f"T-CANCEL-{i}" for i in range(40)]
    with ScriptedModel([Scenario(f"{n}:", [hang(times=100)]) for n in names]) as model:
        points = await run_and_cancel(repo, engine, model, names[0], instrumented, None)
        assert points >= 3, "the teardown waits on the server, the worktree and the port"
        assert points < len(names), points
        cells = asyncio.Semaphore(3)  # a few cells at a time: two cores

        async def one(k: int) -> int:
            async with cells:
                return await run_and_cancel(repo, engine, model, names[k], instrumented, k)

        seen = await asyncio.gather(*(one(k) for k in range(1, points + 1)))
    assert all(n >= k for k, n in enumerate(seen, start=1)), "each second cancel landed inside the teardown"
    assert find_marked_processes(str(engine.work_dir)) == [], "no server or shell of any cell is left"
    assert worktrees_of(repo, engine.work_dir) == [] and git(repo, "branch", "--list", "reactor/*") == ""
    assert engine.ports.held() == {}
    print(f"\nteardown await points: {points}")
