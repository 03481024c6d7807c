"""The AgentTask operator across its own restarts: a real kube-apiserver, `reactor operator`
as a real process, real opencode servers, real git, the scripted model.

The rest of the operator's end-to-end rows are tested once each in tests/faults (the happy
path to a pushed commit and failing tests: test_outcomes; delete in each phase: test_delete;
SIGKILL then retry: test_crash; --max-agents: test_capacity)."""

from __future__ import annotations

import signal
import threading
import time

import psutil
import pytest

from reactor.infra.processes import find_marked_processes
from reactor_dev.testing.matrix import process_alive
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, hang, set_event, text, wait_for, write
from reactor_dev.testing.operator_process import operators
from reactor_dev.testing.repos import make_repo
from reactor_dev.testing.tasks import agent_task, condition, kubectl_apply

pytestmark = pytest.mark.opencode

FIX = edit("calc.py", "return a - b", "return a + b")


@pytest.fixture
def app_repo(tmp_path):
    return make_repo(tmp_path / "app")


@pytest.fixture
def operator(crd_installed, namespace, work_dir):
    with operators(crd_installed, namespace, work_dir) as start:
        yield start


def task_manifest(name: str, repo, model: ScriptedModel, **spec) -> dict:
    # The default time box (30m): no test here is about it, and on a loaded machine a run
    # across an operator restart takes minutes.
    return agent_task(name, repo, model, **spec)


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


@pytest.mark.timeout(900)
def test_operator_killed_mid_turn_reattaches_to_the_agents_running_cell(operator, namespace, app_repo, work_dir):
    op = operator("--cells-outlive-operator")
    reached, release = threading.Event(), threading.Event()
    # The agent writes notes.txt; its next model call is held across the operator's death
    # and answered once the next operator has reattached.
    steps = [write("notes.txt", "step one\n"), set_event(reached), wait_for(release), FIX, text("Fixed.")]
    with ScriptedModel([Scenario("live:", steps)]) as model:
        kubectl_apply(op.cluster, namespace, task_manifest("live", app_repo, model, timeout="10m"))
        obj = op.wait_for("live", lambda o: reached.is_set() and o and (o["status"].get("cell") or {}).get("sessionId"),
                          what="agent mid-turn")
        launcher, session = obj["status"]["cell"]["serverPid"], obj["status"]["cell"]["sessionId"]
        op.stop(signal.SIGKILL)
        assert process_alive(launcher), "the cell outlives its operator"
        before = len(model.requests)

        restarted_at = time.time()
        restarted = operator("--cells-outlive-operator")
        restarted.wait_for("live", lambda o: [e["reason"] for e in restarted.events("live")].count("Executing") == 2,
                           what="the reattached run executing")
        busy_after = time.time() - restarted_at
        release.set()
        obj = restarted.wait_terminal("live", timeout=600)
        after = [r for r in model.requests[before:] if r.get("scenario") == "live:"]
        assert not process_alive(launcher) and find_marked_processes(str(work_dir)) == [], "no process left after"
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    assert status["result"]["resumed"] == "reattached" and status["attempts"] == 1, status
    assert status["result"]["filesChanged"] == ["calc.py", "notes.txt"]
    retried = [e["message"] for e in restarted.events("live") if e["reason"] == "Retrying"]
    assert retried and f"reattaching to the agent's running session {session}" in retried[0], retried
    # The model saw no extra message: every call after the crash has the task's prompt as its
    # only user message, and the tool call made before the crash is not made again.
    assert after and all(sum(m["role"] == "user" for m in r["body"]["messages"]) == 1 for r in after)
    assert [r.get("answer") for r in model.requests if r.get("scenario") == "live:"].count("tool write") == 1
    print(f"\nrestart to agent busy (reattach): {busy_after:.1f}s; model calls after recovery: {len(after)}; "
          f"tokens: {status['usage']['inputTokens'] + status['usage']['outputTokens']}")


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
