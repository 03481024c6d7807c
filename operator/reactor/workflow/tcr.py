"""Test-Commit-Revert over one cell.

    Bootstrapping -> Executing -> Testing -> Committing (tests pass)   -> TearingDown -> Succeeded
                                          -> Reverting  (tests fail)   -> TearingDown -> Failed

Recovery: R3 around the prompt and the test run (transient model/server errors), BOOT_RETRY
when the server fails to boot or dies mid-task, RB (revert, no commit) on failed tests or a
time-box expiry, IG for bookkeeping (usage, changed-file listing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from reactor.errors import ConfigurationError
from reactor.infra.ports import PortsExhausted
from reactor.infra.servers import ServerBootError
from reactor.infra.worktrees import ResultRejected, resolve_repository
from reactor.opencode.errors import ModelError, OpenCodeError, OpenCodeUnavailable
from reactor.workflow.cell import Cell
from reactor.workflow.engine import Engine
from reactor.workflow.recovery import ignore_and_warn, retry_transient
from reactor.workflow.testcmd import detect_test_command
from reactor.workflow.types import Outcome, Phase, PhaseEvent, Reason, TaskResult, TaskSpec, Usage

log = logging.getLogger(__name__)

PhaseCallback = Callable[[PhaseEvent], Awaitable[None]]
OUTPUT_TAIL_CHARS = 4000
EXIT_COMMAND_NOT_FOUND = 127


class TaskFailed(Exception):
    """Ends the workflow early with a verdict (raised inside run_task only)."""

    def __init__(self, reason: Reason, message: str, outcome: Outcome = Outcome.FAILED):
        super().__init__(message)
        self.reason, self.message, self.outcome = reason, message, outcome


class _Phases:
    """Reports every phase change to the callback and the log, and times each phase."""

    def __init__(self, task_id: str, callback: PhaseCallback | None):
        self.task_id, self.callback = task_id, callback
        self.durations: dict[str, float] = {}
        self.current: Phase | None = None
        self._since = time.monotonic()

    async def enter(self, phase: Phase, message: str = "", cell: Cell | None = None) -> None:
        now = time.monotonic()
        if self.current is not None and not self.current.terminal:
            self.durations[self.current.value] = round(self.durations.get(self.current.value, 0.0) + now - self._since, 3)
        self.current, self._since = phase, now
        log.info("%s: %s%s", self.task_id, phase.value, f": {message}" if message else "")
        if self.callback is not None:
            event = PhaseEvent(task_id=self.task_id, phase=phase, message=message)
            if cell is not None:
                event.cell = cell.info()
            # IG: a status update that fails must not fail the task.
            await ignore_and_warn(f"{self.task_id}: report phase {phase.value}", lambda: self.callback(event), None)


async def run_task(spec: TaskSpec, engine: Engine, on_phase: PhaseCallback | None = None,
                   cell_id: str | None = None, priority: object = 0, take_capacity: bool = True) -> TaskResult:
    """Run one task to a verdict. Never raises for task failures (they are results); a
    cancellation (task deleted, operator stopping) tears the cell down and propagates.

    ``cell_id`` names the cell's worktree, state and server markers (default: the task id);
    ``priority`` orders tasks waiting for capacity (lower first); ``take_capacity=False``
    when the caller already holds a slot of engine.capacity."""
    gate = engine.capacity if take_capacity else None
    started = time.monotonic()
    phases = _Phases(spec.task_id, on_phase)
    cell = Cell(spec, engine, cell_id)
    result = TaskResult(task_id=spec.task_id, outcome=Outcome.FAILED, reason=Reason.INTERNAL_ERROR,
                        message="", branch=spec.branch, base_branch=spec.base_branch,
                        confined=engine.confinement.enabled)
    committed = False
    try:
        waiting = gate.wait_reason() if gate is not None else None
        if waiting is not None:  # "waiting for capacity: ..." or "waiting for memory: ..."
            await phases.enter(Phase.PENDING, waiting[1])
        async with gate.slot(priority) if gate is not None else contextlib.nullcontext():
            time_box = asyncio.timeout(spec.timeout)
            try:
                async with time_box:
                    committed = await _test_commit_revert(spec, cell, phases, result)
            except TimeoutError:
                if not time_box.expired():
                    raise
                await _on_time_box(spec, cell, phases, result)
            except TaskFailed as verdict:
                if cell.worktree is not None:
                    await phases.enter(Phase.REVERTING, verdict.message, cell)
                    await _revert(cell)
                result.outcome, result.reason, result.message = verdict.outcome, verdict.reason, verdict.message
            except ConfigurationError as exc:
                result.reason, result.message = Reason.INVALID_INPUT, str(exc)
            except (ServerBootError, PortsExhausted) as exc:
                result.reason, result.message = Reason.BOOT_FAILED, str(exc)
            except OpenCodeError as exc:
                await phases.enter(Phase.REVERTING, str(exc), cell)
                await _revert(cell)
                result.reason, result.message = Reason.AGENT_ERROR, str(exc)
            finally:
                result.usage = _add(cell.spent, await _usage(cell))
                await phases.enter(Phase.TEARING_DOWN, cell=cell)
                await _shielded(cell.teardown(keep_branch=committed))
    except asyncio.CancelledError:
        result.reason, result.message = Reason.CANCELLED, "cancelled"
        raise
    except Exception as exc:  # a bug, or git failing under us: report it, leave nothing behind
        log.exception("%s: internal error", spec.task_id)
        result.reason, result.message = Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"
    finally:
        result.boot_attempts = cell.boot_attempts
        result.phase_durations = phases.durations
        result.duration = round(time.monotonic() - started, 3)
    if not committed:  # the branch was deleted at teardown; there is nothing to point at
        result.commit = result.branch = None
    await phases.enter(Phase.SUCCEEDED if result.succeeded else Phase.FAILED, result.message)
    return result


async def _test_commit_revert(spec: TaskSpec, cell: Cell, phases: _Phases, result: TaskResult) -> bool:
    policy = cell.engine.settings.recovery

    # -- Bootstrapping: worktree, port, healthy server, session --
    await phases.enter(Phase.BOOTSTRAPPING)
    repo = await asyncio.to_thread(resolve_repository, spec.repo)
    test_command = spec.test_command or await asyncio.to_thread(detect_test_command, repo)
    result.test_command = test_command
    await cell.create_worktree()
    await cell.start_server()

    # -- Executing: the agent edits the worktree --
    await phases.enter(Phase.EXECUTING, cell=cell)
    restarts_left = policy.boot_restarts
    while True:
        try:
            await retry_transient(f"{spec.task_id}: prompt", lambda: _prompt(cell, result), policy,
                                  before_retry=lambda: _fresh_session(cell))
            break
        except OpenCodeUnavailable as exc:
            if not restarts_left:
                raise TaskFailed(Reason.AGENT_ERROR, f"the OpenCode server died and restarts are used up: {exc}") from exc
            restarts_left -= 1
            log.warning("BOOT_RETRY: %s: server lost mid-task (%s); restarting it", spec.task_id, exc)
            await cell.restart_server()
            await phases.enter(Phase.EXECUTING, "server restarted", cell)
        except ModelError as exc:
            raise TaskFailed(Reason.AGENT_ERROR, f"the model failed: {exc}") from exc

    files = await _changed_files(cell)
    result.files_changed = files
    if not files:
        raise TaskFailed(Reason.NO_CHANGES, "the agent changed no file; nothing to test or commit")

    # -- Testing: through the server (INV-006), never a subprocess of ours --
    await phases.enter(Phase.TESTING, test_command, cell)
    client = cell.client
    assert client is not None
    # A session of its own: shell runs are stored in a session and an agent would see them.
    test_session = (await client.create_session(title=f"Tests of {spec.task_id}")).id
    test = await retry_transient(
        f"{spec.task_id}: tests",
        lambda: client.run_command(test_session, test_command, timeout=spec.test_timeout),
        policy,
    )
    result.test_exit_code = test.exit_code
    result.test_output_tail = test.output[-OUTPUT_TAIL_CHARS:]
    if test.timed_out:
        raise TaskFailed(Reason.TESTS_FAILED, f"tests timed out after {spec.test_timeout:g}s", Outcome.REVERTED)
    if test.exit_code == EXIT_COMMAND_NOT_FOUND:
        raise TaskFailed(Reason.TEST_COMMAND_NOT_FOUND,
                         f"test command {test_command!r} was not found (exit 127)", Outcome.REVERTED)
    if test.exit_code != 0:
        raise TaskFailed(Reason.TESTS_FAILED, f"tests failed (exit {test.exit_code})", Outcome.REVERTED)

    # -- Committing --
    await phases.enter(Phase.COMMITTING, cell=cell)
    worktree = cell.worktree
    assert worktree is not None
    # Nothing of the cell may run on while the result is taken: a leftover process could
    # otherwise change a file between the test run and the commit.
    cell.spent = _add(cell.spent, await _usage(cell))  # the server goes now; its usage is read first
    await cell.stop_server()
    # The agent's change as it stood when tested (files the test run wrote are not part of it).
    commit = await asyncio.to_thread(worktree.commit, spec.commit_message, files)
    try:
        await asyncio.to_thread(cell.engine.worktrees.accept, worktree, commit, files)
    except ResultRejected as exc:
        raise TaskFailed(Reason.REFS_TAMPERED, str(exc)) from exc
    result.commit = commit
    result.outcome, result.reason = Outcome.COMMITTED, Reason.COMMITTED
    result.message = f"tests passed; committed {result.commit[:12]} on {spec.branch}"
    return True


async def _prompt(cell: Cell, result: TaskResult) -> None:
    assert cell.client is not None and cell.session_id is not None
    result.prompt_attempts += 1
    await cell.client.prompt(cell.session_id, cell.spec.prompt, model=cell.spec.model)


async def _fresh_session(cell: Cell) -> None:
    """Before an R3 retry of the prompt: a clean worktree and a new session, so the retry
    does not build on a half-finished turn."""
    assert cell.client is not None and cell.worktree is not None
    cell.spent = _add(cell.spent, await _usage(cell))  # the failed turn's tokens were paid for too
    await asyncio.to_thread(cell.worktree.revert)
    cell.session_id = (await cell.client.create_session(title=cell.spec.commit_message)).id


async def _changed_files(cell: Cell) -> list[str]:
    """What the agent changed. The worktree's git status is the truth (it is what a commit
    would contain); the server's view is not needed for the verdict."""
    assert cell.worktree is not None
    return sorted(await asyncio.to_thread(cell.worktree.changed_paths))


