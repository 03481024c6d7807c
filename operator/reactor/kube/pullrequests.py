"""The operator's pull requests (spec.result.kind pullRequest): Kubernetes glue around
reactor.forge. Written through the task's TaskStatus (status.pullRequest and the condition
PullRequestOpened), never by the workflow, never with anything a cell can reach.

- After a run that pushed (the supervisor's one hook), and for a finished task found at
  start-up whose PR is not recorded at its commit, one publisher per task runs in the
  background: it never holds a cell slot and never changes the task's verdict.
- A forge that cannot be reached (or answers 5xx/429) is retried with exponential backoff
  (1 s doubling to 60 s) for as long as the operator runs, the condition saying
  ForgeUnavailable; a refusal (bad token, no such repository) is written as ForgeRefused
  and not retried until the next start.
- Exactly one PR per task: reactor.forge.publish looks it up before creating and treats
  "already exists" as success, so a publisher cut off at any step (operator killed, replica
  lost) is safely run again from the top.
- Open PRs are looked at every ``check_interval`` (one GET each) until merged or closed.
- The token is read from the task's Secret (spec.result.tokenSecretRef, else the operator's
  --forge-token-secret) at the moment it is needed, held only by the forge's HTTP client in
  this process, and appears in no status, Event, log line or cell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any

from reactor.errors import ConfigurationError
from reactor.forge import (
    Action,
    Attempt,
    Forge,
    ForgeRefused,
    ForgeUnavailable,
    PRState,
    PullRequestFacts,
    forge_repository,
    open_forge,
    publish_pull_request,
)
from reactor.kube.resource import AgentTaskSpec, TaskRef
from reactor.kube.secrets import SecretReader
from reactor.kube.status import TaskStatus
from reactor.redact import Redactor

log = logging.getLogger(__name__)

RETRY_FIRST, RETRY_MAX = 1.0, 60.0
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


def facts_from(ref: TaskRef, spec: AgentTaskSpec, status: dict[str, Any]) -> PullRequestFacts:
    """The PR body's facts from the task as recorded (so a restarted operator writes the same)."""
    result = status.get("result") or {}
    usage = status.get("usage") or {}
    task = spec.to_task_spec(ref, Path("."))
    total = sum(int(usage.get(k) or 0) for k in ("inputTokens", "outputTokens", "reasoningTokens",
                                                   "cacheReadTokens", "cacheWriteTokens"))
    confined = result.get("confined")
    return PullRequestFacts(
        task=str(ref), title=task.commit_message, commit=result.get("commit") or "", branch=result.get("branch") or task.branch,
        base=spec.repository.branch, prompt=spec.prompt, description=spec.description,
        test_command=result.get("testCommand") or spec.test.command, test_exit_code=result.get("testExitCode"),
        test_output_tail=result.get("testOutputTail") or "",
        attempts=[Attempt(int(a.get("number") or i + 1), a.get("outcome") or "", a.get("note") or "")
                  for i, a in enumerate(result.get("attempts") or [])],
        files_changed=list(result.get("filesChanged") or []), input_tokens=int(usage.get("inputTokens") or 0),
        output_tokens=int(usage.get("outputTokens") or 0), total_tokens=total, cost=float(usage.get("cost") or 0.0),
        model=result.get("model") or spec.agent.model or "", confined=confined,
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


def wants_pull_request(spec: AgentTaskSpec, status: dict[str, Any]) -> bool:
    result = status.get("result") or {}
    return (spec.result.pull_request and status.get("phase") == "Succeeded" and bool(result.get("pushed"))
            and bool(result.get("commit")))


async def _write(ref: TaskRef, status: TaskStatus, *args: Any) -> None:
    """A PR status write that fails (the API server unreachable; in a fleet, the claim given up
    after the run) is logged: the PR on the forge stands, and the next start records it."""
    try:
        await status.write_pull_request(*args)
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


class PullRequests:
    def __init__(self, secrets: SecretReader, settings: PullRequestSettings | None = None, observatory: Any = None):
        self.secrets = secrets
        self.settings = settings or PullRequestSettings()
        self.observatory = observatory  # the fleet page and transcripts show the PR
        self._publishers: dict[str, asyncio.Task] = {}  # uid -> its publisher (one per task)
        self._followed: dict[str, tuple[TaskRef, TaskStatus, Forge, int, str]] = {}  # open PRs
        self._checker: asyncio.Task | None = None
        self.calls: dict[str, int] = {}  # forge API calls per task uid (figures)

    # -- what the supervisor calls --

    def after_run(self, ref: TaskRef, spec: AgentTaskSpec, status: TaskStatus, final_status: dict[str, Any]) -> None:
        """A run ended: open (or update) the task's PR when it wants one and pushed."""
        if wants_pull_request(spec, final_status):
            self._start(ref, spec, status, final_status)

    def resume(self, ref: TaskRef, spec: AgentTaskSpec, status: TaskStatus, current: dict[str, Any]) -> None:
        """A finished task found at start-up: publish when its PR is not recorded at its
        commit (the operator died between the push and the PR), else follow it while open."""
        if not wants_pull_request(spec, current):
            return
        recorded = current.get("pullRequest") or {}
        commit = (current.get("result") or {}).get("commit")
        if recorded.get("headCommit") != commit or not recorded.get("number"):
            self._start(ref, spec, status, current)
        elif recorded.get("state") == PRState.OPEN.value:
            self._start(ref, spec, status, current, follow_only=int(recorded["number"]))

    def forget(self, uid: str) -> None:
        """The task is being deleted: no more forge calls for it."""
        publisher = self._publishers.pop(uid, None)
        if publisher is not None:
            publisher.cancel()
        followed = self._followed.pop(uid, None)
        if followed is not None:
            asyncio.ensure_future(followed[2].aclose())

    async def stop(self) -> None:
        tasks = [*self._publishers.values(), *([self._checker] if self._checker else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for _, _, forge, _, _ in self._followed.values():
            with contextlib.suppress(Exception):
                await forge.aclose()
        self._followed.clear()

    # -- publishing --

    def _start(self, ref: TaskRef, spec: AgentTaskSpec, status: TaskStatus, current: dict[str, Any],
               follow_only: int | None = None) -> None:
        running = self._publishers.get(ref.uid)
        if running is not None and not running.done():
            running.cancel()  # a newer commit: its publisher starts from the top
        task = asyncio.create_task(self._publish(ref, spec, status, current, follow_only), name=f"pull request {ref}")
        self._publishers[ref.uid] = task
        task.add_done_callback(lambda t: self._publishers.pop(ref.uid, None) if self._publishers.get(ref.uid) is t else None)

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

    async def _publish(self, ref: TaskRef, spec: AgentTaskSpec, status: TaskStatus, current: dict[str, Any],
                       follow_only: int | None) -> None:
        facts = facts_from(ref, spec, current)
        delays = retry_delays(self.settings.retry_first, self.settings.retry_max)
        while True:
            forge: Forge | None = None
            try:
                forge = await self._open(ref, spec)
                if follow_only is None:  # the body may be public: no secret of the task's in it
                    facts = await self._redacted(ref, spec, facts)
                if follow_only is not None:
                    self._follow(ref, status, forge, follow_only, facts.commit)
                    forge = None
                    return
                published = await publish_pull_request(forge, facts, spec.result.draft, on_step=_crash_hook)
            except ForgeUnavailable as exc:
                await _close(forge)
                self._outcome(ref, "ForgeUnavailable")
                message = f"the forge cannot be reached; retrying: {exc}"
                log.warning("%s: %s", ref, message)
                await _write(ref, status, None, False, "ForgeUnavailable", message)
                await asyncio.sleep(next(delays))
                continue
            except (ForgeRefused, ConfigurationError) as exc:
                await _close(forge)
                self._outcome(ref, "ForgeRefused")
                message = (f"the forge refused the pull request: {exc}" if isinstance(exc, ForgeRefused)
                           else f"cannot open the pull request: {exc}")
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
            await _write(ref, status, self._record(pr, facts.commit), True, reason, message)
            self._outcome(ref, reason)
            log.info("%s: %s", ref, message)
            self._show(ref, pr.url, pr.state.value)
            if pr.state is PRState.OPEN:
                self._follow(ref, status, forge, pr.number, facts.commit)
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
    def _record(pr, commit: str) -> dict[str, Any]:
        return {"url": pr.url, "number": pr.number, "headCommit": commit, "state": pr.state.value}

    def _show(self, ref: TaskRef, url: str, state: str) -> None:
        if self.observatory is not None:
            with contextlib.suppress(Exception):  # IG: the page and the transcript are news, not state
                self.observatory.pull_request(ref.namespace, ref.name, url, state)

    # -- following open PRs --

    def _follow(self, ref: TaskRef, status: TaskStatus, forge: Forge, number: int, commit: str) -> None:
        old = self._followed.pop(ref.uid, None)
        if old is not None and old[2] is not forge:
            asyncio.ensure_future(old[2].aclose())
        self._followed[ref.uid] = (ref, status, forge, number, commit)
        if self._checker is None or self._checker.done():
            self._checker = asyncio.create_task(self._check_loop(), name="pull request checks")

    async def _check_loop(self) -> None:
        while self._followed:
            await asyncio.sleep(self.settings.check_interval)
            for uid, (ref, status, forge, number, commit) in list(self._followed.items()):
                try:
                    pr = await forge.get_pull_request(number)
                except (ForgeUnavailable, ForgeRefused) as exc:
                    log.info("%s: cannot check pull request #%d: %s", ref, number, exc)
                    continue
                finally:
                    self._count(ref, forge, 1)
                if pr.state is PRState.OPEN:
                    continue
                self._followed.pop(uid, None)
                await forge.aclose()
                message = f"pull request #{pr.number} {pr.state.value} on the forge: {pr.url}"
                reason = next((c.get("reason") for c in status.conditions if c.get("type") == "PullRequestOpened"),
                              None) or Action.CREATED.value  # still how it was opened
                await _write(ref, status, self._record(pr, commit), True, reason, message)
                await status.writer.event(ref, "PullRequestMerged" if pr.state is PRState.MERGED else "PullRequestClosed",
                                          message)
                log.info("%s: %s", ref, message)
                self._show(ref, pr.url, pr.state.value)
