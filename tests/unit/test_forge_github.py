"""The GitHub adapter on answers recorded from GitHub's documented shapes (REST API version
2022-11-28; no GitHub is reachable here). Each case checks the request the adapter sends
(method, path, query, body, headers) and how it reads the answer."""

from __future__ import annotations

import json

import httpx
import pytest

from reactor.forge import AlreadyExists, ForgeRefused, ForgeUnavailable, HeadOutOfDate, NotMergeable, PRState
from reactor.forge.github import GitHubForge
from reactor.forge.publish import Action, publish_pull_request
from reactor.forge.body import PullRequestFacts, render_body

TOKEN = "ghp_recordedtoken0123456789"
HEAD_SHA = "6dcb09b5b57875f334f61aebed695e2e4193db5e"

# A pull request as GitHub returns it (trimmed to the fields the adapter reads, plus a few).
PULL = {
    "url": "https://api.github.com/repos/octo/app/pulls/1347", "id": 1, "number": 1347, "state": "open",
    "locked": False, "title": "Task fix-add: Fix add", "body": "old body", "draft": False,
    "html_url": "https://github.com/octo/app/pull/1347", "merged_at": None,
    "head": {"label": "octo:reactor/fix-add", "ref": "reactor/fix-add", "sha": HEAD_SHA},
    "base": {"label": "octo:main", "ref": "main", "sha": "0" * 40},
}
ALREADY_EXISTS = {
    "message": "Validation Failed",
    "errors": [{"resource": "PullRequest", "code": "custom",
                "message": "A pull request already exists for octo:reactor/fix-add."}],
    "documentation_url": "https://docs.github.com/rest/pulls/pulls#create-a-pull-request", "status": "422",
}


class Recorded:
    """Plays recorded answers in order and keeps the requests made."""

    def __init__(self, *answers: tuple[int, object]):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, body = self.answers.pop(0)
        if isinstance(body, Exception):
            raise body
        return httpx.Response(status, json=body)

    def forge(self) -> GitHubForge:
        client = httpx.AsyncClient(transport=httpx.MockTransport(self))
        return GitHubForge("https://api.github.com", "octo", "app", TOKEN, client)


def body_of(request: httpx.Request) -> dict:
    return json.loads(request.content)


async def test_find_asks_for_any_state_by_owner_qualified_head_and_base():
    rec = Recorded((200, [PULL]))
    pr = await rec.forge().find_pull_request("reactor/fix-add", "main")
    request = rec.requests[0]
    assert request.method == "GET" and request.url.path == "/repos/octo/app/pulls"
    assert dict(request.url.params) == {"head": "octo:reactor/fix-add", "base": "main", "state": "all", "per_page": "1"}
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["accept"] == "application/vnd.github+json"
    assert request.headers["x-github-api-version"] == "2022-11-28"
    assert (pr.number, pr.url, pr.head_commit, pr.state) == (1347, PULL["html_url"], HEAD_SHA, PRState.OPEN)


async def test_find_none_and_merged_and_closed():
    merged = {**PULL, "state": "closed", "merged_at": "2026-12-01T10:00:00Z"}
    closed = {**PULL, "state": "closed"}
    rec = Recorded((200, []), (200, [merged]), (200, [closed]))
    forge = rec.forge()
    assert await forge.find_pull_request("reactor/fix-add", "main") is None
    assert (await forge.find_pull_request("reactor/fix-add", "main")).state is PRState.MERGED
    assert (await forge.find_pull_request("reactor/fix-add", "main")).state is PRState.CLOSED


async def test_create_sends_draft_and_reads_the_created_pull_request():
    rec = Recorded((201, {**PULL, "draft": True}))
    pr = await rec.forge().create_pull_request("reactor/fix-add", "main", "Task fix-add: Fix add", "the body", True)
    assert rec.requests[0].method == "POST" and rec.requests[0].url.path == "/repos/octo/app/pulls"
    assert body_of(rec.requests[0]) == {"title": "Task fix-add: Fix add", "head": "reactor/fix-add", "base": "main",
                                        "body": "the body", "draft": True}
    assert pr.draft and pr.number == 1347


async def test_a_duplicate_is_already_exists_and_other_422s_are_refusals():
    no_commits = {"message": "Validation Failed",
                  "errors": [{"resource": "PullRequest", "code": "custom", "message": "No commits between main and x"}]}
    rec = Recorded((422, ALREADY_EXISTS), (422, no_commits))
    forge = rec.forge()
    with pytest.raises(AlreadyExists):
        await forge.create_pull_request("reactor/fix-add", "main", "t", "b", False)
    with pytest.raises(ForgeRefused) as refused:
        await forge.create_pull_request("x", "main", "t", "b", False)
    assert not isinstance(refused.value, AlreadyExists) and "No commits between" in str(refused.value)


