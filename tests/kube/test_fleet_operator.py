"""Many operator replicas sharing AgentTasks, end to end: a real kube-apiserver, `reactor operator
--fleet` as real processes (each with its own work dir, as each StatefulSet pod has its own
volume), real opencode, real git, the scripted model with a fixed answer latency (so the run
is bound by cells, not by this machine's cores).

What a user would check: every task ends; each ran in one replica at a time (counted from the
model's own log: which cell asked when); each result branch was created by exactly one push and
holds the commit the status reports; a dead replica's tasks finish elsewhere; a replica that
slept through its Lease stops its cells on waking and changes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from reactor.infra.processes import find_marked_processes
from reactor_dev.testing.fleet import (
    BranchPushHold,
    all_terminal,
    apply_all,
    conversations,
    first_prompt,
    fix_task,
    fleet_args,
    kill_pod,
    most_at_once,
    tasks,
    wait_until,
)
from reactor_dev.testing.operator_process import operators
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, text, write
from reactor_dev.testing.repos import git, make_repo

# Several replicas and up to six cells at once on a small machine: more than the default 5 minutes.
pytestmark = [pytest.mark.opencode, pytest.mark.timeout(900)]

LEASE = 6  # seconds: a dead replica's tasks move after this; renewals every 1.2 s
LATENCY = 1.5  # seconds per model answer (a real model takes seconds per turn)
FIX = edit("calc.py", "return a - b", "return a + b")


@pytest.fixture
def origin(tmp_path) -> Path:
    return make_repo(tmp_path / "origin")


@pytest.fixture
def replica(crd_installed, namespace, tmp_path):
    """``replica(index, *args)`` starts replica r<index> with its own work dir and port range.
    Afterwards no server of any replica may be left."""
    work_dirs: list[Path] = []
    with operators(crd_installed, namespace, tmp_path / "unused") as start:
        def start_replica(index: int, *args: str):
            work = tmp_path / f"replica-{index}"
            work_dirs.append(work)
            return start(*fleet_args(index, namespace, LEASE, *args), work_dir=work)
        yield start_replica
    leaked = [p for work in work_dirs for p in find_marked_processes(str(work.resolve()))]
    for process in leaked:
        os.killpg(process.pid, signal.SIGKILL)
    assert not leaked, f"servers left running: {leaked}"


def manifest(name: str, origin: Path, model: ScriptedModel) -> dict:
    return fix_task(name, origin, model.opencode_config())


def replica_of(cell_dir: str, work_dirs: dict[str, Path]) -> str:
    return next(name for name, work in work_dirs.items() if cell_dir.startswith(str(work.resolve())))


def pushes(origin: Path, branch: str) -> list[str]:
    """Every update of the branch in the origin repository, as its reflog records them."""
    out = git(origin, "reflog", "show", "--format=%H", f"refs/heads/{branch}")
    return out.splitlines()


def test_three_replicas_share_nine_tasks_each_run_once_and_pushed_once(replica, crd_installed, namespace, origin,
                                                                        tmp_path):
    replicas = [replica(i, "--max-agents=2") for i in range(3)]
    work_dirs = {f"r{i}": r.work_dir for i, r in enumerate(replicas)}
    # Nine tasks for six slots: every replica gets work, some wait for a free slot (the
    # oldest first), and more than one replica's worth runs at once.
    names = [f"t{i:02d}" for i in range(9)]
    with ScriptedModel([Scenario(f"{n}:", [FIX, text("Fixed.")]) for n in names], latency=LATENCY) as model:
        started = time.monotonic()
        apply_all(crd_installed, namespace, [manifest(n, origin, model) for n in names])
        objs = wait_until(lambda: all_terminal(crd_installed, namespace, len(names)), 600, "all terminal",
                          lambda: "\n".join(r.log()[-3000:] for r in replicas))
        took = time.monotonic() - started
        talks = conversations(model.requests)

    phases = {n: o["status"]["phase"] for n, o in objs.items()}
    assert set(phases.values()) == {"Succeeded"}, {n: (o["status"]["phase"], o["status"].get("message"))
                                                   for n, o in objs.items() if o["status"]["phase"] != "Succeeded"}
    # One replica at a time per task; here (no faults) exactly one cell per task, one attempt.
    for name in names:
        assert len(talks[name]) == 1, f"{name} ran in {len(talks[name])} cells: {list(talks[name])}"
        assert objs[name]["status"]["attempts"] == 1
    # Each result branch: created by one push, holding the commit the status reports.
    for name, obj in objs.items():
        result = obj["status"]["result"]
        assert result["pushed"] is True
        assert pushes(origin, f"reactor/{name}") == [result["commit"]], name
    # The work was shared, within each replica's bound, and the fleet ran more than one replica's worth at once.
    by_replica: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for name in names:
        (cell, span), = talks[name].items()
        owner = replica_of(cell, work_dirs)
        assert objs[name]["status"]["claim"]["replica"] == owner
        by_replica[owner].append(span)
    assert set(by_replica) == {"r0", "r1", "r2"}, {r: len(s) for r, s in by_replica.items()}
    assert all(most_at_once(spans) <= 2 for spans in by_replica.values())
    overall = most_at_once([span for spans in by_replica.values() for span in spans])
    assert 3 <= overall <= 6, overall
    # Oldest first across the fleet: no task was claimed clearly after a younger one.
    claimed = {n: objs[n]["status"]["claim"]["since"] for n in names}
    order = sorted(names, key=lambda n: claimed[n])
    late = [(older, younger) for i, younger in enumerate(order) for older in order[i + 1:]
            if older < younger and _seconds(claimed[older]) - _seconds(claimed[younger]) > 2.0]
    assert not late, late
    # `kubectl get -o wide` shows who ran what.
    wide = crd_installed.kubectl("get", "-n", namespace, "agenttasks", "-o", "wide").stdout
    assert "REPLICA" in wide.splitlines()[0] and all(f"r{i}" in wide for i in range(3))
    print(f"\n{len(names)} tasks on 3 replicas x 2 agents: {took:.1f}s; per replica "
          f"{ {r: len(s) for r, s in sorted(by_replica.items())} }; at once {overall}")


def _seconds(stamp: str) -> float:
    import datetime as dt

    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()


def test_a_killed_replicas_tasks_are_adopted_and_finish(replica, crd_installed, namespace, origin):
    replicas = [replica(i, "--max-agents=2") for i in range(3)]
    names = [f"k{i}" for i in range(6)]  # every slot of the three replicas busy when r1 dies
    # Long enough turns that the victim is mid-run when it dies.
    scenarios = [Scenario(f"{n}:", [FIX, text("Fixed.")]) for n in names]
    with ScriptedModel(scenarios, latency=3.0) as model:
        apply_all(crd_installed, namespace, [manifest(n, origin, model) for n in names])

        def victim_mid_run():
            objs = tasks(crd_installed, namespace)
            held = [n for n, o in objs.items() if (o.get("status") or {}).get("phase") == "Executing"
                    and o["status"]["claim"]["replica"] == "r1"]
            return held or None

        held = wait_until(victim_mid_run, 240, "r1 running a task", lambda: replicas[1].log())
        kill_pod(replicas[1])
        killed = time.monotonic()

        def adopted():
            objs = tasks(crd_installed, namespace)
            moved = [n for n in held if ((objs[n].get("status") or {}).get("claim") or {}).get("replica") not in ("r1", None)]
            return moved if len(moved) == len(held) else None

        wait_until(adopted, 300, "r1's tasks claimed elsewhere (when a survivor has a free slot)")
        failover = time.monotonic() - killed
        objs = wait_until(lambda: all_terminal(crd_installed, namespace, len(names)), 400, "all terminal",
                          lambda: replicas[0].log() + replicas[2].log())
        talks = conversations(model.requests)

    assert {o["status"]["phase"] for o in objs.values()} == {"Succeeded"}, \
        {n: o["status"].get("message") for n, o in objs.items()}
    for name in held:
        status = objs[name]["status"]
        assert status["claim"]["replica"] in ("r0", "r2") and status["attempts"] == 2, status
    for name, obj in objs.items():
        assert pushes(origin, f"reactor/{name}") == [obj["status"]["result"]["commit"]], name
        # The dead replica's cell and the adopter's never talked to the model at the same time.
        spans = sorted(talks[name].values())
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), (name, spans)
    # The Lease must expire before anyone adopts: not before LEASE minus one renewal interval.
    assert failover >= LEASE - LEASE / 5, failover
    for survivor in (replicas[0], replicas[2]):
        assert find_marked_processes(str(survivor.work_dir.resolve())) == []
    print(f"\nreplica killed -> its {len(held)} task(s) claimed elsewhere: {failover:.1f}s (Lease {LEASE}s)")


RESUMED = "lost before it was published"  # in the prompt of a session started from a lost run's green commit


def test_a_replica_lost_after_a_green_commit_is_resumed_from_it_and_a_dependent_starts_elsewhere_at_its_parents_result(
        replica, crd_installed, namespace, origin, tmp_path):
    """r0 runs fo-p, then fo-g and fo-h (on a repository of its own: a push held in a hook
    holds its mirror's lock), whose tests pass: r0 records each green commit in the
    origin (refs/reactor/green/<uid>) and is SIGKILLed while fo-g's push is held before the
    branch moves (the commit reaches no branch) and fo-h's after (it landed; no verdict was
    written). r1 (its own volume: none of r0's mirror) adopts fo-g and starts a fresh session
    from its recorded commit (tested again, one push), finds fo-h's push landed (no cell, no
    second push), and runs fo-d, which depends on fo-p, at the result commit r0 pushed for fo-p."""
    hold, other = BranchPushHold(origin), make_repo(tmp_path / "origin-h")
    hold_h = BranchPushHold(other)
    main = git(origin, "rev-parse", "main")
    scenarios = [Scenario(RESUMED, [text("The change is complete; nothing is missing.")]),  # first match wins
                 *[Scenario(f"{name}:", [FIX, text("Fixed.")]) for name in ("fo-p", "fo-g", "fo-h")],
                 Scenario("fo-d:", [write("NOTES.md", "add() adds since fo-p\n"), text("Noted.")])]
    with ScriptedModel(scenarios) as model:
        r0 = replica(0, "--max-agents=2")
        apply_all(crd_installed, namespace, [manifest("fo-p", origin, model)])
        parent = wait_until(lambda: (all_terminal(crd_installed, namespace, 1) or {}).get("fo-p"), 240, "fo-p done",
                            r0.log)
        hold.hold("reactor/fo-g")
        hold_h.hold("reactor/fo-h", landed=True)
        apply_all(crd_installed, namespace, [manifest("fo-g", origin, model), manifest("fo-h", other, model)])
        wait_until(lambda: hold.arrived("reactor/fo-g") and hold_h.arrived("reactor/fo-h"), 300, "both pushes held",
                   r0.log)
        child = manifest("fo-d", origin, model)
        child["spec"]["dependsOn"] = ["fo-p"]
        apply_all(crd_installed, namespace, [child])  # r0's two slots are fo-g's and fo-h's: it waits
        lost = tasks(crd_installed, namespace)
        green_refs = {n: f"refs/reactor/green/{lost[n]['metadata']['uid']}" for n in ("fo-g", "fo-h")}
        recorded = ref_of(origin, green_refs["fo-g"])
        kill_pod(r0)
        hold.release("reactor/fo-g")
        hold_h.release("reactor/fo-h")
        assert recorded and not ref_of(origin, "refs/heads/reactor/fo-g"), "recorded, pushed to no branch"
        landed = lost["fo-h"]["status"]["result"]["commit"]
        assert ref_of(other, "refs/heads/reactor/fo-h") == landed, "fo-h's push landed before r0 died"
        r1 = replica(1, "--max-agents=1")
        objs = wait_until(lambda: all_terminal(crd_installed, namespace, 4), 400, "all terminal", r1.log)
        requests = model.requests

    assert {n: o["status"]["phase"] for n, o in objs.items()} == dict.fromkeys(objs, "Succeeded"), \
        {n: o["status"].get("message") for n, o in objs.items()}
    # The lost run had committed and recorded G; its status named it at Pushing.
    assert lost["fo-g"]["status"]["phase"] == "Pushing" and lost["fo-g"]["status"]["result"]["commit"] == recorded
    status = objs["fo-g"]["status"]
    result = status["result"]
    assert status["claim"]["replica"] == "r1" and status["attempts"] == 2
    assert result["resumed"] == "restarted" and result["resumedFrom"] == recorded
    assert f"resumed from {recorded[:12]}" in status["message"] and "tokens" in status["message"]
    # One commit on the start, holding what was tested: G's change (the agent added nothing).
    assert result["startCommit"] == main and git(origin, "rev-parse", f"{result['commit']}^") == main
    assert git(origin, "rev-parse", f"{result['commit']}^{{tree}}") == git(origin, "rev-parse", f"{recorded}^{{tree}}")
    assert pushes(origin, "reactor/fo-g") == [result["commit"]], "one push: the adopter's"
    wait_until(lambda: not ref_of(origin, green_refs["fo-g"]) and not ref_of(other, green_refs["fo-h"]), 30,
               "the records deleted once the verdicts are written")
    # fo-h: its push had landed; the adopter resumed at the push, which found it there.
    landed_status = objs["fo-h"]["status"]
    assert landed_status["claim"]["replica"] == "r1" and landed_status["result"]["commit"] == landed
    assert landed_status["result"]["pushed"] is True and pushes(other, "reactor/fo-h") == [landed], "pushed once"
    # Counted with the model: the adopter's one fresh session had one turn, from a prompt
    # naming the recorded commit and its files; no tool call of the lost run was made again.
    resumed = [r for r in requests if r.get("scenario") == RESUMED]
    assert len({r["workdir"] for r in resumed}) == 1 and len(resumed) == 1, len(resumed)
    assert recorded[:12] in first_prompt(resumed[0]) and "calc.py" in first_prompt(resumed[0])
    lost_run = [r for r in requests if r.get("scenario") == "fo-g:"]
    adopters = [r for r in requests if r.get("scenario") in ("fo-g:", "fo-h:")
                and (r["workdir"] or "").startswith(str(r1.work_dir.resolve()))]
    assert lost_run and not adopters, "the adopter ran neither task again from its prompt"
    # fo-d: claimed by another replica than its parent, at the parent's result commit (pushed by r0).
    assert parent["status"]["claim"]["replica"] == "r0" and objs["fo-d"]["status"]["claim"]["replica"] == "r1"
    child = objs["fo-d"]["status"]["result"]
    assert child["startCommit"] == parent["status"]["result"]["commit"]
    assert git(origin, "rev-parse", f"{child['commit']}^") == parent["status"]["result"]["commit"]
    print(f"\nfailover from a green commit: the adopter made {len(resumed)} model call(s), "
          f"the lost run {len(lost_run)}; status: {status['message']}")


def ref_of(repo: Path, name: str) -> str:
    """The commit ``name`` names in ``repo``; empty when there is no such ref."""
    return subprocess.run(["git", "rev-parse", "--verify", "--quiet", name], cwd=repo, capture_output=True,
                          text=True).stdout.strip()


def lease_holder(cluster, namespace: str, replica: str) -> str | None:
    out = cluster.kubectl("get", "-n", namespace, "lease", f"reactor-replica-{replica}", "-o", "json")
    return json.loads(out.stdout)["spec"].get("holderIdentity") if out.returncode == 0 else None


def test_a_replica_that_slept_through_its_lease_stops_its_cells_and_changes_nothing(replica, crd_installed, namespace,
                                                                                     origin):
    replicas = {"r0": replica(0, "--max-agents=1"), "r1": replica(1, "--max-agents=1")}
    with ScriptedModel([Scenario("nap:", [FIX, text("Fixed.")])], latency=4.0) as model:
        apply_all(crd_installed, namespace, [manifest("nap", origin, model)])
        # Whichever replica claims it is frozen mid-turn (the model holds its answer for 4 s).
        obj = wait_until(lambda: (lambda o: o if (o.get("status") or {}).get("phase") == "Executing" else None)(
            tasks(crd_installed, namespace).get("nap") or {}), 120, "Executing",
            lambda: "\n".join(r.log() for r in replicas.values()) + json.dumps((tasks(crd_installed, namespace).get("nap") or {}).get("status"), indent=1))
        holder = obj["status"]["claim"]["replica"]
        adopter_id = "r1" if holder == "r0" else "r0"
        frozen, adopter = replicas[holder], replicas[adopter_id]
        assert find_marked_processes(str(frozen.work_dir.resolve())), "the frozen replica has a live cell"
        incarnation = lease_holder(crd_installed, namespace, holder)
        os.kill(frozen.process.pid, signal.SIGSTOP)
        try:
            done = wait_until(lambda: (all_terminal(crd_installed, namespace, 1) or {}).get("nap"), 180,
                              "adopted and finished", adopter.log)
        finally:
            os.kill(frozen.process.pid, signal.SIGCONT)
        woke = time.monotonic()
        # On waking it finds it missed its Lease: it fences itself (kills its cells, drops its
        # runs without a word to the API server), then rejoins under a new incarnation.
        wait_until(lambda: lease_holder(crd_installed, namespace, holder) not in (incarnation, None), 30,
                   "the woken replica rejoined", frozen.log)
        rejoined = time.monotonic() - woke
        final = tasks(crd_installed, namespace)["nap"]
        left = find_marked_processes(str(frozen.work_dir.resolve()))

    assert done["status"]["phase"] == "Succeeded" and done["status"]["claim"]["replica"] == adopter_id
    assert not left, f"the woken replica's cells still run: {left}"
    assert final["status"] == done["status"], "the woken replica wrote nothing"
    assert pushes(origin, "reactor/nap") == [done["status"]["result"]["commit"]], "one push: the adopter's"
    assert "fenced" in frozen.log()
    print(f"\nSIGCONT -> the stale replica fenced and rejoined: {rejoined:.2f}s")


def test_memory_admission_keeps_cells_within_a_small_simulated_limit(crd_installed, namespace, origin, tmp_path):
    """--memory-limit 1550Mi with cells estimated at 600Mi: the operator (~100 MiB) plus two
    cells (their peaks reserved) fit, a third does not, although --max-agents allows 6 (all
    three tasks arrive at once: without admission all three would talk to the model at once)."""
    work = tmp_path / "work"
    names = [f"m{i}" for i in range(3)]
    with operators(crd_installed, namespace, work) as start, \
            ScriptedModel([Scenario(f"{n}:", [FIX, text("Fixed.")]) for n in names], latency=LATENCY) as model:
        op = start("--max-agents=6", "--memory-limit=1550Mi", "--cell-memory=600Mi", "--health-timeout=90s")
        apply_all(crd_installed, namespace, [manifest(n, origin, model) for n in names])
        reasons: set[str] = set()

        def finished():
            objs = tasks(crd_installed, namespace)
            for obj in objs.values():
                for condition in (obj.get("status") or {}).get("conditions") or []:
                    reasons.add(condition.get("reason"))
            return all_terminal(crd_installed, namespace, len(names))

        objs = wait_until(finished, 400, "all terminal", op.log)
        talks = conversations(model.requests)
        leaked = find_marked_processes(str(work.resolve()))
    assert not leaked
    assert {o["status"]["phase"] for o in objs.values()} == {"Succeeded"}, \
        {n: o["status"].get("message") for n, o in objs.items()}
    at_once = most_at_once([span for cells in talks.values() for span in cells.values()])
    assert 1 <= at_once <= 2, at_once
    assert "WaitingForMemory" in reasons, reasons
    print(f"\nmemory limit 1550Mi, cells 600Mi: at most {at_once} cells at once of max-agents 6")
