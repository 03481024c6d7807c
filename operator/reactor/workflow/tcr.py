"""Test-Commit-Revert over one cell.

    Pending? -> Bootstrapping -> Executing -> Testing -> Committing -> Pushing? -> TearingDown -> Succeeded
                                                      -> Reverting ----------------> TearingDown -> Failed

Each phase is entered once, in this order, and reported through one callback: whoever
shows the task (the CLI's stderr, the operator's status) has one source. Pushing happens
only where there is an origin to push to (the operator); the CLI's result branch stays in
the user's repository.

Recovery (the strategies of docs/architecture.md): transient model/server errors around
the prompt and the test run are retried (R3); a server that fails to boot or dies mid-task
is restarted (BOOT_RETRY, one budget per task, in the cell); failed tests, a protected path
changed, a stalled agent or the time box expiring revert the change without a commit (RB);
bookkeeping (usage, phase reporting) that fails is logged and the task goes on (IG).

Deadlines: every git step in the checkout has one (a filter the agent planted can hang any
of them; the step is killed with what it started). Up to the test verdict it is the time
box's end. Committing and reverting come after the verdict and get ``commit_grace`` (60 s)
from their start, whether the box has time left or has just run out: a change that passed
its tests is not lost for the box ending meanwhile, and a hung commit holds the task that
long at most. A commit killed there fails the task with Timeout, nothing committed
(docs/faults.md).

Cancellation (the task deleted, the operator stopping) ends the run at the next await, with
two exceptions made uncancellable by construction: the push, once begun, runs to its end
and its verdict is reported (a pushed branch is never left behind unreported), and the
teardown always runs to its end however many cancellations arrive meanwhile.

A TaskControl stops the run with a verdict up to Committing: its budget guard (spec.budget,
checked after every model step from the cell's event stream) or the caller (a spend limit
over many tasks). The agent is aborted and the worktree reverted, as on a time-box expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pathspec

from reactor.errors import ConfigurationError
from reactor.infra.cellrecords import LiveCell
from reactor.infra.git import GitTimeout
from reactor.infra.ports import PortsExhausted
from reactor.infra.repository_urls import RepositoryRefused
from reactor.infra.servers import ServerBootError
from reactor.infra.worktrees import ParentsConflict, ResultRejected, integrate, resolve_repository
from reactor.opencode.errors import ModelError, OpenCodeError, OpenCodeUnavailable
from reactor.redact import Redactor
from reactor.opencode.events import Consumer, Event, SessionIdle
from reactor.workflow.cell import Cell
from reactor.workflow.control import TaskControl, TaskStopped
from reactor.workflow.engine import Engine
from reactor.workflow.origin import FetchFailed, Origin, PushFailed
from reactor.workflow.recovery import ignore_and_warn, retry_transient
from reactor.workflow.testcmd import detect_test_command
from reactor.workflow.types import Attempt, Outcome, Phase, PhaseEvent, Reason, TaskResult, TaskSpec, Usage
from reactor.workflow.watch import AgentStalled, TurnWatch

log = logging.getLogger(__name__)
T = TypeVar("T")

PhaseCallback = Callable[[PhaseEvent], Awaitable[None]]
Clock = Callable[[], float]  # wall-clock seconds since the epoch (time.time)
# The one message a reopened session gets (the conversation so far is in the session).
CONTINUATION = ("Reactor was restarted while you worked on this task and your last step was cut off (a tool "
                "call in flight may not have completed). The checkout is as you left it; files changed so far: "
                "{files}. Continue the task from where you stopped; do not redo finished steps.")
# Appended to the prompt when the session could not be reopened (a fresh one on the checkout).
RESTARTED = ("An earlier attempt at this task was interrupted; the checkout holds its changes to: {files}. "
             "Check them and finish the task.")
# Appended to the prompt of a fresh session started from a lost run's green commit (a fleet
# replica that died before publishing it): its change is in the checkout, uncommitted.
RESUMED_FROM = ("An earlier run of this task made a change that passed the tests (commit {commit}), but it was "
                "lost before it was published. The checkout holds that change, to: {files}. Check it and finish the "
                "task; if nothing is missing, change nothing more.")
OUTPUT_TAIL_CHARS = 4000
EXIT_COMMAND_NOT_FOUND = 127


class TaskFailed(Exception):
    """Ends the workflow early with a verdict (raised inside run_task only)."""

    def __init__(self, reason: Reason, message: str, outcome: Outcome = Outcome.FAILED):
        super().__init__(message)
        self.reason, self.message, self.outcome = reason, message, outcome


class TimeBox:
    """The task's time box, like a Job's activeDeadlineSeconds: ``seconds`` counted from the
    task's first start (wall-clock epoch seconds, kept in status across operator restarts and
    adoptions, so a restart grants no fresh box)."""

    def __init__(self, seconds: float, started_at: float):
        self.seconds, self.started_at = seconds, started_at

    def left(self, now: float) -> float:
        """Seconds left at ``now``; zero or less: expired."""
        return self.seconds - (now - self.started_at)

    def describe(self) -> str:
        since = dt.datetime.fromtimestamp(self.started_at, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"time box of {self.seconds:g}s (counted from the first start, {since})"


class _Phases:
    """The one place a task's phase changes: enters each phase once, in order, times it, and
    reports it to the callback (IG: a report that fails does not fail the task).

    Every message it reports is masked of the task's secret values: messages quote what a
    cell, a model provider or a remote said (a provider's 401 may quote the key it was given),
    and they go to the log, status and Events."""

    def __init__(self, task_id: str, callback: PhaseCallback | None, result: TaskResult, redactor: Redactor):
        self.task_id, self.callback, self.result, self.redactor = task_id, callback, result, redactor
        self.durations: dict[str, float] = {}
        self.current: Phase | None = None
        self._since = time.monotonic()

    async def enter(self, phase: Phase, message: str = "", cell: Cell | None = None, **event: Any) -> None:
        if self.current is not None and phase.rank <= self.current.rank:
            raise AssertionError(f"{self.task_id}: phase {phase.value} after {self.current.value}")
        now = time.monotonic()
        if self.current is not None and not self.current.terminal:
            self.durations[self.current.value] = round(self.durations.get(self.current.value, 0.0) + now - self._since, 3)
        self.current, self._since = phase, now
        message = self.redactor.text(message)
        log.info("%s: %s%s", self.task_id, phase.value, f": {message}" if message else "")
        await self._report(PhaseEvent(task_id=self.task_id, phase=phase, message=message,
                                      started_at=self.result.started_at, **event), cell)

    async def update(self, message: str, cell: Cell) -> None:
        """News within the current phase (a restarted server): same phase, new cell."""
        assert self.current is not None
        message = self.redactor.text(message)
        log.info("%s: %s: %s", self.task_id, self.current.value, message)
        await self._report(PhaseEvent(task_id=self.task_id, phase=self.current, message=message, update=True,
                                      started_at=self.result.started_at), cell)

    async def _report(self, event: PhaseEvent, cell: Cell | None) -> None:
        if self.callback is None:
            return
        if cell is not None:
            event.cell = cell.info()
        callback = self.callback
        await ignore_and_warn(f"{self.task_id}: report phase {event.phase.value}", lambda: callback(event), None)


async def run_task(spec: TaskSpec, engine: Engine, on_phase: PhaseCallback | None = None,
                   cell_id: str | None = None, priority: object = 0, take_capacity: bool = True,
                   origin: Origin | None = None, resume_commit: str | None = None,
                   control: TaskControl | None = None, watchers: Sequence[Consumer] = (),
                   clock: Clock = time.time, reopen_session: str | None = None,
                   reattach: LiveCell | None = None) -> TaskResult:
    """Run one task to a verdict and report it (the terminal phase carries the result).
    Never raises for task failures (they are results); a cancellation tears the cell down
    and propagates, unless the push had begun (then the verdict is reported first).

    ``cell_id`` names the cell's worktree, state and server markers (default: the task id);
    ``priority`` orders tasks waiting for capacity (lower first); ``take_capacity=False``
    when the caller already holds a slot of engine.capacity; ``origin`` is where the
    repository is fetched from and the result pushed to; ``resume_commit``: the task was
    committed by an earlier run that stopped before its push ended: push that commit only;
    ``control`` lets the caller stop the run with a verdict and read its running spend;
    ``watchers`` receive the cell's OpenCode events (live progress, transcripts); ``clock``
    is the wall clock the time box is counted on; ``reopen_session``: an earlier run of
    this cell was killed mid-turn (the operator died): take over its checkout as it is and
    reopen this OpenCode session from the cell's state dir with one continuation message,
    or, when the session cannot be reopened, a fresh session on the checkout with the
    prompt and what was done (no checkout left: a normal start). ``reattach`` (with
    ``reopen_session``): that cell's server still runs (cells outliving their operator) and
    its launcher was proven to be the recorded one: reattach to it, follow the session's turn
    to its end without sending anything, and go on with the tests; when it does not answer,
    it is stopped and the session reopened."""
    gate = engine.capacity if take_capacity else None
    started = time.monotonic()
    result = TaskResult(task_id=spec.task_id, outcome=Outcome.FAILED, reason=Reason.INTERNAL_ERROR,
                        message="", branch=spec.branch, base_branch=spec.base_branch, started_at=spec.started_at,
                        confined=engine.confinement.enabled, model=spec.model)
    phases = _Phases(spec.task_id, on_phase, result, Redactor(spec.env.values()))
    cell = Cell(spec, engine, cell_id)
    control = control or TaskControl()
    control.budget = spec.budget
    cell.events.subscribe(control.on_event)  # first: the others see the spend including this step
    for watcher in watchers:
        cell.events.subscribe(watcher)
    cancelled = False
    try:
        if resume_commit is not None:
            assert origin is not None, "a push is resumed from an origin"
            result.commit, result.outcome, result.reason = resume_commit, Outcome.COMMITTED, Reason.COMMITTED
            await _push(spec, origin, phases, result)
        else:
            waiting = gate.wait_reason() if gate is not None else None
            if waiting is not None:  # all agents busy, or no memory for another cell
                await phases.enter(Phase.PENDING, waiting[1], reason=waiting[0])
            async with gate.slot(priority) if gate is not None else contextlib.nullcontext():
                if result.started_at is None:
                    result.started_at = clock()
                cell.reopen_session = reopen_session
                cell.live = reattach if reopen_session is not None else None
                try:
                    await _in_cell(spec, cell, phases, result, origin, control, clock)
                finally:
                    await uncancellable(_wind_down(cell, phases, result))
    except asyncio.CancelledError:
        if not result.pushed:
            result.reason, result.message = Reason.CANCELLED, "cancelled"
            raise
        cancelled = True  # the push was the point of no return: report its verdict, then stop
    except Exception as exc:  # a bug, or git failing under us: report it, leave nothing behind
        log.exception("%s: internal error", spec.task_id)
        result.outcome, result.reason, result.message = Outcome.FAILED, Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"
    finally:
        result.boot_attempts = cell.boot_attempts
        result.phase_durations = phases.durations
        result.duration = round(time.monotonic() - started, 3)
    result.message = phases.redactor.text(result.message)  # the result goes to status and the PR body too
    _close_attempt(result)
    if result.resumed_from:  # what resuming cost: this run's spend (the lost run's is in status.progress)
        result.message += (f" (resumed from {result.resumed_from[:12]}, a lost run's tested commit; this run: "
                           f"{result.usage.total_tokens} tokens, ${result.usage.cost:.4f})")
    if not _holds_commit(result):
        result.commit = None
        result.branch = None  # deleted at teardown: there is nothing to point at
    terminal = Phase.SUCCEEDED if result.succeeded else Phase.FAILED
    await uncancellable(phases.enter(terminal, result.message, reason=result.reason, result=result))
    if cancelled:
        raise asyncio.CancelledError
    return result


async def _in_cell(spec: TaskSpec, cell: Cell, phases: _Phases, result: TaskResult, origin: Origin | None,
                   control: TaskControl, clock: Clock) -> None:
    """From Bootstrapping to the verdict. The agent's part (up to the test verdict) runs in
    the time box and may be stopped by ``control``; a change that passed its tests is
    committed and pushed outside both."""
    assert result.started_at is not None
    box = TimeBox(spec.timeout, result.started_at)
    left = box.left(clock())
    if left <= 0:
        result.reason, result.message = Reason.TIMEOUT, f"{box.describe()} expired before this attempt could start"
        return
    time_box = asyncio.timeout(left)
    cell.box_end = time.monotonic() + left
    grace = cell.engine.settings.commit_grace
    try:
        try:
            async with time_box, control.guard() as stops:
                files = await _test(spec, cell, phases, result, origin, control)
                await stops.close()  # a change that passed its tests is kept: stop requests end here
        except TimeoutError:
            if not time_box.expired():
                raise
            raise TaskFailed(Reason.TIMEOUT, f"{box.describe()} expired") from None
        except GitTimeout as exc:
            if box.left(clock()) > 1.0:
                raise  # its own step deadline, not the box's end: GitTimedOut below
            # a git step killed at the box's end, just before the box said so
            raise TaskFailed(Reason.TIMEOUT, f"{box.describe()} expired (git {exc.step} was killed)") from None
        except TaskStopped as stopped:  # the agent's turn was cancelled, which aborts it
            raise TaskFailed(stopped.request.reason, stopped.request.message) from None
    except TaskFailed as verdict:
        await _abort_turn(cell)
        if cell.worktree is not None:
            await phases.enter(Phase.REVERTING, verdict.message, cell)
            await _revert(cell, time.monotonic() + grace)
        result.outcome, result.reason, result.message = verdict.outcome, verdict.reason, verdict.message
        return
    except GitTimeout as exc:  # killed with all it started; a revert would run the same filter again
        result.reason, result.message = Reason.GIT_TIMED_OUT, str(exc)
        return
    except ConfigurationError as exc:
        result.reason, result.message = Reason.INVALID_INPUT, str(exc)
        return
    except RepositoryRefused as exc:
        result.reason, result.message = Reason.REPOSITORY_REFUSED, str(exc)
        return
    except FetchFailed as exc:
        result.reason, result.message = Reason.FETCH_FAILED, str(exc)
        return
    except (ServerBootError, PortsExhausted) as exc:
        result.reason, result.message = Reason.BOOT_FAILED, str(exc)
        return
    except ParentsConflict as exc:  # found before any worktree or server: nothing was spent
        result.reason, result.message = Reason.PARENTS_CONFLICT, f"{exc}; no agent was started"
        return

    # -- Committing: the agent's change as it stood when tested (files the test run wrote are not part of it) --
    await phases.enter(Phase.COMMITTING, cell=cell)
    worktree = cell.worktree
    assert worktree is not None
    # Nothing of the cell may run on while the result is taken: a leftover process could
    # otherwise change a file between the test run and the commit.
    cell.spent = _add(cell.spent, await _usage(cell))  # the server goes now; its usage is read first
    await cell.stop_server()
    rewritten = await asyncio.to_thread(worktree.changed_since, cell.tested)
    if rewritten:  # by the test run itself, or something it started: not what was tested
        result.reason = Reason.REFS_TAMPERED
        result.message = f"{', '.join(rewritten)} changed after the tests ran; nothing committed"
        return
    until = time.monotonic() + grace
    try:
        commit = await asyncio.to_thread(worktree.commit, spec.commit_message, files, until)
        # into the source repository as the result branch, once it holds up
        await asyncio.to_thread(cell.engine.worktrees.accept, worktree, commit, files, until)
    except ResultRejected as exc:
        await phases.enter(Phase.REVERTING, str(exc), cell)
        await _revert(cell, time.monotonic() + grace)
        result.outcome, result.reason, result.message = Outcome.FAILED, Reason.REFS_TAMPERED, str(exc)
        return
    except GitTimeout as exc:
        # The time is up: no revert (it would run the same planted filter); the checkout and
        # its branch go at teardown, which runs no git in the checkout.
        message = (f"committing ran past its deadline of {grace:g}s: git {exc.step} was still running "
                   "(a filter of the checkout that hangs?); nothing committed")
        await phases.enter(Phase.REVERTING, message, cell)
        result.outcome, result.reason, result.message = Outcome.FAILED, Reason.TIMEOUT, message
        return
    result.commit = commit
    result.outcome, result.reason = Outcome.COMMITTED, Reason.COMMITTED
    result.message = f"tests passed; committed {result.commit[:12]} on {spec.branch}"
    if origin is not None and origin.pushes:
        # A fleet's replica records the green commit in the repository first, so the replica
        # adopting the task if this one is lost starts from it (IG: the record only saves
        # work; without it an adopter runs the task again).
        await ignore_and_warn(f"{spec.task_id}: record the green commit", lambda: origin.record_green(commit), None)
        await _push(spec, origin, phases, result)


async def _test(spec: TaskSpec, cell: Cell, phases: _Phases, result: TaskResult, origin: Origin | None,
                control: TaskControl) -> list[str]:
    """Bootstrapping, Executing, Testing. Returns the changed paths when the tests pass;
    raises TaskFailed (or a boot/input error) otherwise."""
    policy = cell.engine.settings.recovery

    # -- Bootstrapping: repository, worktree, port, healthy server, session --
    await phases.enter(Phase.BOOTSTRAPPING, f"fetching {origin.describe()}" if origin is not None else "")
    if origin is not None:
        await origin.fetch(cell.box_end)
    repo = await asyncio.to_thread(resolve_repository, spec.repo)
    test_command = spec.test_command or await asyncio.to_thread(detect_test_command, repo)
    result.test_command = test_command
    protected = _protected_paths(spec.protect)  # a bad pattern fails here, before any work
    adopted = await cell.adopt_worktree() if cell.reopen_session is not None else None
    if adopted is None:
        if cell.live is not None:  # no checkout to go on with: what still runs of the cell goes
            await cell.drop_live()
        cell.reopen_session = None
        if spec.start_commits:  # built on other tasks' results: their commit, or Reactor's merge of them
            cell.start_commit = await asyncio.to_thread(integrate, repo, spec.start_commits,
                                                        f"Integration of the tasks {spec.task_id} builds on")
        worktree = await cell.create_worktree()
        # A rebase round: the earlier result on the new base, conflicts marked. A lost run's
        # green commit: its change on the commit that run started from.
        laid = spec.start_from or spec.resumed_from
        if laid:
            await asyncio.to_thread(worktree.lay_files, laid)
    assert cell.worktree is not None
    result.start_commit = cell.worktree.base_commit
    await cell.start_server()
    if adopted is not None:
        result.resumed = cell.resumed or "restarted"
        if result.resumed == "reattached":  # the agent's turn goes on: follow it, say nothing
            cell.following = True
            control.catch_up(await _usage(cell))  # what it spent while no operator watched
        else:
            done = ", ".join(await _changed_files(cell)) or "none"
            cell.next_prompt = (CONTINUATION.format(files=done) if result.resumed == "reopened"
                                else f"{spec.prompt}\n\n{RESTARTED.format(files=done)}")
    elif spec.resumed_from:
        result.resumed, result.resumed_from = "restarted", spec.resumed_from
        done = ", ".join(await _changed_files(cell)) or "none"
        cell.next_prompt = f"{spec.prompt}\n\n{RESUMED_FROM.format(commit=spec.resumed_from[:12], files=done)}"

    # -- Executing: the agent edits the worktree --
    await phases.enter(Phase.EXECUTING, cell=cell)
    while True:
        try:
            await retry_transient(f"{spec.task_id}: prompt", lambda: _prompt(cell, result), policy,
                                  before_retry=lambda: _fresh_session(cell, result))
            break
        except AgentStalled as exc:
            raise TaskFailed(Reason.AGENT_STALLED, str(exc)) from exc
        except OpenCodeUnavailable as exc:
            log.warning("BOOT_RETRY: %s: server lost mid-task (%s); restarting it", spec.task_id, exc)
            try:
                await cell.restart_server()
            except ServerBootError as boot:
                raise TaskFailed(Reason.AGENT_ERROR, f"the OpenCode server died: {exc}; {boot}") from exc
            _close_attempt(result, "reverted", f"the OpenCode server was lost mid-turn ({exc}); restarted")
            await phases.update("server restarted", cell)
        except ModelError as exc:
            raise TaskFailed(Reason.AGENT_ERROR, f"the model failed: {exc}") from exc
        except OpenCodeError as exc:
            raise TaskFailed(Reason.AGENT_ERROR, f"the OpenCode server failed: {exc}") from exc

    # The agent's turn is over: nothing it started may run on (a daemon could change a file
    # once it has been tested). Only the server stays, to run the tests.
    await cell.sweep()
    files = await _changed_files(cell)
    result.files_changed = files
    if not files:
        raise TaskFailed(Reason.NO_CHANGES, "the agent changed no file; nothing to test or commit")
    touched = [path for path in files if protected.match_file(path)]
    if touched:
        raise TaskFailed(Reason.TESTS_MODIFIED, f"the agent changed protected paths: {', '.join(touched)} "
                         f"(protected: {', '.join(spec.protect)}); nothing committed", Outcome.REVERTED)

    # -- Testing: through the server, never a subprocess of ours --
    await phases.enter(Phase.TESTING, test_command, cell)
    cell.tested = await asyncio.to_thread(cell.worktree.snapshot, files)
    client = cell.client
    assert client is not None
    try:
        # A session of its own: shell runs are stored in a session and an agent would see them.
        test_session = (await client.create_session(title=f"Tests of {spec.task_id}")).id
        test = await retry_transient(
            f"{spec.task_id}: tests",
            lambda: client.run_command(test_session, test_command, timeout=spec.test_timeout),
            policy,
        )
    except OpenCodeError as exc:
        raise TaskFailed(Reason.AGENT_ERROR, f"the test command could not be run: {exc}") from exc
    result.test_exit_code = test.exit_code
    # The cell holds the task's secrets and its tests may print them: never into the result
    # (status, the PR body), as never into the transcript.
    result.test_output_tail = phases.redactor.text(test.output)[-OUTPUT_TAIL_CHARS:]
    if test.timed_out:
        raise TaskFailed(Reason.TESTS_TIMED_OUT, f"tests ran past their time limit of {spec.test_timeout:g}s and were "
                         "stopped", Outcome.REVERTED)
    if test.exit_code == EXIT_COMMAND_NOT_FOUND:
        raise TaskFailed(Reason.TEST_COMMAND_NOT_FOUND,
                         f"test command {test_command!r} was not found (exit 127)", Outcome.REVERTED)
    if test.oom_killed:
        raise TaskFailed(Reason.OUT_OF_MEMORY, "the test command was killed by the kernel's out-of-memory killer "
                         "(exit 137): it needs more memory than the operator's memory limit leaves it", Outcome.REVERTED)
    if test.exit_code != 0:
        raise TaskFailed(Reason.TESTS_FAILED, f"tests failed (exit {test.exit_code})", Outcome.REVERTED)
    return files


async def _push(spec: TaskSpec, origin: Origin, phases: _Phases, result: TaskResult) -> None:
    """Pushing: a visible step with its own failure reason. Once begun it is not cancelled
    (a push cut off half-way may or may not have landed): it ends, and its verdict stands."""
    commit = result.commit
    assert commit is not None
    await phases.enter(Phase.PUSHING, f"pushing {commit[:12]} to {spec.branch} of {origin.describe()}",
                       result=result.model_copy(deep=True))

    async def publish() -> None:
        try:
            await origin.push(spec.branch, commit, replaces=spec.replaces)
        except PushFailed as exc:
            result.outcome, result.reason = Outcome.FAILED, Reason.PUSH_FAILED
            result.message = f"committed {commit[:12]} but the push failed: {exc}"
            return
        except ResultRejected as exc:  # refs of the mirror moved behind Reactor's back
            result.outcome, result.reason = Outcome.FAILED, Reason.REFS_TAMPERED
            result.message = f"committed {commit[:12]} but refused to push it: {exc}"
            return
        result.pushed = True
        result.message = f"tests passed; pushed {commit[:12]} to {spec.branch}"

    await uncancellable(publish())


def _protected_paths(patterns: list[str]) -> pathspec.PathSpec:
    try:
        return pathspec.GitIgnoreSpec.from_lines(patterns)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"protect: {exc}") from None


async def _prompt(cell: Cell, result: TaskResult) -> None:
    assert cell.client is not None and cell.session_id is not None
    client, session_id = cell.client, cell.session_id
    result.prompt_attempts += 1
    result.attempts.append(Attempt(number=result.prompt_attempts))
    text = cell.next_prompt or cell.spec.prompt
    watch = TurnWatch(client, cell.engine.settings.stall_timeout)
    if cell.following:  # a reattached cell: its turn is running (or has ended); no message
        cell.following = False
        if await client.busy(session_id) or await client.message_count(session_id):
            await watch.run(cell.events, lambda: _turn_ends(cell, session_id))
            return
        # An empty, idle session: the operator died before its prompt was sent. Send it now
        # (the agent sees the task's prompt once, as it would have).
    await watch.run(cell.events, lambda: client.prompt(session_id, text, model=cell.spec.model))


async def _turn_ends(cell: Cell, session_id: str, recheck: float = 5.0) -> None:
    """Until the session is idle: its ``session.idle`` event, or the server's session status
    (read first, and again every ``recheck`` seconds in case the event fell into a gap of the
    stream)."""
    assert cell.client is not None
    idle = asyncio.Event()

    def on_event(event: Event) -> None:
        if isinstance(event, SessionIdle) and event.session_id == session_id:
            idle.set()

    unsubscribe = cell.events.subscribe(on_event)
    try:
        while not idle.is_set() and await cell.client.busy(session_id):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(idle.wait(), recheck)
    finally:
        unsubscribe()


async def _fresh_session(cell: Cell, result: TaskResult) -> None:
    """Before an R3 retry of the prompt: a clean worktree and a new session, so the retry
    does not build on a half-finished turn."""
    assert cell.client is not None and cell.worktree is not None
    cell.spent = _add(cell.spent, await _usage(cell))  # the failed turn's tokens were paid for too
    _close_attempt(result, "reverted", "a transient model or server error; retried from a clean checkout")
    await cell.start_over()  # the retry starts over from the task's start (and its own prompt)
    cell.session_id = (await cell.client.create_session(title=cell.spec.commit_message)).id
    cell.remember()


async def _changed_files(cell: Cell) -> list[str]:
    """What the agent changed. The worktree's git status is the truth (it is what a commit
    would contain); the server's view is not needed for the verdict."""
    assert cell.worktree is not None
    return sorted(await asyncio.to_thread(cell.worktree.changed_paths, cell.box_end))


