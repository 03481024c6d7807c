"""Ways in found by the second adversarial review (the merge queue, pull requests,
dependencies and resume), each turned into a test at the cheapest level that proves it."""

from __future__ import annotations

import socket
import time

import pytest

from reactor.errors import ConfigurationError
from reactor.kube.resource import AgentTaskSpec, TaskRef

FORGE_TOKEN = "forge-token"  # the operator's --forge-token-secret, a Secret in each tenant namespace


class _Secrets:
    """The namespace's Secrets, as SecretReader.read returns them; remembers what was read."""

    def __init__(self) -> None:
        self.read_from: list[str] = []

    async def read(self, namespace: str, name: str, field_path: str) -> dict[str, str]:
        self.read_from.append(name)
        return {"token": "the-operators-t0ken", "password": "pw"}


def _task(url: str, **spec) -> AgentTaskSpec:
    return AgentTaskSpec.model_validate({"prompt": "p", "repository": {"url": url}, "test": {"command": "true"},
                                         **spec})


async def test_a_task_cannot_send_the_default_forge_token_to_its_own_host_by_naming_its_secret():
    """--forge-host keeps the operator's default token from the hosts a tenant names in its
    repository URL; a tenant naming that Secret as its *own* tokenSecretRef got it sent to
    any host (https://attacker.example received it in a header)."""
    from reactor.kube.pullrequests import PullRequests, PullRequestSettings

    secrets = _Secrets()
    prs = PullRequests(secrets, PullRequestSettings(default_token_secret=FORGE_TOKEN,
                                                    default_token_hosts=("forge.example.com:3000",)))
    ref = TaskRef("team-a", "t", "uid", "")
    named = _task("https://attacker.example/o/r.git", result={"kind": "pullRequest", "forge": "gitea",
                                                               "tokenSecretRef": {"name": FORGE_TOKEN}})
    with pytest.raises(ConfigurationError, match="--forge-host"):
        await prs._open(ref, named)
    assert secrets.read_from == [], "the token was not even read"
    # Named for a forge the administrator allows, it is the default token, as without the field.
    allowed = _task("https://forge.example.com:3000/o/r.git", result={"kind": "pullRequest", "forge": "gitea",
                                                                       "tokenSecretRef": {"name": FORGE_TOKEN}})
    forge = await prs._open(ref, allowed)
    await forge.aclose()
    assert secrets.read_from == [FORGE_TOKEN]


@pytest.mark.parametrize("field", ["envFrom", "credentialsSecretRef"])
async def test_a_task_cannot_have_the_default_forge_token_put_into_its_cell_or_its_git(field):
    """The forge token never reaches a cell: a task naming the operator's token Secret in
    spec.agent.envFrom had it in its cell's environment (the agent could print it or send it
    anywhere), bypassing --forge-host. Refused, naming the field, before anything is read."""
    from reactor.kube.secrets import SecretReader

    read_from: list[str] = []

    class Reader(SecretReader):
        async def read(self, namespace, name, field_path):
            read_from.append(name)
            return {"token": "the-operators-t0ken"}

    reader = Reader(None, operator_secrets=(FORGE_TOKEN,))
    if field == "envFrom":
        spec = _task("https://forge.example.com/o/r.git", agent={"envFrom": [{"secretRef": {"name": FORGE_TOKEN}}]})
    else:
        spec = _task("https://forge.example.com/o/r.git", repository={
            "url": "https://forge.example.com/o/r.git", "credentialsSecretRef": {"name": FORGE_TOKEN}})
    with pytest.raises(ConfigurationError, match=f"{field}.*--forge-token-secret"):
        await reader.for_task(TaskRef("team-a", "t", "uid", ""), spec)
    assert read_from == []


