"""Fault matrix, rows a user meets with `kubectl apply` alone: the model failing, the tests
misbehaving, bad input, an agent weakening the tests or asking for permission. All of them
run at once under one operator; each test checks one row (docs/faults.md)."""

from __future__ import annotations

import json

import pytest

from reactor.infra.mirrors import mirror_path
from reactor_dev.testing.scripted_model import Scenario, bash, edit, fail, text
from reactor_dev.testing.matrix import Matrix, Row
from reactor_dev.testing.tasks import condition
from reactor_dev.testing.workers import port_range

# The module's rows run in its fixture, which the first test pays for.
pytestmark = [pytest.mark.opencode, pytest.mark.kube, pytest.mark.timeout(1200)]

FIX = edit("calc.py", "return a - b", "return a + b")
WRONG_FIX = edit("calc.py", "return a - b", "return a * b")
MEGABYTES = 20
FORGE_TOKEN = "forge-t0ken-of-the-operator"


@pytest.fixture(scope="module")
def outcomes(matrix: Matrix) -> dict[str, Row]:
    # The operator's default forge token, a Secret in the tenant's namespace (as deployed).
    out = matrix.cluster.kubectl("create", "secret", "generic", "forge-token", "-n", matrix.namespace,
                                 f"--from-literal=token={FORGE_TOKEN}")
    assert out.returncode == 0, out.stderr
    matrix.start_operator("--port-range", port_range("23100-23200"), "--max-agents", "6",
                          "--forge-token-secret", "forge-token")
    script = matrix.model.script

    def row(name: str, steps, **spec) -> Row:
        script.add(Scenario(f"{name}:", steps))
        return matrix.row(name, **spec)

    rows = [
        row("ok", [FIX, text("Fixed.")]),
        row("tests-fail", [WRONG_FIX, text("Done.")]),
        # OpenCode retries a failing provider itself (retry-after honoured), then R3 twice more.
        row("model-500", [fail(500, times=1000, retry_after=0.05)]),
        row("model-429", [fail(429, times=2, retry_after=2), FIX, text("Fixed.")]),
        row("tests-hang", [FIX, text("Fixed.")], test={"command": "sleep 600", "timeout": "3s"}),
        row("tests-megabytes", [FIX, text("Fixed.")],
            test={"command": f"head -c {MEGABYTES * 1024 * 1024} /dev/zero | tr '\\0' x; echo; python3 -m pytest -q"}),
        row("tests-127", [FIX, text("Fixed.")], test={"command": "no-such-test-runner --all"}),
        row("bad-url", [], repository={"url": f"file://{matrix.root}/origins/nonexistent.git"}),
        # Another tenant's mirror in the operator's work dir, through a link under a prefix the
        # operator allows (--allow-file-urls: the matrix's root): refused, nothing fetched.
        row("foreign-mirror", [], repository={"url": f"file://{matrix.root}/origins/shared.git"}),
        row("bad-branch", [], repository={"branch": "develop"}),
        row("no-secret", [], repository={"credentialsSecretRef": {"name": "missing-credentials"}}),
        # A task naming the operator's forge token for its own cell (the second review).
        row("forge-token-env", [], agent={"config": matrix.model.opencode_config(),
                                          "envFrom": [{"secretRef": {"name": "forge-token"}}]}),
        # The agent makes the test pass by changing the test.
        row("protect", [edit("test_calc.py", "== 5", "== -1"), text("Done.")],
            test={"command": "python3 -m pytest -q", "protect": ["test_*.py"]}),
        # A permission left at `ask` (here by the task's own config) is refused at once; the
        # agent is told why and goes on.
        row("permission", [bash("echo probe > probe.txt"), FIX, text("Fixed.")],
            agent={"config": {**matrix.model.opencode_config(),
                              "permission": {"edit": "allow", "bash": "ask", "external_directory": "deny"}}}),
        row("push-refused", [FIX, text("Fixed.")]),
    ]
    rows[-1].origin.refuse()
    ok_mirror = mirror_path(matrix.work_dir / "mirrors", matrix.namespace, rows[0].origin.url)
    (matrix.root / "origins" / "shared.git").symlink_to(ok_mirror)
    # bad-url: its origin is never used; the URL does not exist.
    for r in rows:
        matrix.apply(r)
    matrix.wait_all_terminal(rows)
    return {r.name: r for r in rows}


def verdict(row: Row) -> tuple[str, str, str]:
    status = row.final["status"]
    return status["phase"], condition(row.final)["reason"], status["message"]