async def _abort_turn(cell: Cell) -> None:
    """Stop the agent before its worktree is reverted (a turn cut off by the time box may
    still be running on the server)."""
    if cell.client is not None and cell.session_id is not None:
        client, session_id = cell.client, cell.session_id
        await ignore_and_warn(f"{cell.cell_id}: abort agent", lambda: asyncio.wait_for(client.abort(session_id), 5), False)


async def _revert(cell: Cell, until: float) -> None:
    """RB: throw the change away, by ``until`` (time.monotonic()). The worktree and its branch
    go at teardown anyway; the reset makes sure no half-written state can be committed or
    pushed by anything else."""
    if cell.worktree is not None and Path(cell.worktree.path).exists():
        worktree = cell.worktree
        await ignore_and_warn(f"{cell.cell_id}: revert", lambda: asyncio.to_thread(worktree.revert, until), None)


async def _wind_down(cell: Cell, phases: _Phases, result: TaskResult) -> None:
    """TearingDown: usage, then kill the server, remove the worktree (keeping the branch only
    when it holds the result), release the port. Run through uncancellable()."""
    result.usage = _add(cell.spent, await _usage(cell))
    await phases.enter(Phase.TEARING_DOWN, cell=cell)
    keep_branch = _holds_commit(result) and not result.pushed
    try:
        await cell.teardown(keep_branch=keep_branch)
    except Exception as exc:  # the verdict stands; what is left is named for the operator's log
        log.error("%s: teardown incomplete: %s", cell.cell_id, exc, exc_info=True)
        result.message += f" (teardown incomplete: {exc})"


