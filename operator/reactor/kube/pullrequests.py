"""The operator's pull requests (spec.result.kind pullRequest): Kubernetes glue around
reactor.forge. Written through the task's TaskStatus (status.pullRequest and the condition
PullRequestOpened), never by the workflow, never with anything a cell can reach.

- After a run that pushed (once its verdict is written), and for a finished task found at
  start-up whose PR is not recorded at its commit, one publisher per task runs in the
  background: it never holds a cell slot and never changes the task's verdict.
- One publisher per task in the whole fleet: the forge does not serialise creates, so the
  task's claim decides. The replica that ran the task keeps its claim while it opens and
  follows the PR (the supervisor gives the claim up only when ``busy`` says so, and
  ``release`` is called here when the work ends); a finished task whose replica was lost is
  claimed again before its PR work is taken up (kube/ownership.py ``claim_finished``), and
  the claim is re-read (``confirm``) right before each change on the forge.
- A forge that cannot be reached (or answers 5xx/429) is retried with exponential backoff
  (1 s doubling to 60 s) for as long as the operator runs, the condition saying
  ForgeUnavailable. A 404 is retried the same way ``NOT_FOUND_TRIES`` times before it counts
  as a refusal: a forge answers 404 for a moment about a repository or branch whose push has
  just returned (Gitea under load). A refusal (bad token, no such repository) is written as
  ForgeRefused and not retried until the next start.
- Exactly one PR per task: reactor.forge.publish looks it up before creating and treats
  "already exists" as success, so a publisher cut off at any step (operator killed, replica
  lost) is safely run again from the top.
- Stacked PRs (spec.dependsOn): while the task's one parent has not integrated (its PR
  merged, or its merge queue integrated its result), the PR targets the parent's result
  branch; then it is retargeted to the task's base (``pull_request_base``).
- Open PRs are looked at every ``check_interval`` (one GET each) until merged or closed;
  a stacked one is retargeted then when its parent has integrated.
- The token is read from the task's Secret (spec.result.tokenSecretRef, else the operator's
  --forge-token-secret) at the moment it is needed, held only by the forge's HTTP client in
  this process, and appears in no status, Event, log line or cell.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any

from reactor.errors import ConfigurationError
from reactor.forge import (
    Action,
    Attempt,
    Forge,
    ForgeError,
    ForgeRefused,
    ForgeUnavailable,
    PRState,
    PullRequest,
    PullRequestFacts,
    forge_repository,
    open_forge,
    publish_pull_request,
)
from reactor.kube.dependencies import TaskView
from reactor.kube.resource import AgentTaskSpec, AgentTaskStatus, ResultStatus, TaskRef, UsageStatus
from reactor.kube.secrets import SecretReader
from reactor.kube.status import ClaimLost, TaskStatus
from reactor.redact import Redactor, shorten
from reactor.workflow.types import Phase

log = logging.getLogger(__name__)

RETRY_FIRST, RETRY_MAX = 1.0, 60.0
# A 404 is retried (with the same backoff: 1+2+4+8+16 s) this often before it is a refusal:
# the forge may not show a just-pushed repository or branch yet.
NOT_FOUND_TRIES = 5
CRASH_HOOK = "REACTOR_TEST_CRASH_AT"  # tests: "pr:<step>" SIGKILLs the operator at that step


@dataclass
class PullRequestSettings:
    default_token_secret: str | None = None  # a Secret of this name in the task's namespace
    # The forges (host[:port] of their API) the default token may be sent to. The forge is
    # read from the tenant's repository URL: without this list a tenant could name any host
    # and receive the namespace's token in a header.
    default_token_hosts: tuple[str, ...] = ()
    check_interval: float = 60.0  # how often open PRs are looked at (merged? closed?)
    retry_first: float = RETRY_FIRST
    retry_max: float = RETRY_MAX


def retry_delays(first: float = RETRY_FIRST, most: float = RETRY_MAX):
    """The waits between tries of an unreachable forge: doubling, capped."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, most)