def test_a_fix_is_pushed_once(outcomes, matrix):
    row = outcomes["ok"]
    phase, reason, message = verdict(row)
    assert (phase, reason) == ("Succeeded", "Committed") and condition(row.final)["status"] == "True"
    status = row.final["status"]
    result = status["result"]
    assert result["pushed"] is True and row.origin.head(row.branch) == result["commit"]
    assert result["filesChanged"] == ["calc.py"] and result["testExitCode"] == 0
    assert "pushed" in message and result["commit"][:12] in message
    assert status["usage"]["inputTokens"] > 0
    assert status["observedGeneration"] == row.final["metadata"]["generation"]
    assert status.get("cell") is None, "the cell is gone"
    reasons = [e["reason"] for e in matrix.events(row)]
    confinement = [r for r in reasons if r in ("Confined", "Unconfined")]
    assert len(confinement) == 1, f"the run says once whether its cell is confined: {reasons}"
    # Milestones of the agent's work (observe/progress.py): its first edit, here.
    milestones = [r for r in reasons if r in ("AgentEditing", "BudgetWarning", "ModelRetrying")]
    assert milestones == ["AgentEditing"], reasons
    # One Event per phase (Events carry one-second timestamps: compare as multisets).
    assert sorted(r for r in reasons if r not in confinement + milestones) == sorted(
        ["Bootstrapping", "Executing", "Testing", "Committing", "Pushing", "TearingDown", "Succeeded"]), reasons
    # `kubectl get agenttasks` shows the verdict and the commit.
    line = next(line for line in matrix.cluster.kubectl("get", "-n", matrix.namespace, "agenttasks").stdout.splitlines()
                if line.split()[0] == "ok")
    assert "Succeeded" in line and result["shortCommit"] in line, line
    matrix.assert_nothing_left(row, pushed=True)


def test_failing_tests_end_failed_and_nothing_is_pushed(outcomes, matrix):
    row = outcomes["tests-fail"]
    phase, reason, message = verdict(row)
    assert (phase, reason) == ("Failed", "TestsFailed") and condition(row.final)["status"] == "False"
    result = row.final["status"]["result"]
    assert result["pushed"] is False and result.get("commit") is None
    assert any(e["reason"] == "Failed" and e["type"] == "Warning" for e in matrix.events(row))
    matrix.assert_nothing_left(row, pushed=False)


def test_model_failing_until_opencode_gives_up(outcomes, matrix):
    row = outcomes["model-500"]
    phase, reason, message = verdict(row)
    assert (phase, reason) == ("Failed", "AgentError")
    assert "the model failed" in message and "500" in message
    failures = [r for r in matrix.model.requests if r["scenario"] == "model-500:"]
    assert len(failures) >= 3 * 2, "R3 prompted three times, each through OpenCode's own retries"
    matrix.assert_nothing_left(row, pushed=False)


def test_model_429_with_retry_after_is_waited_out(outcomes, matrix):
    row = outcomes["model-429"]
    assert verdict(row)[:2] == ("Succeeded", "Committed")
    requests = [r for r in matrix.model.requests if r["scenario"] == "model-429:"]
    assert [r["kind"] for r in requests[:3]] == ["fail", "fail", "tool"]
    assert requests[2]["time"] - requests[1]["time"] >= 2.0, "OpenCode waited the retry-after"
    matrix.assert_nothing_left(row, pushed=True)


def test_tests_running_past_their_time_limit(outcomes, matrix):
    row = outcomes["tests-hang"]
    phase, reason, message = verdict(row)
    assert (phase, reason) == ("Failed", "TestsTimedOut")
    assert "time limit of 3s" in message
    assert row.final["status"]["phaseDurations"]["Testing"] < 30
    matrix.assert_nothing_left(row, pushed=False)


def test_tests_printing_megabytes(outcomes, matrix):
    row = outcomes["tests-megabytes"]
    assert verdict(row)[:2] == ("Succeeded", "Committed")
    tail = row.final["status"]["result"]["testOutputTail"]
    assert len(tail) <= 2000 and "1 passed" in tail
    assert len(json.dumps(row.final["status"])) < 16_000, "the status stays small"
    matrix.assert_nothing_left(row, pushed=True)


def test_test_command_not_found(outcomes, matrix):
    row = outcomes["tests-127"]
    phase, reason, message = verdict(row)
    assert (phase, reason) == ("Failed", "TestCommandNotFound")
    assert "no-such-test-runner" in message and row.final["status"]["result"]["testExitCode"] == 127
    matrix.assert_nothing_left(row, pushed=False)


