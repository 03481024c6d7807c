"""Throughput of 1, 2 and 3 operator replicas (`reactor operator --fleet`) at equal --max-agents,
and failover time, in the same run on one local control plane.

The scripted model answers after a fixed latency (a real model takes seconds per turn), so a
task's time is mostly waiting for the model, as in real use, and the run is bound by how many
cells are alive, not by this machine's cores. Each configuration runs the same number of
waves (tasks = waves x replicas x max-agents).

  throughput(N) / (N x throughput(1))   goal >= 0.85
  failover: a replica killed (operator and cells, as a pod) -> its tasks claimed elsewhere,
            and -> running again elsewhere (Executing)

    python bench/fleet_throughput.py [--replicas 1,2,3] [--max-agents 2] [--waves 3] [--latency 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

from reactor_dev.devcluster.controlplane import ControlPlane
from reactor_dev.testing.fleet import all_terminal, apply_all, fix_task, fleet_args, kill_pod, tasks, wait_until
from reactor_dev.testing.operator_process import operators
from reactor_dev.testing.helpers import install_crds
from reactor_dev.testing.repos import make_repo
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, text

ROOT = Path(__file__).resolve().parents[1]
FIX = edit("calc.py", "return a - b", "return a + b")


def namespace(cluster) -> str:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    out = cluster.kubectl("create", "namespace", name)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return name


def run_fleet(cluster, tmp: Path, replicas: int, max_agents: int, waves: int, latency: float, lease: float) -> dict:
    ns = namespace(cluster)
    origin = make_repo(tmp / f"origin-{replicas}")
    names = [f"b{i:03d}" for i in range(waves * replicas * max_agents)]
    with ScriptedModel([Scenario(f"{n}:", [FIX, text("Fixed.")]) for n in names], latency=latency) as model, \
            operators(cluster, ns, tmp / f"unused-{replicas}") as start:
        procs = [start(*fleet_args(i, ns, lease, f"--max-agents={max_agents}"), work_dir=tmp / f"r{replicas}-{i}")
                 for i in range(replicas)]
        began = time.monotonic()
        apply_all(cluster, ns, [fix_task(n, origin, model.opencode_config()) for n in names])
        objs = wait_until(lambda: all_terminal(cluster, ns, len(names)), 3600, "all terminal",
                          lambda: "\n".join(p.log() for p in procs))
        took = time.monotonic() - began
    succeeded = sum(o["status"]["phase"] == "Succeeded" for o in objs.values())
    return {"replicas": replicas, "tasks": len(names), "seconds": took, "succeeded": succeeded,
            "throughput": len(names) / took * 60}


def failover(cluster, tmp: Path, max_agents: int, latency: float, lease: float) -> dict:
    ns = namespace(cluster)
    origin = make_repo(tmp / "origin-failover")
    names = [f"f{i:02d}" for i in range(3 * max_agents)]
    with ScriptedModel([Scenario(f"{n}:", [FIX, text("Fixed.")]) for n in names], latency=latency) as model, \
            operators(cluster, ns, tmp / "unused-failover") as start:
        procs = [start(*fleet_args(i, ns, lease, f"--max-agents={max_agents}"), work_dir=tmp / f"failover-{i}")
                 for i in range(3)]
        apply_all(cluster, ns, [fix_task(n, origin, model.opencode_config()) for n in names])

        def victim_busy():
            objs = tasks(cluster, ns)
            held = [n for n, o in objs.items() if (o.get("status") or {}).get("phase") == "Executing"
                    and o["status"]["claim"]["replica"] == "r1"]
            return held if len(held) == max_agents else None

        held = wait_until(victim_busy, 600, "r1 busy")
        kill_pod(procs[1])
        killed = time.monotonic()

        def moved(phases: tuple[str, ...]):
            objs = tasks(cluster, ns)
            return all(((objs[n].get("status") or {}).get("claim") or {}).get("replica") not in ("r1", None)
                       and objs[n]["status"]["phase"] in phases for n in held)

        wait_until(lambda: moved(("Bootstrapping", "Executing", "Testing", "Committing", "TearingDown", "Succeeded")),
                   120, "claimed elsewhere")
        claimed = time.monotonic() - killed
        wait_until(lambda: moved(("Executing", "Testing", "Committing", "TearingDown", "Succeeded")), 120,
                   "running elsewhere")
        running = time.monotonic() - killed
        objs = wait_until(lambda: all_terminal(cluster, ns, len(names)), 1200, "all terminal")
    return {"held": len(held), "claimed": claimed, "running": running,
            "succeeded": sum(o["status"]["phase"] == "Succeeded" for o in objs.values()), "tasks": len(names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="1,2,3")
    parser.add_argument("--max-agents", type=int, default=2)
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--latency", type=float, default=8.0, help="seconds per model answer")
    parser.add_argument("--lease", type=float, default=15.0, help="--lease-duration of the replicas")
    args = parser.parse_args()
    counts = [int(n) for n in args.replicas.split(",")]
    with tempfile.TemporaryDirectory(prefix="reactor-fleet-bench-") as tmp_text, ControlPlane() as cluster:
        tmp = Path(tmp_text)
        install_crds(cluster)
        print(f"model latency {args.latency:g}s/answer, --max-agents={args.max_agents} per replica, "
              f"{args.waves} waves, Lease {args.lease:g}s", flush=True)
        rows = []
        for count in counts:
            row = run_fleet(cluster, tmp, count, args.max_agents, args.waves, args.latency, args.lease)
            rows.append(row)
            print(f"  {count} replica(s): {row['tasks']} tasks in {row['seconds']:.1f}s "
                  f"({row['succeeded']} succeeded), {row['throughput']:.1f} tasks/min", flush=True)
        base = rows[0]["throughput"] / rows[0]["replicas"]
        print(f"\n{'replicas':>8}{'tasks/min':>11}{'vs linear':>11}")
        for row in rows:
            print(f"{row['replicas']:>8}{row['throughput']:>11.1f}{row['throughput'] / (base * row['replicas']):>11.2f}")
        print("goal: >= 0.85 x linear")
        result = failover(cluster, tmp, args.max_agents, args.latency, args.lease)
        print(f"\nfailover (3 replicas, Lease {args.lease:g}s): replica killed with {result['held']} task(s) -> "
              f"claimed elsewhere {result['claimed']:.1f}s, running elsewhere {result['running']:.1f}s; "
              f"{result['succeeded']}/{result['tasks']} succeeded")
        print(json.dumps({"throughput": rows, "failover": result}))


if __name__ == "__main__":
    sys.exit(main())
