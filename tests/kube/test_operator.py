"""The AgentTask operator across its own restarts: a real kube-apiserver, `reactor operator`
as a real process, real opencode servers, real git, the scripted model.

The rest of the operator's end-to-end rows are tested once each in tests/faults (the happy
path to a pushed commit and failing tests: test_outcomes; delete in each phase: test_delete;
SIGKILL then retry: test_crash; --max-agents: test_capacity)."""

from __future__ import annotations

import signal

import psutil
import pytest

from reactor.infra.processes import find_marked_processes
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, hang, text
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