def test_a_repository_that_does_not_exist(outcomes, matrix):
    row = outcomes["bad-url"]
    phase, reason, message = verdict(row)
    assert (phase, reason) == ("Failed", "FetchFailed")
    assert f"{matrix.root}/origins/nonexistent.git" in message and "does not appear to be a git repository" in message
    matrix.assert_nothing_left(row, pushed=False)


def test_another_tenants_mirror_is_refused_as_a_repository(outcomes, matrix):
    row = outcomes["foreign-mirror"]
    phase, reason, message = verdict(row)
    assert (phase, reason) == ("Failed", "RepositoryRefused")
    assert "leads into the operator's work dir" in message and "--allow-file-urls" in message
    matrix.assert_nothing_left(row, pushed=False)


def test_a_base_branch_that_does_not_exist(outcomes, matrix):
    row = outcomes["bad-branch"]
    phase, reason, message = verdict(row)
    assert (phase, reason) == ("Failed", "InvalidInput")
    assert "base branch 'develop' does not exist" in message and "main" in message
    matrix.assert_nothing_left(row, pushed=False)


def test_a_credentials_secret_that_does_not_exist(outcomes, matrix):
    row = outcomes["no-secret"]
    phase, reason, message = verdict(row)
    assert (phase, reason) == ("Failed", "InvalidInput")
    assert message == (f"spec.repository.credentialsSecretRef: secret 'missing-credentials' not found in "
                       f"namespace {matrix.namespace}")
    matrix.assert_nothing_left(row, pushed=False)


def test_a_task_cannot_have_the_operators_forge_token_in_its_cell(outcomes, matrix):
    row = outcomes["forge-token-env"]
    phase, reason, message = verdict(row)
    assert (phase, reason) == ("Failed", "InvalidInput")
    assert message == ("spec.agent.envFrom: secret 'forge-token' is the operator's forge token "
                       "(--forge-token-secret), which never reaches a task's cell or git")
    assert FORGE_TOKEN not in json.dumps(row.final)
    matrix.assert_nothing_left(row, pushed=False)


def test_an_agent_that_weakens_the_tests(outcomes, matrix):
    row = outcomes["protect"]
    phase, reason, message = verdict(row)
    assert (phase, reason) == ("Failed", "TestsModified")
    assert "test_calc.py" in message and "nothing committed" in message
    assert row.final["status"]["result"].get("commit") is None
    assert "Testing" not in row.final["status"]["phaseDurations"], "the weakened tests never ran"
    matrix.assert_nothing_left(row, pushed=False)


def test_a_permission_prompt_is_refused_and_the_agent_goes_on(outcomes, matrix):
    row = outcomes["permission"]
    assert verdict(row)[:2] == ("Succeeded", "Committed")
    answered = [r for r in matrix.model.requests if r["scenario"] == "permission:" and r["kind"] == "tool"]
    # What the agent was told about its bash call (the tool result in the next request).
    tool_results = [m.get("content") for r in answered for m in r["body"]["messages"] if m.get("role") == "tool"]
    assert any("nobody can grant permissions" in str(c) and "'bash'" in str(c) for c in tool_results), tool_results
    assert "probe.txt" not in row.final["status"]["result"]["filesChanged"], "the refused command did not run"
    matrix.assert_nothing_left(row, pushed=True)


def test_a_push_the_repository_refuses(outcomes, matrix):
    row = outcomes["push-refused"]
    phase, reason, message = verdict(row)
    assert (phase, reason) == ("Failed", "PushFailed")
    result = row.final["status"]["result"]
    assert message.startswith(f"committed {result['commit'][:12]} but the push failed") and "refused" in message
    assert result["pushed"] is False and result["testExitCode"] == 0, "the tested commit is named, not lost"
    reasons = [e["reason"] for e in matrix.events(row)]
    assert "Pushing" in reasons and "Failed" in reasons
    matrix.assert_nothing_left(row, pushed=False)


def test_nothing_of_the_module_is_left(outcomes, matrix):
    """Every row's test deleted its task (finalizer released); none of them is left, nor a
    port of the operator's range, nor a server of its work dir."""
    left = [row.name for row in outcomes.values() if matrix.get(row) is not None]
    assert left == [], f"tasks still there: {left}"
    matrix.assert_range_free()
