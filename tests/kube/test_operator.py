"""The AgentTask operator end to end: a real kube-apiserver, `reactor operator` as a real
process, real opencode servers, real git, the scripted model."""

from __future__ import annotations

import signal
import time

import psutil
import pytest

from reactor.infra.processes import find_marked_processes
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, hang, text, write
from reactor_dev.testing.repos import git, make_repo
from tests.kube.conftest import kubectl_apply
from reactor_dev.testing.operator_process import operators

pytestmark = pytest.mark.opencode

FIX = edit("calc.py", "return a - b", "return a + b")
WRONG_FIX = edit("calc.py", "return a - b", "return a * b")


@pytest.fixture
def app_repo(tmp_path):
    return make_repo(tmp_path / "app")


@pytest.fixture
def operator(crd_installed, namespace, work_dir):
    with operators(crd_installed, namespace, work_dir) as start:
        yield start


def task_manifest(name: str, repo, model: ScriptedModel, **spec) -> dict:
    body = {
        "description": "Fix add",
        "prompt": f"{name}: fix add() in calc.py so the tests pass",
        "repository": {"url": f"file://{repo}", "branch": "main"},
        "test": {"command": "python3 -m pytest -q"},
        "agent": {"config": model.opencode_config()},
        "timeout": "3m",
    }
    body.update(spec)
    return {"apiVersion": "reactor.dev/v1alpha1", "kind": "AgentTask", "metadata": {"name": name}, "spec": body}


def condition(obj: dict, type_: str = "Succeeded") -> dict:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


def test_apply_runs_the_task_to_a_pushed_commit(operator, namespace, app_repo):
    op = operator()
    main_before = git(app_repo, "rev-parse", "main")
    with ScriptedModel([Scenario("fix-add:", [FIX, text("Fixed.")])]) as model:
        applied = time.monotonic()
        out = kubectl_apply(op.cluster, namespace, task_manifest("fix-add", app_repo, model))
        assert out.returncode == 0, out.stderr
        op.wait_for("fix-add", lambda o: o and o.get("status", {}).get("phase") not in (None, "Pending"),
                    what="Bootstrapping")
        print(f"\napply -> Bootstrapping: {time.monotonic() - applied:.2f}s")
        obj = op.wait_terminal("fix-add")

    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    assert status["result"]["commit"] == git(app_repo, "rev-parse", "reactor/fix-add")
    assert status["result"]["pushed"] is True and status["result"]["filesChanged"] == ["calc.py"]
    assert status["result"]["testExitCode"] == 0
    assert git(app_repo, "rev-parse", "main") == main_before
    assert condition(obj)["status"] == "True" and condition(obj)["reason"] == "Committed"
    assert status["usage"]["inputTokens"] > 0
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    assert status.get("cell") is None, "the cell is gone"
    # Events carry one-second timestamps, so compare the set rather than the order.
    reasons = {e["reason"] for e in op.events("fix-add")}
    assert {"Bootstrapping", "Executing", "Testing", "Committing", "TearingDown", "Succeeded"} <= reasons
    table = op.cluster.kubectl("get", "-n", namespace, "agenttasks").stdout
    assert "Succeeded" in table and status["result"]["shortCommit"] in table


def test_failing_tests_end_failed_and_nothing_is_pushed(operator, namespace, app_repo):
    op = operator()
    with ScriptedModel([Scenario("wrong-fix:", [WRONG_FIX, text("Done.")])]) as model:
        kubectl_apply(op.cluster, namespace, task_manifest("wrong-fix", app_repo, model))
        obj = op.wait_terminal("wrong-fix")
    assert obj["status"]["phase"] == "Failed"
    assert condition(obj)["status"] == "False" and condition(obj)["reason"] == "TestsFailed"
    assert obj["status"]["result"]["pushed"] is False and obj["status"]["result"].get("commit") is None
    assert git(app_repo, "branch", "--list", "reactor/*") == ""
    assert any(e["reason"] == "Failed" and e["type"] == "Warning" for e in op.events("wrong-fix"))