def transient(exc: ForgeError, not_found_before: int) -> bool:
    """Whether a failed try is worth another after the backoff: the forge unreachable (or
    5xx/429), or a 404 the first ``NOT_FOUND_TRIES`` times (``not_found_before``: 404s so far)."""
    if isinstance(exc, ForgeUnavailable):
        return True
    return isinstance(exc, ForgeRefused) and exc.status == 404 and not_found_before < NOT_FOUND_TRIES


def pull_request_base(base: str, depends_on: tuple[str, ...] | list[str],
                      tasks: Mapping[str, TaskView]) -> tuple[str, str]:
    """Stacked PRs: the branch a task's PR targets now, and the parent it is stacked on ("":
    none). ``base``: spec.repository.branch; ``tasks``: its namespace's tasks as last seen.

    Exactly one parent not yet integrated (its PR merged, or its merge queue integrated its
    result), whose result branch was pushed: that branch, so the PR shows the task's own
    change. Otherwise the base: no parents, all integrated, or several still pending (no one
    branch to stack on). A parent no longer there is nothing to review against."""
    pending = [tasks[name] for name in depends_on if name in tasks and not tasks[name].integrated]
    if len(pending) == 1 and pending[0].branch:
        return pending[0].branch, pending[0].name
    return base, ""


def facts_from(ref: TaskRef, spec: AgentTaskSpec, status: AgentTaskStatus) -> PullRequestFacts:
    """The PR body's facts from the task as recorded (so a restarted operator writes the same)."""
    result = status.result or ResultStatus()
    usage = status.usage or UsageStatus()
    task = spec.to_task_spec(ref, Path("."))
    return PullRequestFacts(
        task=str(ref), title=task.commit_message, commit=result.commit or "", branch=result.branch or task.branch,
        base=spec.repository.branch, prompt=spec.prompt, description=spec.description,
        test_command=result.test_command or spec.test.command, test_exit_code=result.test_exit_code,
        test_output_tail=result.test_output_tail or "",
        attempts=[Attempt(a.number or i + 1, a.outcome, a.note) for i, a in enumerate(result.attempts or [])],
        files_changed=list(result.files_changed), input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens, total_tokens=usage.total_tokens, cost=usage.cost,
        model=result.model or spec.agent.model or "", confined=result.confined,
    )


def _redact_facts(facts: PullRequestFacts, redactor: Redactor) -> PullRequestFacts:
    text = redactor.text
    return PullRequestFacts(**{
        **facts.__dict__,
        "prompt": text(facts.prompt), "description": text(facts.description), "title": text(facts.title),
        "test_command": text(facts.test_command), "test_output_tail": text(facts.test_output_tail),
        "files_changed": [text(path) for path in facts.files_changed],
        "attempts": [Attempt(a.number, a.outcome, text(a.note)) for a in facts.attempts],
    })


def wants_pull_request(spec: AgentTaskSpec, status: AgentTaskStatus) -> bool:
    result = status.result
    return (spec.result.pull_request and status.phase is Phase.SUCCEEDED and result is not None
            and bool(result.pushed) and bool(result.commit))


def pull_request_work(spec: AgentTaskSpec, status: AgentTaskStatus) -> bool:
    """A finished task still has PR work: its PR is not recorded at its commit (the operator
    or replica died between the push and the PR), or it is open (followed until merged or
    closed)."""
    if not wants_pull_request(spec, status):
        return False
    recorded = status.pull_request
    return recorded is None or recorded.head_commit != status.commit or not recorded.number or recorded.state == "open"


async def _write(ref: TaskRef, status: TaskStatus, *args: Any) -> None:
    """A PR status write that fails (the API server unreachable) is logged: the PR on the
    forge stands, and the next start records it. ClaimLost (a fleet: another replica holds
    the task now) stops the caller."""
    try:
        await status.write_pull_request(*args)
    except ClaimLost:
        raise
    except Exception as exc:  # noqa: BLE001 - IG
        log.error("%s: cannot record the pull request in status: %s: %s", ref, type(exc).__name__, exc)


async def _close(forge: Forge | None) -> None:
    if forge is not None:
        with contextlib.suppress(Exception):
            await forge.aclose()


