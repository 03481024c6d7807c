"""Confinement in the operator: a hostile AgentTask beside a victim AgentTask that holds a
secret from its own `envFrom`; the real kube-apiserver, `reactor operator` as a process,
real opencode, real git. And the operator's word when cells run unconfined."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from reactor.infra.mirrors import RepositoryMirrors
from reactor.infra.worktrees import repository_key
from reactor_dev.testing.attacks import REPORT, Targets, attack_step, parse_report
from reactor_dev.testing.helpers import free_port
from reactor_dev.testing.operator_process import operators
from reactor_dev.testing.repos import BUGGY_CALC, make_repo
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, set_event, text, wait_for, write
from reactor_dev.testing.repos import git
from tests.kube.conftest import kubectl_apply
from tests.security.test_confinement import assert_every_attempt_blocked, fingerprint

pytestmark = pytest.mark.opencode

FIX = edit("calc.py", "return a - b", "return a + b")
VICTIM_KEY = "sk-victim-only-1f2e3d4c"


@pytest.fixture
def operator(crd_installed, namespace, work_dir):
    with operators(crd_installed, namespace, work_dir) as start:
        yield start


def manifest(name: str, origin: Path, model: ScriptedModel, **spec) -> dict:
    body = {"prompt": f"{name}: fix add() in calc.py", "repository": {"url": f"file://{origin}", "branch": "main"},
            "test": {"command": "python3 -m pytest -q"}, "agent": {"config": model.opencode_config()}, "timeout": "5m"}
    body.update(spec)
    return {"apiVersion": "reactor.dev/v1alpha1", "kind": "AgentTask", "metadata": {"name": name}, "spec": body}


def condition(obj: dict, type_: str) -> dict:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


def test_a_hostile_task_reaches_neither_its_neighbour_nor_the_operator(operator, namespace, work_dir, tmp_path):
    origin = make_repo(tmp_path / "origin")
    git(origin, "branch", "reactor/OLD")
    origin_before = fingerprint(origin / ".git")
    web_port = free_port()
    op = operator("--web", f"127.0.0.1:{web_port}")  # every task's transcript is on that page
    secret = json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "victim-key"},
                         "stringData": {"VICTIM_API_KEY": VICTIM_KEY}})
    assert op.cluster.kubectl("apply", "-n", namespace, "-f", "-", input=secret).returncode == 0

    up, attacked = threading.Event(), threading.Event()
    victim = Scenario("victim:", [set_event(up), wait_for(attacked), FIX, write("victim.py", "VICTIM = 1\n"),
                                  text("Fixed.")])
    with ScriptedModel([victim]) as model:
        out = kubectl_apply(op.cluster, namespace, manifest("victim", origin, model,
                                                             agent={"config": model.opencode_config(),
                                                                    "envFrom": [{"secretRef": {"name": "victim-key"}}]}))
        assert out.returncode == 0, out.stderr
        assert up.wait(240), "the victim's agent started"
        victim_status = op.get("victim")
        uid = victim_status["metadata"]["uid"]
        mirror = RepositoryMirrors(work_dir.resolve() / "mirrors").path_for(f"file://{origin}")
        targets = Targets(
            outside_file=str(tmp_path / "outside.txt"),
            other_checkout_file=str(work_dir.resolve() / "worktrees" / repository_key(mirror) /
                                    f"{namespace}.victim.{uid[:8]}" / "calc.py"),
            source_git_dir=str(mirror),
            other_branch="refs/heads/reactor/OLD",
            protected_files=[str(op.kubeconfig)],
            operator_pid=op.process.pid,
            secret=VICTIM_KEY,
            # Nothing a cell needs listens on these: the page (transcripts of every task), the
            # liveness endpoint, the victim's server (its password is not the only lock).
            ports=[web_port, op.liveness_port, victim_status["status"]["cell"]["port"]],
        )
        model.script.add(Scenario("attacker:", [wait_for(up), attack_step(targets), set_event(attacked), FIX,
                                                text("Fixed.")]))
        mirror_before = None
        out = kubectl_apply(op.cluster, namespace, manifest("attacker", origin, model))
        assert out.returncode == 0, out.stderr
        attacker_obj = op.wait_terminal("attacker", timeout=300)
        victim_obj = op.wait_terminal("victim", timeout=300)
        mirror_before = fingerprint(mirror)

    assert attacker_obj["status"]["phase"] == "Succeeded", attacker_obj["status"]
    assert condition(attacker_obj, "Confined")["status"] == "True"
    assert_every_attempt_blocked(git(origin, "show", f"reactor/attacker:{REPORT}"),
                                 protected=[Path(op.kubeconfig).name], ports=targets.ports)
    assert httpx.get(f"http://127.0.0.1:{web_port}/api/v1/tasks", timeout=10).status_code == 200, \
        "the page answers anyone but a cell"
    assert git(origin, "show", "reactor/attacker:calc.py") == BUGGY_CALC.replace("a - b", "a + b").strip()
    assert victim_obj["status"]["phase"] == "Succeeded", victim_obj["status"]
    assert sorted(git(origin, "diff", "--name-only", "main", "reactor/victim").split()) == ["calc.py", "victim.py"]
    assert any(e["reason"] == "Confined" for e in op.events("attacker"))
    assert op.process.poll() is None, "the operator lives"
    git(origin, "branch", "-D", "reactor/attacker", "reactor/victim")
    assert fingerprint(origin / ".git") == origin_before, "origin's hooks, config and refs are unchanged"
    assert "post-checkout" not in mirror_before["hooks"] and "fsmonitor" not in (mirror / "config").read_text()
    assert not (tmp_path / "outside.txt").exists()


def test_unconfined_cells_are_said_so_and_a_moved_ref_is_caught(operator, namespace, work_dir, tmp_path):
    """--allow-unconfined: the attack works (this is what confinement prevents), the task
    says so in its Confined condition and a Warning Event, and the ref ledger still refuses
    a result while refs of the mirror moved behind Reactor's back: restored, nothing pushed."""
    origin = make_repo(tmp_path / "origin")
    git(origin, "branch", "reactor/OLD")
    origin_before = fingerprint(origin / ".git")
    op = operator("--allow-unconfined")
    with ScriptedModel([]) as model:
        mirror = RepositoryMirrors(work_dir.resolve() / "mirrors").path_for(f"file://{origin}")
        targets = Targets(outside_file=str(tmp_path / "outside.txt"), other_checkout_file=str(tmp_path / "none"),
                          source_git_dir=str(mirror), other_branch="refs/heads/reactor/OLD")
        model.script.add(Scenario("attacker:", [attack_step(targets), FIX, text("Fixed.")]))
        kubectl_apply(op.cluster, namespace, manifest("attacker", origin, model))
        obj = op.wait_terminal("attacker", timeout=300)

    assert obj["status"]["phase"] == "Failed"
    assert condition(obj, "Succeeded")["reason"] == "RefsTampered", obj["status"]
    assert "refs/heads/main" in obj["status"]["message"] and "restored" in obj["status"]["message"]
    assert condition(obj, "Confined")["status"] == "False" and "UNCONFINED" in condition(obj, "Confined")["message"]
    assert any(e["reason"] == "Unconfined" and e["type"] == "Warning" for e in op.events("attacker"))
    assert fingerprint(origin / ".git") == origin_before, "nothing was pushed; origin is unchanged"
    main = git(mirror, "rev-parse", "refs/heads/main")
    assert main == git(origin, "rev-parse", "main"), "the mirror's base branch was put back"
    assert (tmp_path / "outside.txt").exists(), "unconfined, the write outside the checkout worked"