def test_the_operators_three_way_merges_read_no_global_git_config(tmp_path, monkeypatch):
    """Every git the operator runs reads no global or system config (issue 15). The merge of a
    task's parents (``integrate``, spec.dependsOn) ran `git merge-tree` with the operator's
    whole environment: a merge driver in ~/.gitconfig (core.attributesFile naming it for
    every file) ran unconfined on the tenants' file contents, and decided the merged tree.
    The merge queue's replay is the same kind of merge: checked here too."""
    from reactor.infra.git import git
    from reactor.infra.worktrees import integrate
    from reactor.mergequeue.candidates import replay
    from reactor_dev.testing.hostile import hostile_git_config
    from reactor_dev.testing.repos import make_repo

    path = "calc.py"
    lines = [f"line {i}\n" for i in range(12)]
    repo = make_repo(tmp_path / "repo", {path: "".join(lines)})
    base = git(repo, "rev-parse", "HEAD")

    def result(name: str, line: int) -> str:  # one task's result: a commit on base changing one line
        git(repo, "checkout", "--quiet", "-b", name, base)
        (repo / path).write_text("".join(f"{name}'s line {i}\n" if i == line else text for i, text in enumerate(lines)))
        git(repo, "commit", "--quiet", "-am", name)
        return git(repo, "rev-parse", "HEAD")

    first, second = result("first", 1), result("second", 10)
    git(repo, "checkout", "--quiet", "main")

    ran = tmp_path / "ran"
    home = hostile_git_config(tmp_path / "home", ran)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / ".gitconfig"))

    merged = integrate(repo, [first, second], "the parents")
    replayed = replay(repo, "entry", second, base, first)
    assert not ran.exists(), "no merge driver of the global config ran"
    want = "".join("first's line 1\n" if i == 1 else "second's line 10\n" if i == 10 else text
                   for i, text in enumerate(lines))
    assert git(repo, "show", f"{merged}:{path}", strip=False) == want, "git's own merge decided the tree"
    assert git(repo, "show", f"{replayed.commit}:{path}", strip=False) == want


@pytest.fixture
def tarpit():
    """A git remote that never answers: it accepts connections (the kernel's backlog) and
    says nothing, as a tenant's server can."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"http://127.0.0.1:{server.getsockname()[1]}/app.git"


def test_the_merge_queues_fetch_and_push_have_a_deadline(tmp_path, tarpit, monkeypatch):
    """The queue's git to the tenant's remote (the mirror's fetch, the base's fetch and the
    push of the base's advance) ran with no deadline: a remote that never answers held the
    driver forever, and with it a thread of the operator's default executor (every
    ``asyncio.to_thread`` of the operator shares it, a few per CPU): enough MergeQueues of
    one tenant naming such a remote starve every tenant's tasks. A task's push had none either,
    and holds the task's capacity slot meanwhile. Each now ends (GitTimeout)."""
    from reactor.infra import mirrors as mirrors_module
    from reactor.infra.git import GitError, git
    from reactor.infra.mirrors import RepositoryMirrors, RepositoryPolicy
    from reactor.mergequeue import base as base_module
    from reactor.mergequeue.base import PushedBranch
    from reactor_dev.testing.repos import make_repo

    monkeypatch.setattr(mirrors_module, "FETCH_DEADLINE", 2.0)
    monkeypatch.setattr(base_module, "GIT_DEADLINE", 2.0)
    mirrors = RepositoryMirrors(tmp_path / "work" / "mirrors", RepositoryPolicy(tmp_path / "work"))
    started = time.monotonic()
    with pytest.raises(GitError):
        mirrors.sync("team-a", tarpit)  # as the queue's driver calls it: no deadline of its own
    assert time.monotonic() - started < 30

    mirror = tmp_path / "mirror.git"
    git(tmp_path, "clone", "--quiet", "--bare", str(make_repo(tmp_path / "repo")), str(mirror))
    git(mirror, "config", "remote.origin.url", tarpit)
    tip = git(mirror, "rev-parse", "main")
    branch = PushedBranch(mirror, "origin", "main")
    # and a task's push of its result (it holds the task's capacity slot meanwhile)
    for step in (branch.tip, lambda: branch.advance(tip, tip), lambda: mirrors.push(mirror, "main", tarpit)):
        started = time.monotonic()
        with pytest.raises(GitError):  # GitTimeout, or the mirror's GitError saying so
            step()
        assert time.monotonic() - started < 30


