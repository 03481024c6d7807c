"""The operator's PR publisher (kube/pullrequests.py) as rules, on an in-memory forge adapter
(the adapters themselves are tested on a real Gitea and on GitHub's recorded answers): a 404
just after the push is retried, not a refusal; nothing is changed on the forge once the task's
claim is gone; stacked PRs target the parent's branch until it integrates, then are retargeted.
No API server, no waiting beyond the (shortened) backoff."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from reactor.forge import AlreadyExists, ForgeKind, ForgeRefused, PRState, PullRequest
from reactor.kube.dependencies import TaskView
from reactor.kube.pullrequests import (
    NOT_FOUND_TRIES,
    PullRequests,
    PullRequestSettings,
    pull_request_base,
    pull_request_work,
)
from reactor.kube.resource import AgentTaskSpec, AgentTaskStatus, TaskRef

REF = TaskRef("team", "child", "uid-child", "2026-01-01T00:00:00Z")
COMMIT = "c" * 40
FAST = PullRequestSettings(retry_first=0.001, retry_max=0.001, check_interval=0.01)


def spec(**fields: Any) -> AgentTaskSpec:
    return AgentTaskSpec.model_validate({
        "prompt": "p", "repository": {"url": "https://gitea.example.com/team/app.git", "branch": "main"},
        "test": {"command": "true"}, "result": {"kind": "pullRequest", "forge": "gitea"}, **fields})


FINAL_FIELDS = {"phase": "Succeeded", "result": {"pushed": True, "commit": COMMIT, "branch": "reactor/child"}}
FINAL = AgentTaskStatus.read(FINAL_FIELDS)


def parent(name: str = "a", integrated: bool = False, branch: str | None = None) -> TaskView:
    return TaskView(name=name, uid=f"uid-{name}", phase="Succeeded", reason="Committed", commit="p" * 40,
                    url="https://gitea.example.com/team/app.git", depends_on=(), branch=branch or f"reactor/{name}",
                    integrated=integrated)


class MemoryForge:
    """The adapter interface over a dict of pull requests; ``failures`` are raised by the
    next creates, one each."""

    kind = ForgeKind.GITEA

    def __init__(self, failures: list[Exception] | None = None):
        self.pulls: dict[int, PullRequest] = {}
        self.failures = list(failures or [])
        self.creates = 0
        self.calls = 0

    async def find_pull_request(self, head: str, base: str) -> PullRequest | None:
        self.calls += 1
        return next((p for p in self.pulls.values() if p.head_branch == head and p.base_branch == base), None)

    async def create_pull_request(self, head: str, base: str, title: str, body: str, draft: bool) -> PullRequest:
        self.calls += 1
        self.creates += 1
        if self.failures:
            raise self.failures.pop(0)
        if any(p.head_branch == head and p.base_branch == base for p in self.pulls.values()):
            raise AlreadyExists("exists", 409)
        number = len(self.pulls) + 1
        self.pulls[number] = PullRequest(number, f"https://forge/pulls/{number}", head, COMMIT, base, PRState.OPEN,
                                         title, body)
        return self.pulls[number]

    async def update_pull_request(self, number: int, title: str | None = None, body: str | None = None,
                                  base: str | None = None) -> PullRequest:
        self.calls += 1
        changes = {k: v for k, v in (("title", title), ("body", body), ("base_branch", base)) if v is not None}
        self.pulls[number] = dataclasses.replace(self.pulls[number], **changes)
        return self.pulls[number]

    async def get_pull_request(self, number: int) -> PullRequest:
        self.calls += 1
        return self.pulls[number]

    async def set_commit_status(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1

    async def aclose(self) -> None:
        pass


class Status:
    """What the publisher writes through the task's TaskStatus, recorded."""

    def __init__(self) -> None:
        self.conditions: list[dict] = []
        self.writes: list[tuple[dict | None, bool, str, str]] = []
        self.events: list[str] = []
        self.writer = self

    async def write_pull_request(self, record: dict | None, opened: bool, reason: str, message: str) -> None:
        self.writes.append((record, opened, reason, message))
        self.conditions = [{"type": "PullRequestOpened", "reason": reason}]

    async def event(self, ref: TaskRef, reason: str, message: str, warning: bool = False) -> None:
        self.events.append(reason)


class NoSecrets:
    async def for_task(self, ref: TaskRef, spec: AgentTaskSpec) -> dict:
        return {}


def publisher(forge: MemoryForge, **kwargs: Any) -> PullRequests:
    prs = PullRequests(NoSecrets(), FAST, **kwargs)

    async def open_forge(ref: TaskRef, spec: AgentTaskSpec) -> MemoryForge:
        return forge

    prs._open = open_forge  # type: ignore[method-assign]
    return prs


async def until(predicate, timeout: float = 5.0) -> None:
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(wait(), timeout)


def not_found() -> ForgeRefused:
    return ForgeRefused("POST /repos/team/app/pulls: 404 The target couldn't be found.", 404)


async def test_a_404_just_after_the_push_is_retried_not_a_refusal():
    forge = MemoryForge([not_found(), not_found()])
    prs = publisher(forge)
    status = Status()
    await prs._publish(REF, spec(), status, FINAL, None)
    await prs.stop()
    assert forge.creates == 3 and len(forge.pulls) == 1
    assert [(opened, reason) for _, opened, reason, _ in status.writes] == [(True, "Created")], \
        "no ForgeRefused, and no outage said for a moment's 404"