async def _on_time_box(spec: TaskSpec, cell: Cell, phases: _Phases, result: TaskResult) -> None:
    message = f"time box of {spec.timeout:g}s expired"
    if cell.client is not None and cell.session_id is not None:
        client, session_id = cell.client, cell.session_id
        await ignore_and_warn(f"{spec.task_id}: abort agent", lambda: asyncio.wait_for(client.abort(session_id), 5), False)
    await phases.enter(Phase.REVERTING, message, cell)
    await _revert(cell)
    result.reason, result.message = Reason.TIMEOUT, message


async def _revert(cell: Cell) -> None:
    """RB: throw the change away. The worktree and its branch go at teardown anyway; the
    reset makes sure no half-written state can be committed or pushed by anything else."""
    if cell.worktree is not None and Path(cell.worktree.path).exists():
        await ignore_and_warn(f"{cell.cell_id}: revert", lambda: asyncio.to_thread(cell.worktree.revert), None)


def _add(a: Usage, b: Usage) -> Usage:
    return Usage(**{name: getattr(a, name) + getattr(b, name) for name in Usage.model_fields})


async def _usage(cell: Cell) -> Usage:
    if cell.client is None or cell.session_id is None:
        return Usage()
    client, session_id = cell.client, cell.session_id

    return await ignore_and_warn(f"{cell.cell_id}: read usage",
                                 lambda: asyncio.wait_for(client.usage(session_id), 5), Usage())


async def _shielded(coro: Awaitable[None]) -> None:
    """Run cleanup to the end even if the surrounding task is cancelled meanwhile."""
    task = asyncio.ensure_future(coro)
    while True:
        try:
            await asyncio.shield(task)
            return
        except asyncio.CancelledError:
            if task.done():
                raise
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise
