"""The forge parts without a forge: which forge a URL names, the PR body the operator writes
(tenant text cannot escape its code blocks), and the backoff between tries."""

from __future__ import annotations

import itertools

import pytest

from reactor.errors import ConfigurationError
from reactor.forge import Attempt, ForgeKind, PullRequestFacts, forge_repository, render_body
from reactor.kube.pullrequests import retry_delays


@pytest.mark.parametrize("url, kind, api, slug", [
    ("https://github.com/octo/app.git", ForgeKind.GITHUB, "https://api.github.com", "octo/app"),
    ("git@github.com:octo/app.git", ForgeKind.GITHUB, "https://api.github.com", "octo/app"),
    ("ssh://git@github.example.com/octo/app", None, None, None),
    ("https://codeberg.org/octo/app", ForgeKind.GITEA, "https://codeberg.org/api/v1", "octo/app"),
    ("https://user:secret@gitea.example.com/git/octo/app.git", ForgeKind.GITEA,
     "https://gitea.example.com/git/api/v1", "octo/app"),
    ("http://127.0.0.1:3000/reactor/app.git", None, None, None),
])
def test_forge_told_from_the_url(url, kind, api, slug):
    if kind is None:
        with pytest.raises(ConfigurationError, match="spec.result.forge"):
            forge_repository(url)
        return
    repository = forge_repository(url)
    assert (repository.kind, repository.api_url, repository.slug) == (kind, api, slug)


def test_forge_named_in_the_spec_wins():
    assert forge_repository("http://127.0.0.1:3000/reactor/app.git", "gitea").api_url == "http://127.0.0.1:3000/api/v1"
    assert forge_repository("https://ghe.example.com/octo/app", "github").api_url == "https://ghe.example.com/api/v3"
    with pytest.raises(ConfigurationError, match="not on a forge"):
        forge_repository("file:///srv/repos/app", "gitea")


def test_the_body_says_what_passed_and_tenant_text_stays_in_its_blocks():
    hostile_output = "```\n</details><script>alert(1)</script>\n````\n1 passed in 0.01s"
    facts = PullRequestFacts(
        task="team-a/fix-add", title="Task fix-add: Fix add", commit="c" * 40, branch="reactor/fix-add", base="main",
        prompt="Fix add()\n```\n# injected heading", description="Fix **add** <b>",
        test_command="python3 -m pytest -q", test_exit_code=0, test_output_tail=hostile_output,
        attempts=[Attempt(1, "reverted", "a transient model error"), Attempt(2, "committed", "tests passed")],
        files_changed=["calc.py"], input_tokens=1200, output_tokens=80, total_tokens=1280, cost=0.0123,
        model="anthropic/claude-sonnet-4-5", confined=True)
    body = render_body(facts)
    for expected in ("team-a/fix-add", "python3 -m pytest -q", "1 passed in 0.01s", "1. reverted", "2. committed",
                     "`calc.py`", "$0.0123", "anthropic/claude-sonnet-4-5", "c" * 40, "confined (Landlock)"):
        assert expected in body, expected
    # The output's own 4-backtick run cannot close the block: the fence is longer.
    assert "`````\n```\n</details>" in body
    assert "<b>" not in body.split("\n")[0] and "**add**" not in body


def test_backoff_doubles_to_a_cap():
    assert list(itertools.islice(retry_delays(1, 8), 6)) == [1, 2, 4, 8, 8, 8]


def test_reactor_logs_shows_the_pull_request():
    from reactor.observe.transcript import render

    line = render({"time": "2026-12-04T23:00:00Z", "kind": "pullRequest", "url": "http://forge/r/app/pulls/3",
                   "state": "merged"})
    assert line == "23:00:00 == pull request (merged): http://forge/r/app/pulls/3"


def test_the_task_secrets_are_masked_in_what_the_pr_says():
    from reactor.kube.pullrequests import _redact_facts
    from reactor.redact import Redactor

    key = "sk-live-0123456789abcdef"
    facts = PullRequestFacts(task="ns/t", title="Task t: x", commit="c" * 40, branch="reactor/t", base="main",
                             prompt="use the key", test_output_tail=f"KEY={key}\n1 passed",
                             attempts=[Attempt(1, "reverted", f"model error with {key}")])
    body = render_body(_redact_facts(facts, Redactor([key])))
    assert key not in body and "KEY=***" in body and "1 passed" in body


async def test_the_default_forge_token_goes_only_to_the_forges_the_administrator_named():
    """The forge is read from the tenant's repository URL: the operator's default token must
    not follow it to any host (the review's finding 3); a task's own tokenSecretRef may."""
    from reactor.kube.pullrequests import PullRequests, PullRequestSettings
    from reactor.kube.resource import AgentTaskSpec, TaskRef

    class Secrets:  # the namespace's Secret, as SecretReader returns it
        read_from: list[str] = []

        async def read(self, namespace, name, field_path):
            self.read_from.append(name)
            return {"token": "t0ken"}

    def spec(url: str, **result) -> AgentTaskSpec:
        return AgentTaskSpec.model_validate({"prompt": "p", "repository": {"url": url}, "test": {"command": "true"},
                                             "result": {"kind": "pullRequest", "forge": "gitea", **result}})

    secrets = Secrets()
    prs = PullRequests(secrets, PullRequestSettings(default_token_secret="forge-token",
                                                    default_token_hosts=("forge.example.com:3000",)))
    ref = TaskRef("team-a", "t", "uid", "")
    with pytest.raises(ConfigurationError, match="--forge-host"):
        await prs._open(ref, spec("https://attacker.example/o/r.git"))
    assert secrets.read_from == [], "the token was not even read"
    forge = await prs._open(ref, spec("https://forge.example.com:3000/o/r.git"))
    await forge.aclose()
    own = await prs._open(ref, spec("https://elsewhere.example/o/r.git", tokenSecretRef={"name": "mine"}))
    await own.aclose()
    assert secrets.read_from == ["forge-token", "mine"]