def _crash_hook(step: str) -> None:
    """Tests only: die at a named step of the PR path, as a SIGKILLed operator would."""
    if os.environ.get(CRASH_HOOK) == f"pr:{step}":
        log.warning("%s=%s: killing this operator now", CRASH_HOOK, os.environ[CRASH_HOOK])
        os.kill(os.getpid(), signal.SIGKILL)


Confirm = Callable[[TaskRef], Awaitable[bool]]
Parents = Callable[[TaskRef], Mapping[str, TaskView]]


async def _always(ref: TaskRef) -> bool:
    return True


@dataclass
class Followed:
    """An open PR, looked at every check_interval until merged or closed."""

    ref: TaskRef
    spec: AgentTaskSpec
    status: TaskStatus
    forge: Forge
    number: int
    commit: str


class PullRequests:
    """``confirm(ref)``: the task is still ours (a fleet's claim, re-read) before each change
    on the forge; ``release(ref)``: this replica is done with the task's PR (a fleet: the
    claim it kept for it); ``parents(ref)``: the tasks of its namespace as last seen (stacked PRs)."""

    def __init__(self, secrets: SecretReader, settings: PullRequestSettings | None = None, observatory: Any = None,
                 *, confirm: Confirm = _always, release: Callable[[TaskRef], None] = lambda ref: None,
                 parents: Parents = lambda ref: {}):
        self.secrets = secrets
        self.settings = settings or PullRequestSettings()
        self.observatory = observatory  # the fleet page and transcripts show the PR
        self.confirm, self.release, self.parents = confirm, release, parents
        self._publishers: dict[str, asyncio.Task] = {}  # uid -> its publisher (one per task)
        self._followed: dict[str, Followed] = {}  # uid -> its open PR
        self._checker: asyncio.Task | None = None
        self.calls: dict[str, int] = {}  # forge API calls per task uid (figures)

    # -- what the supervisor calls --

    def after_run(self, ref: TaskRef, spec: AgentTaskSpec, status: TaskStatus, final_status: AgentTaskStatus) -> None:
        """A run ended: open (or update) the task's PR when it wants one and pushed."""
        if wants_pull_request(spec, final_status):
            self._start(ref, spec, status, final_status)

    def resume(self, ref: TaskRef, spec: AgentTaskSpec, status: TaskStatus, current: AgentTaskStatus) -> None:
        """A finished task found at start-up (or, in a fleet, claimed for its PR): publish when
        its PR is not recorded at its commit (the operator died between the push and the PR),
        else follow it while open."""
        if not pull_request_work(spec, current):
            self._done(ref)
            return
        recorded = current.pull_request
        if recorded is None or recorded.head_commit != current.commit or not recorded.number:
            self._start(ref, spec, status, current)
        else:
            self._start(ref, spec, status, current, follow_only=recorded.number)

    def busy(self, uid: str) -> bool:
        """This replica is opening or following the task's PR (a fleet keeps its claim meanwhile)."""
        publisher = self._publishers.get(uid)
        return (publisher is not None and not publisher.done()) or uid in self._followed

    def forget(self, ref: TaskRef) -> None:
        """The task is being deleted, or is not ours any more: no more forge calls for it."""
        publisher = self._publishers.pop(ref.uid, None)
        if publisher is not None:
            publisher.cancel()
        followed = self._followed.pop(ref.uid, None)
        if followed is not None:
            asyncio.ensure_future(followed.forge.aclose())
        if publisher is not None or followed is not None:
            self.release(ref)

    async def stop(self) -> None:
        """Every publisher and follower stops (the operator stops, or a fleet replica was
        fenced: its claims are void). Usable again afterwards."""
        tasks = [*self._publishers.values(), *([self._checker] if self._checker else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        followed, self._followed = list(self._followed.values()), {}
        for entry in followed:
            with contextlib.suppress(Exception):
                await entry.forge.aclose()

    # -- publishing --

    def _start(self, ref: TaskRef, spec: AgentTaskSpec, status: TaskStatus, current: AgentTaskStatus,
               follow_only: int | None = None) -> None:
        running = self._publishers.get(ref.uid)
        if running is not None and not running.done():
            running.cancel()  # a newer commit: its publisher starts from the top
        task = asyncio.create_task(self._publish(ref, spec, status, current, follow_only), name=f"pull request {ref}")
        self._publishers[ref.uid] = task

        def ended(t: asyncio.Task) -> None:
            if self._publishers.get(ref.uid) is t:
                self._publishers.pop(ref.uid, None)
                self._done(ref)

        task.add_done_callback(ended)

    def _done(self, ref: TaskRef) -> None:
        """Nothing more to do here for the task's PR: its claim may go (a fleet)."""
        if not self.busy(ref.uid):
            self.release(ref)

    async def forge_for(self, ref: TaskRef, spec: AgentTaskSpec) -> Forge:
        """The task's forge with its token, for the merge queue's merge of its pull request."""
        return await self._open(ref, spec)

    async def _open(self, ref: TaskRef, spec: AgentTaskSpec) -> Forge:
        """The task's forge with its token (ConfigurationError when the Secret is missing)."""
        repository = forge_repository(spec.repository.url, spec.result.forge)
        secret_ref = spec.result.token_secret_ref
        default = self.settings.default_token_secret
        # The default token named as the task's own is still the default: the host rule holds.
        if secret_ref is not None and secret_ref.name != default:
            name, key, field_path = secret_ref.name, secret_ref.key, "spec.result.tokenSecretRef"
        elif default:
            host = urlsplit(repository.api_url).netloc.lower()
            if host not in {h.lower() for h in self.settings.default_token_hosts}:
                raise ConfigurationError(
                    f"the operator's default forge token (--forge-token-secret) is sent only to the forges named "
                    f"by --forge-host, and {host} is not one: set spec.result.tokenSecretRef")
            name, key, field_path = default, secret_ref.key if secret_ref else "token", "--forge-token-secret"
        else:
            raise ConfigurationError("no forge token: set spec.result.tokenSecretRef, or start the operator "
                                     "with --forge-token-secret")
        data = await self.secrets.read(ref.namespace, name, field_path)
        token = data.get(key)
        if not token:
            raise ConfigurationError(f"{field_path}: secret {name!r} has no key {key!r}")
        return open_forge(repository, token.strip())

    async def _redacted(self, ref: TaskRef, spec: AgentTaskSpec, facts: PullRequestFacts) -> PullRequestFacts:
        """The facts with every value of the task's Secrets masked (a test that prints the
        cell's API key would otherwise publish it)."""
        try:
            values = (await self.secrets.for_task(ref, spec)).values()
        except ConfigurationError:  # a Secret gone since the run: mask what we can
            values = []
        redactor = Redactor(values)
        if not redactor:
            return facts
        return _redact_facts(facts, redactor)

    def _guard(self, ref: TaskRef) -> Callable[[], Awaitable[None]]:
        async def still_ours() -> None:
            if not await self.confirm(ref):
                raise ClaimLost(f"{ref}: another replica holds the task now; its pull request is left to it")
        return still_ours

    def _stacked(self, ref: TaskRef, spec: AgentTaskSpec, facts: PullRequestFacts) -> tuple[PullRequestFacts, tuple[str, ...]]:
        """The facts with the base the PR must have now (stacked PRs), and the other bases it
        may have been opened with (to look it up under)."""
        base = spec.repository.branch
        if not spec.depends_on:
            return facts, ()
        tasks = self.parents(ref)
        target, parent = pull_request_base(base, spec.depends_on, tasks)
        others = tuple(dict.fromkeys([*(tasks[n].branch for n in spec.depends_on if n in tasks and tasks[n].branch),
                                      base]))
        return (dataclasses.replace(facts, base=target, stacked_on=parent, retarget_to=base if parent else ""),
                tuple(b for b in others if b != target))

    async def _publish(self, ref: TaskRef, spec: AgentTaskSpec, status: TaskStatus, current: AgentTaskStatus,
                       follow_only: int | None) -> None:
        try:
            await self._publish_until_done(ref, spec, status, current, follow_only)
        except ClaimLost as exc:  # (then nothing is followed for it: the done callback gives the rest up)
            log.warning("%s: %s", ref, exc)

    async def _publish_until_done(self, ref: TaskRef, spec: AgentTaskSpec, status: TaskStatus,
                                  current: AgentTaskStatus, follow_only: int | None) -> None:
        facts = facts_from(ref, spec, current)
        delays = retry_delays(self.settings.retry_first, self.settings.retry_max)
        not_found = 0  # 404s so far (see NOT_FOUND_TRIES)
        redacted = False
        while True:
            forge: Forge | None = None
            try:
                forge = await self._open(ref, spec)
                if follow_only is not None:
                    self._follow(ref, spec, status, forge, follow_only, facts.commit)
                    forge = None
                    return
                if not redacted:  # the body may be public: no secret of the task's in it
                    facts, redacted = await self._redacted(ref, spec, facts), True
                wanted, other_bases = self._stacked(ref, spec, facts)
                published = await publish_pull_request(forge, wanted, spec.result.draft, on_step=_crash_hook,
                                                       other_bases=other_bases, guard=self._guard(ref))
            except (ForgeUnavailable, ForgeRefused, ConfigurationError) as exc:
                await _close(forge)
                if isinstance(exc, ForgeError) and transient(exc, not_found):
                    if isinstance(exc, ForgeUnavailable):
                        self._outcome(ref, "ForgeUnavailable")
                        message = f"the forge cannot be reached; retrying: {exc}"
                        log.warning("%s: %s", ref, message)
                        await _write(ref, status, None, False, "ForgeUnavailable", message)
                    else:  # a 404 just after the push: said in the log only, not as an outage
                        not_found += 1
                        log.info("%s: the forge answered 404 (try %d of %d); retrying: %s", ref, not_found,
                                 NOT_FOUND_TRIES, exc)
                    await asyncio.sleep(next(delays))
                    continue
                self._outcome(ref, "ForgeRefused")
                message = (f"the forge refused the pull request: {exc}" if isinstance(exc, ForgeRefused)
                           else f"cannot open the pull request: {exc}")
                log.error("%s: %s", ref, message)
                await _write(ref, status, None, False, "ForgeRefused", message)
                return
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # The forge is a host the tenant names: an answer that is not JSON, or not a
                # pull request, once ended the publisher silently (no condition, no PR).
                await _close(forge)
                self._outcome(ref, "ForgeRefused")
                message = ("cannot open the pull request: the forge's answer is not one of a forge's API "
                           f"({type(exc).__name__}: {shorten(str(exc), 200)})")
                log.error("%s: %s", ref, message)
                await _write(ref, status, None, False, "ForgeRefused", message)
                return
            finally:
                if forge is not None:
                    self._count(ref, forge, forge.calls)
            pr = published.pull_request
            reason = Action.UPDATED.value if published.action is Action.UPDATED else Action.CREATED.value
            message = (f"pull request #{pr.number} {pr.state.value}: {pr.url}" if published.action is Action.UNCHANGED
                       else f"{'updated' if reason == 'Updated' else 'opened'} pull request #{pr.number}: {pr.url}")
            if wanted.stacked_on and pr.state is PRState.OPEN:
                message += f" (stacked on {wanted.stacked_on}'s result branch {pr.base_branch})"
            await _write(ref, status, self._record(pr, facts.commit), True, reason, message)
            self._outcome(ref, reason)
            log.info("%s: %s", ref, message)
            self._show(ref, pr.url, pr.state.value)
            if pr.state is PRState.OPEN:
                self._follow(ref, spec, status, forge, pr.number, facts.commit)
            else:
                await forge.aclose()
            return

    def _count(self, ref: TaskRef, forge: Forge, calls: int) -> None:
        self.calls[ref.uid] = self.calls.get(ref.uid, 0) + calls
        if self.observatory is not None and calls:
            self.observatory.metrics.forge_requests.labels(ref.namespace, forge.kind.value).inc(calls)

    def _outcome(self, ref: TaskRef, reason: str) -> None:
        if self.observatory is not None:
            self.observatory.metrics.pull_requests.labels(ref.namespace, reason).inc()

    @staticmethod
    def _record(pr: PullRequest, commit: str) -> dict[str, Any]:
        return {"url": pr.url, "number": pr.number, "headCommit": commit, "state": pr.state.value,
                "base": pr.base_branch or None}

    def _show(self, ref: TaskRef, url: str, state: str) -> None:
        if self.observatory is not None:
            with contextlib.suppress(Exception):  # IG: the page and the transcript are news, not state
                self.observatory.pull_request(ref.namespace, ref.name, url, state)

    # -- following open PRs --

    def _follow(self, ref: TaskRef, spec: AgentTaskSpec, status: TaskStatus, forge: Forge, number: int,
                commit: str) -> None:
        old = self._followed.pop(ref.uid, None)
        if old is not None and old.forge is not forge:
            asyncio.ensure_future(old.forge.aclose())
        self._followed[ref.uid] = Followed(ref, spec, status, forge, number, commit)
        if self._checker is None or self._checker.done():
            self._checker = asyncio.create_task(self._check_loop(), name="pull request checks")

    async def _check_loop(self) -> None:
        while self._followed:
            await asyncio.sleep(self.settings.check_interval)
            for entry in list(self._followed.values()):
                try:
                    await self._check(entry)
                except (ForgeUnavailable, ForgeRefused) as exc:
                    log.info("%s: cannot check pull request #%d: %s", entry.ref, entry.number, exc)
                except ClaimLost as exc:
                    log.warning("%s: %s", entry.ref, exc)
                    self.forget(entry.ref)
                except Exception:  # noqa: BLE001 - one PR's bug must not end the looks at the others
                    log.exception("%s: checking pull request #%d", entry.ref, entry.number)

    async def _check(self, entry: Followed) -> None:
        """One look at an open PR: merged or closed on the forge (recorded, then no longer
        followed), or a stacked one whose parent integrated (retargeted to its base)."""
        ref, status, forge = entry.ref, entry.status, entry.forge
        calls = forge.calls
        try:
            pr = await forge.get_pull_request(entry.number)
            if pr.state is PRState.OPEN:
                await self._retarget(entry, pr)
                return
        finally:
            self._count(ref, forge, forge.calls - calls)
        if self._followed.get(ref.uid) is entry:
            del self._followed[ref.uid]
        await forge.aclose()
        message = f"pull request #{pr.number} {pr.state.value} on the forge: {pr.url}"
        await _write(ref, status, self._record(pr, entry.commit), True, self._reason(status), message)
        await status.writer.event(ref, "PullRequestMerged" if pr.state is PRState.MERGED else "PullRequestClosed",
                                  message)
        log.info("%s: %s", ref, message)
        self._show(ref, pr.url, pr.state.value)
        self._done(ref)

    async def _retarget(self, entry: Followed, pr: PullRequest) -> None:
        """A stacked PR whose base is not what ``pull_request_base`` says now (its parent
        integrated): change its base on the forge. A parent no longer seen (deleted, or not
        seen yet by a replica that just started) changes nothing here."""
        tasks = self.parents(entry.ref)
        if not entry.spec.depends_on or not pr.base_branch or any(n not in tasks for n in entry.spec.depends_on):
            return
        target, parent = pull_request_base(entry.spec.repository.branch, entry.spec.depends_on, tasks)
        if target == pr.base_branch:
            return
        await self._guard(entry.ref)()
        pr = await entry.forge.update_pull_request(pr.number, base=target)
        message = (f"pull request #{pr.number} retargeted to {pr.base_branch or target}"
                   + (f" (stacked on {parent}'s result)" if parent else ": its parent's result integrated"))
        await _write(entry.ref, entry.status, self._record(pr, entry.commit), True, self._reason(entry.status),
                     message)
        await entry.status.writer.event(entry.ref, "PullRequestRetargeted", message)
        log.info("%s: %s", entry.ref, message)

    @staticmethod
    def _reason(status: TaskStatus) -> str:
        """PullRequestOpened's reason as it stands (still how the PR was opened)."""
        return next((c.get("reason") for c in status.conditions if c.get("type") == "PullRequestOpened"),
                    None) or Action.CREATED.value