def _close_attempt(result: TaskResult, outcome: str | None = None, note: str = "") -> None:
    """The running attempt ends: as given, or (at the verdict) as the task ended."""
    if not result.attempts or result.attempts[-1].outcome != "tried":
        return
    attempt = result.attempts[-1]
    if outcome is None:
        outcome = ("committed" if result.outcome is Outcome.COMMITTED else
                   "reverted" if result.outcome is Outcome.REVERTED or result.phase_durations.get("Reverting") is not None
                   else "failed")
        note = "tests passed" if outcome == "committed" else f"{result.reason.value}: {result.message}"
    attempt.outcome, attempt.note = outcome, note[:300]


def _holds_commit(result: TaskResult) -> bool:
    """The branch holds a tested commit: committed, or committed and the push failed (a
    committed task never loses its commit: it stays in the repository the task ran in)."""
    return result.commit is not None and (result.outcome is Outcome.COMMITTED or result.reason is Reason.PUSH_FAILED)


def _add(a: Usage, b: Usage) -> Usage:
    return Usage(**{name: getattr(a, name) + getattr(b, name) for name in Usage.model_fields})


async def _usage(cell: Cell) -> Usage:
    if cell.client is None or cell.session_id is None:
        return Usage()
    client, session_id = cell.client, cell.session_id
    return await ignore_and_warn(f"{cell.cell_id}: read usage",
                                 lambda: asyncio.wait_for(client.usage(session_id), 5), Usage())


async def uncancellable(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end in a task of its own, whatever happens to the caller: every
    cancellation that arrives meanwhile is held back (the inner task never sees one) and
    re-raised once it is done. Its own result or error is the caller's."""
    inner = asyncio.ensure_future(coro)
    cancelled = False
    while not inner.done():
        try:
            await asyncio.shield(inner)
        except asyncio.CancelledError:
            if inner.done() and inner.cancelled():
                raise  # cancelled from inside: its own business
            cancelled = True
    if cancelled:
        inner.result()  # its own error first: it is the news
        raise asyncio.CancelledError
    return inner.result()