@pytest.mark.opencode
async def test_a_secret_the_tests_print_is_masked_in_the_result(repo, engine):
    """Secrets never reach status: the tail of the test output (status.result.testOutputTail,
    and from there the PR body) carried a task Secret's value verbatim when the tests printed
    it (a failing test dumping its environment does). The transcript, the page and the PR
    body masked it; the result itself did not."""
    from reactor.workflow.tcr import run_task
    from reactor.workflow.types import Outcome, TaskSpec
    from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, text

    secret = "sk-team-0123456789abcdef"
    with ScriptedModel([Scenario("T-SECRET", [edit("calc.py", "return a - b", "return a + b"), text("Fixed.")])]) as model:
        result = await run_task(TaskSpec(
            task_id="T-SECRET", description="Fix add", prompt="T-SECRET: fix add() in calc.py", repo=repo,
            test_command='echo "debug: TEAM_TOKEN=$TEAM_TOKEN"; python3 -m pytest -q',
            opencode_config=model.opencode_config(), timeout=120, env={"TEAM_TOKEN": secret}), engine)
    assert result.outcome is Outcome.COMMITTED, result.message
    assert "TEAM_TOKEN=***" in result.test_output_tail and "1 passed" in result.test_output_tail
    assert secret not in result.model_dump_json()


class _EndlessForge:
    """A tenant's own forge (a task's tokenSecretRef may name any host) that answers every
    request with 200 and a body that does not end: JSON whitespace, as fast as it is read.
    Counts what it managed to send."""

    LIMIT = 256 << 20  # what it would send in all (a real one sends for ever)

    def __init__(self) -> None:
        import threading

        self.sent = 0
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            connection, _ = self.server.accept()
        except OSError:
            return
        with connection:
            connection.recv(65536)  # the request (headers and a small body)
            chunk = b" " * (1 << 20)
            try:
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n[")
                while self.sent < self.LIMIT:
                    connection.sendall(chunk)
                    self.sent += len(chunk)
            except OSError:
                return  # the client hung up: what a bounded reader does

    def close(self) -> None:
        self.server.close()
        self.thread.join(timeout=30)


async def test_a_forge_answer_without_end_is_refused_not_read_into_the_operators_memory():
    """The PR publisher read a forge's whole answer into memory (httpx reads a body to its
    end; its read timeout is per chunk). A task's forge is any host its tenant names: one that
    answers without end grew the operator until the kernel killed it (and every tenant's cells
    with it), and the publisher that resumes at start-up read it again. An answer is now read
    up to a bound and refused past it."""
    from reactor.forge import ForgeError
    from reactor.forge.gitea import GiteaForge

    forge_server = _EndlessForge()
    forge = GiteaForge(forge_server.url + "/api/v1", "o", "r", "tenant-token")
    try:
        with pytest.raises(ForgeError, match="larger than"):
            await forge.find_pull_request("reactor/t", "main")
    finally:
        await forge.aclose()
        forge_server.close()
    assert forge_server.sent < 32 << 20, f"the operator read {forge_server.sent >> 20} MiB of the answer"


async def test_a_secret_a_model_provider_quotes_is_masked_in_every_message(repo, engine):
    """A provider's refusal quotes the key it was given ("Incorrect API key provided: sk-…"),
    and OpenCode hands that text on: the task's messages (its phases' Events, status, the
    log) are masked like its test output."""
    from reactor.workflow.tcr import run_task
    from reactor.workflow.types import Outcome, TaskSpec
    from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, fail

    secret = "sk-team-0123456789abcdef"
    phases = []

    async def on_phase(event):
        phases.append(event)

    with ScriptedModel([Scenario("T-KEY", [fail(401, message=f"Incorrect API key provided: {secret}")])]) as model:
        result = await run_task(TaskSpec(
            task_id="T-KEY", prompt="T-KEY: fix add() in calc.py", repo=repo, test_command="python3 -m pytest -q",
            opencode_config=model.opencode_config(), timeout=120, env={"OPENAI_API_KEY": secret}), engine, on_phase)
    assert result.outcome is Outcome.FAILED
    assert "Incorrect API key provided: ***" in result.message, result.message
    assert secret not in result.model_dump_json()
    assert all(secret not in event.model_dump_json() for event in phases)
