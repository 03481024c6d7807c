"""The pull-request rules against a real Gitea, without an operator: exactly one PR per task
however often the publish runs again (each try as a fresh operator would make it), the same
PR updated when the task commits again, "already exists" as success, a merge guarded by head
commit, and the errors that say whether to retry.

Measured here: Gitea 1.26 does not serialise concurrent creates (three publishes started at
the same instant made three PRs), so the forge's 409 guards only against a create that
follows another; one publisher per task at a time is the operator's to guarantee (see
docs/forge.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import pytest

from reactor.forge import (
    STATUS_CONTEXT,
    Action,
    AlreadyExists,
    ForgeRefused,
    ForgeUnavailable,
    HeadOutOfDate,
    NotMergeable,
    PRState,
    PullRequestFacts,
    forge_repository,
    open_forge,
    publish_pull_request,
)
from reactor_dev.testing.helpers import free_port
from reactor_dev.testing.repos import git, make_repo

BRANCH = "reactor/fix-add"


@pytest.fixture
def forge_repo(gitea, tmp_path):
    """A repository on the forge with main and a pushed result branch; yields (name, local clone, head)."""
    name = f"app-{uuid.uuid4().hex[:8]}"
    local = make_repo(tmp_path / name)
    gitea.create_repository(name, local)
    git(local, "checkout", "--quiet", "-b", BRANCH)
    (local / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    git(local, "commit", "--quiet", "-am", "Task fix-add: Fix add")
    gitea.push(local, name, BRANCH)
    return name, local, git(local, "rev-parse", "HEAD")


def facts(commit: str, output: str = "1 passed in 0.01s") -> PullRequestFacts:
    return PullRequestFacts(task="team-a/fix-add", title="Task fix-add: Fix add", commit=commit, branch=BRANCH,
                            base="main", prompt="Fix add() in calc.py", test_command="python3 -m pytest -q",
                            test_output_tail=output, files_changed=["calc.py"])


def forge_for(gitea, name: str, token: str | None = None):
    return open_forge(forge_repository(gitea.repo_url(name), "gitea"), token or gitea.token)


async def test_one_pull_request_however_often_it_is_published(gitea, forge_repo):
    name, _, head = forge_repo
    forges = [forge_for(gitea, name) for _ in range(3)]
    try:
        # Each try with a client of its own, as operators restarted one after another make them.
        results = [await publish_pull_request(f, facts(head)) for f in forges]
        again = await publish_pull_request(forges[0], facts(head))
        with pytest.raises(AlreadyExists):  # Gitea's own answer to a duplicate: 409
            await forges[1].create_pull_request(BRANCH, "main", "dup", "dup", False)
    finally:
        for f in forges:
            await f.aclose()
    pulls = gitea.pull_requests(name)
    assert len(pulls) == 1, [p["number"] for p in pulls]
    assert {r.pull_request.number for r in [*results, again]} == {pulls[0]["number"]}
    assert again.action is Action.CREATED and again.pull_request.url == pulls[0]["html_url"]
    assert "1 passed in 0.01s" in pulls[0]["body"] and pulls[0]["title"] == "Task fix-add: Fix add"
    statuses = gitea.statuses(name, head)
    assert {(s["context"], s["status"]) for s in statuses} == {(STATUS_CONTEXT, "success")}


async def test_a_new_commit_updates_the_same_pull_request_and_draft_is_a_wip_title(gitea, forge_repo):
    name, local, first = forge_repo
    forge = forge_for(gitea, name)
    try:
        opened = await publish_pull_request(forge, facts(first), draft=True)
        assert opened.pull_request.title.startswith("WIP: ") and opened.pull_request.draft
        (local / "calc.py").write_text("def add(a, b):\n    return b + a\n")
        git(local, "commit", "--quiet", "-am", "Task fix-add: again")
        gitea.push(local, name, BRANCH)
        second = git(local, "rev-parse", "HEAD")
        updated = await publish_pull_request(forge, facts(second, "2 passed in 0.02s"), draft=True)

        async def head_moved():
            return (await forge.get_pull_request(opened.pull_request.number)).head_commit == second

        await until_async(head_moved)
    finally:
        await forge.aclose()
    pulls = gitea.pull_requests(name)
    assert len(pulls) == 1 and updated.pull_request.number == opened.pull_request.number
    assert updated.action is Action.UPDATED
    assert "2 passed in 0.02s" in pulls[0]["body"] and second in pulls[0]["body"] and first not in pulls[0]["body"]
    assert [s["status"] for s in gitea.statuses(name, second) if s["context"] == STATUS_CONTEXT] == ["success"]


async def test_merge_is_guarded_by_head_commit_and_a_merged_pr_is_left_alone(gitea, forge_repo):
    name, _, head = forge_repo
    response = gitea.api("POST", f"/repos/reactor/{name}/branch_protections",
                         json={"rule_name": "main", "enable_status_check": True,
                               "status_check_contexts": [STATUS_CONTEXT]})
    assert response.status_code == 201, response.text
    forge = forge_for(gitea, name)
    try:
        pr = (await forge.create_pull_request(BRANCH, "main", "Task fix-add: Fix add", "b", False))
        with pytest.raises(NotMergeable):  # the required reactor/tcr status is missing
            await forge.merge_pull_request(pr.number, head)
        published = await publish_pull_request(forge, facts(head))  # sets it
        with pytest.raises(HeadOutOfDate):
            await forge.merge_pull_request(pr.number, "0" * 40)

        async def merged() -> bool:
            try:
                await forge.merge_pull_request(pr.number, head)
                return True
            except NotMergeable:  # "try again later": Gitea re-checks mergeability in the background
                return False

        await until_async(merged)
        after = await publish_pull_request(forge, facts(head))
    finally:
        await forge.aclose()
    assert published.pull_request.number == pr.number
    assert after.action is Action.UNCHANGED and after.pull_request.state is PRState.MERGED
    assert len(gitea.pull_requests(name)) == 1


async def test_a_stacked_pull_request_is_found_under_its_parents_branch_and_retargeted(gitea, forge_repo):
    """A task stacked on fix-add: its PR targets fix-add's branch; published again once the
    parent integrated (``base`` main, the parent's branch among the other bases), the same
    PR is found and retargeted (Gitea: PATCH pulls/{n} with "base")."""
    name, local, _ = forge_repo
    git(local, "checkout", "--quiet", "-b", "reactor/child")
    (local / "NOTES.md").write_text("add() adds\n")
    git(local, "add", "NOTES.md")
    git(local, "commit", "--quiet", "-m", "Task child: notes")
    gitea.push(local, name, "reactor/child")
    child = dataclasses.replace(facts(git(local, "rev-parse", "HEAD")), branch="reactor/child", base=BRANCH,
                                title="Task child: notes", stacked_on="fix-add", retarget_to="main")
    forge = forge_for(gitea, name)
    try:
        stacked = await publish_pull_request(forge, child, other_bases=("main",))
        retargeted = await publish_pull_request(forge, dataclasses.replace(child, base="main", stacked_on=""),
                                                other_bases=(BRANCH,))
    finally:
        await forge.aclose()
    assert stacked.pull_request.base_branch == BRANCH and retargeted.pull_request.number == stacked.pull_request.number
    pulls = [p for p in gitea.pull_requests(name) if p["head"]["ref"] == "reactor/child"]
    assert [p["base"]["ref"] for p in pulls] == ["main"]


async def test_errors_say_whether_to_try_again(gitea, forge_repo):
    name, _, head = forge_repo
    down = open_forge(forge_repository(f"http://127.0.0.1:{free_port()}/reactor/{name}.git", "gitea"), gitea.token)
    wrong = forge_for(gitea, name, token="0" * 40)
    try:
        with pytest.raises(ForgeUnavailable):
            await publish_pull_request(down, facts(head))
        with pytest.raises(ForgeRefused) as refused:
            await publish_pull_request(wrong, facts(head))
        assert refused.value.status == 401 and gitea.token not in str(refused.value)
    finally:
        await down.aclose()
        await wrong.aclose()
    assert gitea.pull_requests(name) == []


async def until_async(predicate, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError("not reached in time")
        await asyncio.sleep(0.2)