def test_delete_mid_run_stops_everything_within_seconds(operator, namespace, app_repo, work_dir):
    op = operator()
    with ScriptedModel([Scenario("doomed:", [hang(times=100)])]) as model:
        kubectl_apply(op.cluster, namespace, task_manifest("doomed", app_repo, model))
        obj = op.wait_for("doomed", lambda o: o and (o.get("status", {}).get("cell") or {}).get("serverPid")
                          and o["status"]["phase"] == "Executing", what="Executing")
        pid, worktree = obj["status"]["cell"]["serverPid"], obj["status"]["cell"]["worktree"]
        assert psutil.pid_exists(pid)
        deleted = time.monotonic()
        op.cluster.kubectl("delete", "-n", namespace, "agenttask", "doomed", "--wait=false")
        op.wait_for("doomed", lambda o: o is None, timeout=10, what="deletion")
        took = time.monotonic() - deleted
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not (work_dir / "worktrees").exists() or not any(p.name.startswith(f"{namespace}.doomed")
                                                             for p in (work_dir / "worktrees").rglob("*"))
    assert not __import__("os").path.exists(worktree)
    assert find_marked_processes(str(work_dir)) == []
    print(f"\ndelete -> gone: {took:.2f}s")


@pytest.mark.timeout(900)  # two boots and an operator restart, on a loaded machine
def test_operator_killed_mid_run_reopens_the_agents_session_on_restart(operator, namespace, app_repo, work_dir):
    op = operator()
    # The agent writes notes.txt, then its next model call hangs: the operator dies mid-turn.
    steps = [write("notes.txt", "step one\n"), hang(times=1), FIX, text("Fixed.")]
    with ScriptedModel([Scenario("survivor:", steps)]) as model:
        # A time box with room for two boots and a restart on a loaded machine.
        kubectl_apply(op.cluster, namespace, task_manifest("survivor", app_repo, model, timeout="10m"))
        obj = op.wait_for("survivor", lambda o: o and o.get("status", {}).get("phase") == "Executing"
                          and (o["status"].get("cell") or {}).get("serverPid"), what="Executing")
        orphan = obj["status"]["cell"]["serverPid"]
        op.wait_for("survivor", lambda o: any(r["kind"] == "hang" for r in model.requests), what="agent mid-turn")
        session = op.get("survivor")["status"]["cell"]["sessionId"]
        op.stop(signal.SIGKILL)
        assert psutil.pid_exists(orphan), "the server outlived the killed operator (the orphan to reap)"
        crashed = len(model.requests)

        restarted_at = time.time()
        restarted = operator()
        obj = restarted.wait_terminal("survivor", timeout=600)
        assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE
        after = [r for r in model.requests[crashed:] if r.get("scenario") == "survivor:"]
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    assert status["attempts"] == 2 and status["result"]["resumed"] == "reopened"
    assert status["result"]["filesChanged"] == ["calc.py", "notes.txt"], "the work before the crash is kept"
    retried = [e["message"] for e in restarted.events("survivor") if e["reason"] == "Retrying"]
    assert retried and f"reopening the agent's session {session}" in retried[0], retried
    # The same conversation, continued: the reopened session's first model call carries the
    # call made before the crash and exactly one new message; that call is not made again.
    first = after[0]["body"]["messages"]
    users = [m for m in first if m["role"] == "user"]
    assert len(users) == 2 and "Reactor was restarted while you worked" in str(users[1]["content"]), users
    assert any(call["function"]["name"] == "write" for m in first for call in m.get("tool_calls") or [])
    assert [r.get("answer") for r in model.requests if r.get("scenario") == "survivor:"].count("tool write") == 1
    print(f"\nrestart to agent busy (reopen): {after[0]['time'] - restarted_at:.1f}s; "
          f"model calls after recovery: {len(after)} (from scratch: 3)")
    restarted.cluster.kubectl("delete", "-n", namespace, "agenttask", "survivor", "--timeout=15s")
    assert restarted.get("survivor") is None, "no finalizer stuck"