async def test_update_status_and_errors_say_retry_or_not():
    rec = Recorded((200, {**PULL, "body": "new"}), (201, {"state": "success", "context": "reactor/tcr"}),
                   (502, {"message": "Server Error"}), (429, {"message": "secondary rate limit"}),
                   (401, {"message": "Bad credentials"}), (0, httpx.ConnectError("refused")))
    forge = rec.forge()
    assert (await forge.update_pull_request(1347, body="new")).body == "new"
    assert rec.requests[0].method == "PATCH" and body_of(rec.requests[0]) == {"body": "new"}
    await forge.set_commit_status(HEAD_SHA, "success", "tests passed: make test")
    assert rec.requests[1].url.path == f"/repos/octo/app/statuses/{HEAD_SHA}"
    assert body_of(rec.requests[1]) == {"state": "success", "description": "tests passed: make test",
                                        "context": "reactor/tcr"}
    for _ in range(2):
        with pytest.raises(ForgeUnavailable):
            await forge.get_pull_request(1347)
    with pytest.raises(ForgeRefused) as refused:
        await forge.get_pull_request(1347)
    assert "Bad credentials" in str(refused.value) and TOKEN not in str(refused.value)
    with pytest.raises(ForgeUnavailable):
        await forge.get_pull_request(1347)
    assert forge.calls == 6


async def test_retargeting_sends_the_new_base():
    rec = Recorded((200, {**PULL, "base": {**PULL["base"], "ref": "main"}}))
    pr = await rec.forge().update_pull_request(1347, base="main")
    assert rec.requests[0].method == "PATCH" and body_of(rec.requests[0]) == {"base": "main"}
    assert pr.base_branch == "main"


async def test_merge_is_guarded_by_head_commit():
    rec = Recorded((200, {"sha": "abc", "merged": True, "message": "Pull Request successfully merged"}),
                   (409, {"message": "Head branch was modified. Review and try the merge again."}),
                   (405, {"message": "Pull Request is not mergeable"}))
    forge = rec.forge()
    await forge.merge_pull_request(1347, HEAD_SHA, "squash")
    assert rec.requests[0].method == "PUT" and rec.requests[0].url.path == "/repos/octo/app/pulls/1347/merge"
    assert body_of(rec.requests[0]) == {"sha": HEAD_SHA, "merge_method": "squash"}
    with pytest.raises(HeadOutOfDate):
        await forge.merge_pull_request(1347, "f" * 40)
    with pytest.raises(NotMergeable):
        await forge.merge_pull_request(1347, HEAD_SHA)


async def test_publish_after_a_lost_create_answer_updates_the_one_pull_request():
    """The create landed but its answer was lost: the next try's create gets 422 "already
    exists", looks it up again and does not make another."""
    facts = PullRequestFacts(task="ns/fix-add", title="Task fix-add: Fix add", commit=HEAD_SHA, branch="reactor/fix-add",
                             base="main", prompt="fix it", test_command="make test", test_output_tail="1 passed")
    landed = {**PULL, "title": facts.title, "body": render_body(facts)}
    rec = Recorded((200, []), (422, ALREADY_EXISTS), (200, [landed]), (201, {}))
    published = await publish_pull_request(rec.forge(), facts)
    assert [r.method for r in rec.requests] == ["GET", "POST", "GET", "POST"]  # no second create, no edit
    assert published.pull_request.number == 1347 and published.action is Action.CREATED
    assert "1 passed" in body_of(rec.requests[1])["body"]
    assert rec.requests[3].url.path == f"/repos/octo/app/statuses/{HEAD_SHA}"


async def test_a_new_commit_updates_the_same_pull_request():
    facts = PullRequestFacts(task="ns/fix-add", title="Task fix-add: Fix add", commit="b" * 40, branch="reactor/fix-add",
                             base="main", prompt="fix it", test_command="make test", test_output_tail="2 passed")
    rec = Recorded((200, [PULL]), (200, {**PULL, "body": "x"}), (201, {}))
    published = await publish_pull_request(rec.forge(), facts)
    assert [r.method for r in rec.requests] == ["GET", "PATCH", "POST"]
    assert published.action is Action.UPDATED and published.pull_request.head_commit == "b" * 40
    assert "2 passed" in body_of(rec.requests[1])["body"]