async def test_a_404_that_lasts_is_a_refusal_after_a_bounded_number_of_tries_and_other_refusals_at_once():
    forge = MemoryForge([not_found() for _ in range(NOT_FOUND_TRIES + 5)])
    status = Status()
    await publisher(forge)._publish(REF, spec(), status, FINAL, None)
    assert forge.creates == NOT_FOUND_TRIES + 1 and not forge.pulls
    assert [(opened, reason) for _, opened, reason, _ in status.writes] == [(False, "ForgeRefused")]

    forge = MemoryForge([ForgeRefused("POST /repos/team/app/pulls: 403 token lacks scope", 403)])
    status = Status()
    await publisher(forge)._publish(REF, spec(), status, FINAL, None)
    assert forge.creates == 1 and [reason for _, _, reason, _ in status.writes] == ["ForgeRefused"]


async def test_nothing_is_changed_on_the_forge_once_the_claim_is_gone_and_the_claim_goes_when_the_work_ends():
    released: list[str] = []

    async def lost(ref: TaskRef) -> bool:
        return False  # another replica took the task over

    forge = MemoryForge()
    prs = publisher(forge, confirm=lost, release=lambda ref: released.append(ref.uid))
    prs._start(REF, spec(), Status(), FINAL)
    await until(lambda: not prs.busy(REF.uid))
    assert forge.creates == 0 and not forge.pulls and released == [REF.uid]

    # Ours: the claim is kept while the open PR is followed, and goes once it is merged.
    released.clear()
    forge = MemoryForge()
    prs = publisher(forge, release=lambda ref: released.append(ref.uid))
    prs._start(REF, spec(), Status(), FINAL)
    await until(lambda: forge.pulls)
    await until(lambda: REF.uid in prs._followed)
    assert prs.busy(REF.uid) and released == []
    forge.pulls[1] = dataclasses.replace(forge.pulls[1], state=PRState.MERGED)
    await until(lambda: released == [REF.uid])
    assert not prs.busy(REF.uid)
    await prs.stop()


@pytest.mark.parametrize(("depends_on", "tasks", "expected"), [
    ((), {}, ("main", "")),
    (("a",), {"a": parent("a")}, ("reactor/a", "a")),  # stacked on its parent's result branch
    (("a",), {"a": parent("a", integrated=True)}, ("main", "")),  # the parent integrated: the base
    (("a",), {}, ("main", "")),  # the parent is gone: nothing to review against
    (("a", "b"), {"a": parent("a"), "b": parent("b")}, ("main", "")),  # two pending: no one branch
    (("a", "b"), {"a": parent("a", integrated=True), "b": parent("b")}, ("reactor/b", "b")),
    (("a",), {"a": dataclasses.replace(parent("a"), branch=None)}, ("main", "")),  # its result never pushed
])
def test_the_base_of_a_stacked_pull_request(depends_on, tasks, expected):
    assert pull_request_base("main", depends_on, tasks) == expected


def test_a_parent_integrates_when_its_pr_is_merged_or_its_merge_queue_integrated_it():
    def view(**status: Any) -> TaskView:
        return TaskView.from_body({"metadata": {"name": "a", "uid": "u"}, "spec": {},
                                   "status": {"phase": "Succeeded",
                                              "result": {"branch": "reactor/a", "pushed": True}, **status}})

    assert view().branch == "reactor/a" and not view().integrated
    assert not view(pullRequest={"state": "open"}).integrated
    assert view(pullRequest={"state": "merged"}).integrated
    assert view(integration={"state": "Integrated"}).integrated
    assert not view(integration={"state": "Queued"}).integrated


async def test_a_stacked_pr_targets_its_parents_branch_then_is_retargeted_once_the_parent_integrates():
    tasks = {"a": parent("a")}
    forge = MemoryForge()
    prs = publisher(forge, parents=lambda ref: tasks)
    status = Status()
    child = spec(dependsOn=["a"])
    await prs._publish(REF, child, status, FINAL, None)
    (pr,) = forge.pulls.values()
    assert pr.base_branch == "reactor/a" and "Stacked on the result of task `a`" in pr.body
    assert status.writes[-1][0]["base"] == "reactor/a"

    tasks["a"] = parent("a", integrated=True)  # its PR was merged
    await until(lambda: forge.pulls[1].base_branch == "main")
    await until(lambda: status.events == ["PullRequestRetargeted"])
    assert status.writes[-1][0]["base"] == "main" and status.writes[-1][2] == "Created"
    # A later publish (an operator restarted) finds it under its new base: still one PR.
    await prs._publish(REF, child, status, FINAL, None)
    await prs.stop()
    assert len(forge.pulls) == 1 and forge.creates == 1


def test_which_finished_tasks_still_have_pull_request_work():
    recorded = {"number": 3, "headCommit": COMMIT, "state": "open"}
    assert pull_request_work(spec(), FINAL)
    assert pull_request_work(spec(), AgentTaskStatus.read({**FINAL_FIELDS, "pullRequest": recorded})), "followed while open"
    assert not pull_request_work(spec(), AgentTaskStatus.read({**FINAL_FIELDS, "pullRequest": {**recorded, "state": "merged"}}))
    assert pull_request_work(spec(), AgentTaskStatus.read({**FINAL_FIELDS, "pullRequest": {**recorded, "headCommit": "d" * 40}}))
    assert not pull_request_work(spec(result={"kind": "branch"}), FINAL)
    assert not pull_request_work(spec(), AgentTaskStatus.read({**FINAL_FIELDS, "phase": "Failed"}))