def test_capacity_bounds_concurrent_cells(operator, namespace, app_repo, work_dir):
    op = operator("--max-agents", "2")
    names = [f"cap-{i}" for i in range(6)]
    # Each cell's first answer waits until two cells have a request open at once: the peak,
    # counted by the model as requests start and end, must reach the limit and never pass it.
    scenarios = [Scenario(f"{n}:", [edit("calc.py", "return a - b", "return a + b", together=2), text("Fixed.")])
                 for n in names]
    with ScriptedModel(scenarios) as model:
        for name in names:
            kubectl_apply(op.cluster, namespace, task_manifest(name, app_repo, model, resultBranch=f"reactor/{name}"))
        waited = op.wait_for(names[-1], lambda o: o and any(c["reason"] == "WaitingForCapacity"
                                                            for c in (o.get("status") or {}).get("conditions", [])),
                             what="the last task waiting for capacity")
        objs = [op.wait_terminal(n, timeout=300) for n in names]
        peak = model.peak_in_flight
    assert waited["status"]["phase"] == "Pending"
    assert {o["status"]["phase"] for o in objs} == {"Succeeded"}, [o["status"]["message"] for o in objs]
    assert peak == 2, f"at most 2 cells at once, and the limit was used: peak {peak}"


def test_reapplying_a_finished_task_does_not_run_it_again(operator, namespace, app_repo):
    op = operator()
    scenarios = [Scenario("once:", [FIX, text("Fixed.")]), Scenario("probe:", [FIX, text("Fixed.")])]
    with ScriptedModel(scenarios) as model:
        manifest = task_manifest("once", app_repo, model)
        kubectl_apply(op.cluster, namespace, manifest)
        first = op.wait_terminal("once")
        again = kubectl_apply(op.cluster, namespace, manifest)
        assert again.returncode == 0 and "unchanged" in again.stdout
        # A restart is the other way a finished task could be picked up again. The restarted
        # operator lists "once" before it sees the probe, so once the probe is done, "once"
        # has certainly been looked at.
        op.stop()
        restarted = operator()
        kubectl_apply(op.cluster, namespace, task_manifest("probe", app_repo, model, resultBranch="reactor/probe"))
        restarted.wait_terminal("probe")
        after = restarted.get("once")
        once_requests = [r for r in model.requests if r.get("scenario") == "once:"]
    assert after["status"] == first["status"]
    assert len(once_requests) == 2, "one tool call and one final answer: the task ran exactly once"


def test_operator_sigterm_stops_every_cell_and_requeues_the_task(operator, namespace, app_repo, work_dir):
    op = operator()
    with ScriptedModel([Scenario("stopped:", [hang(times=1), FIX, text("Fixed.")])]) as model:
        kubectl_apply(op.cluster, namespace, task_manifest("stopped", app_repo, model))
        obj = op.wait_for("stopped", lambda o: o and (o.get("status", {}).get("cell") or {}).get("serverPid")
                          and any(r["kind"] == "hang" for r in model.requests), what="agent mid-turn")
        server = obj["status"]["cell"]["serverPid"]
        assert op.stop(signal.SIGTERM) == 0
        assert find_marked_processes(str(work_dir)) == [], "nothing outlives the operator"
        assert not psutil.pid_exists(server) or psutil.Process(server).status() == psutil.STATUS_ZOMBIE
        status = op.get("stopped")["status"]
        assert status["phase"] == "Pending" and condition(op.get("stopped"))["reason"] == "OperatorShutdown"
        # The next operator runs it again, from a fresh worktree.
        obj = operator().wait_terminal("stopped")
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
