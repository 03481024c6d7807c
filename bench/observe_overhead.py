"""What live progress costs the operator, measured in the same run.

The same 10 concurrent tasks (each agent: 8 model steps, 0.5 s apart, then a fix) run
twice under a real operator process: once with live progress written (status.progress at
most every 2 s, the default), once with it off (``--progress-interval 0``). Both follow
every cell's ``GET /event`` (stall detection, permission refusal and budgets need it) and
keep transcripts and metrics. Reported: the operator process's CPU seconds (user+system,
its own threads only: the cells are other processes), its peak RSS, and the status
writes per task (from its /metrics).

    python bench/observe_overhead.py [--tasks 10]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import kubernetes
import psutil

ROOT = Path(__file__).resolve().parents[1]

from reactor_dev.devcluster.controlplane import ControlPlane  # noqa: E402
from reactor_dev.testing.operator_process import OperatorProcess, free_port  # noqa: E402
from reactor_dev.testing.helpers import install_crds  # noqa: E402
from reactor_dev.testing.repos import make_repo  # noqa: E402
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, text, write  # noqa: E402

os.environ.setdefault("REACTOR_OPENCODE_CACHE", str(Path.home() / ".cache" / "reactor-tests" / "opencode"))
# Ten servers starting at once on 2 cores can take longer than the default 10 s.
os.environ.setdefault("REACTOR_HEALTH_TIMEOUT", "60")
FIX = edit("calc.py", "return a - b", "return a + b")


def scenario(name: str) -> Scenario:
    return Scenario(f"{name}:", [write(f"notes/{i}.txt", f"{i}\n", delay=0.5) for i in range(8)] + [FIX, text("Fixed.")])


def manifest(name: str, repo: Path, config: dict) -> str:
    return json.dumps({
        "apiVersion": "reactor.dev/v1alpha1", "kind": "AgentTask", "metadata": {"name": name},
        "spec": {"prompt": f"{name}: fix add", "repository": {"url": f"file://{repo}"}, "resultBranch": f"reactor/{name}",
                 "test": {"command": "python3 -m pytest -q"}, "agent": {"config": config}, "timeout": "10m"},
    })


def run_fleet(cluster, tmp: Path, label: str, follow: bool, tasks: int, repo: Path, model: ScriptedModel) -> dict:
    ns = f"bench-{label}"
    cluster.kubectl("create", "namespace", ns)
    work = tmp / f"work-{label}"
    work.mkdir()
    web_port = free_port()
    op = OperatorProcess(cluster, ns, work, "--max-agents", str(tasks), "--web", f"127.0.0.1:{web_port}",
                         "--progress-interval", "2s" if follow else "0").start()
    api = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(str(cluster.kubeconfig_path)))
    names = [f"{label}-{i}" for i in range(tasks)]
    try:
        proc = psutil.Process(op.process.pid)
        cpu_before = sum(proc.cpu_times()[:2])
        started = time.monotonic()
        for name in names:
            cluster.kubectl("create", "-n", ns, "-f", "-", input=manifest(name, repo, model.opencode_config()))
        peak, phases, statuses = proc.memory_info().rss, {}, {}
        while True:
            peak = max(peak, proc.memory_info().rss)
            statuses = {n: api.get_namespaced_custom_object("reactor.dev", "v1alpha1", ns, "agenttasks", n)
                        .get("status") or {} for n in names}
            phases = {n: s.get("phase") for n, s in statuses.items()}
            if all(p in ("Succeeded", "Failed") for p in phases.values()):
                break
            time.sleep(0.2)
        wall = time.monotonic() - started
        cpu = sum(proc.cpu_times()[:2]) - cpu_before
        metrics = httpx.get(f"http://127.0.0.1:{web_port}/metrics", timeout=5).text
        patches = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("reactor_status_patches_total{"))
    finally:
        cluster.kubectl("delete", "agenttasks", "--all", "-n", ns, "--timeout=120s")
        op.stop()
    failures = sorted({s.get("message", "")[:200] for s in statuses.values() if s.get("phase") != "Succeeded"})
    return {"cpu": cpu, "peak": peak, "wall": wall, "patches": patches / tasks,
            "succeeded": sum(p == "Succeeded" for p in phases.values()), "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reactor-bench-obs-") as tmp_text, ControlPlane() as cluster:
        tmp = Path(tmp_text)
        install_crds(cluster)
        repo = make_repo(tmp / "app")
        labels = ("streamed", "plain")
        with ScriptedModel([scenario(f"{label}-{i}") for label in labels for i in range(args.tasks)]) as model:
            streamed = run_fleet(cluster, tmp, "streamed", True, args.tasks, repo, model)
            plain = run_fleet(cluster, tmp, "plain", False, args.tasks, repo, model)
    print(f"\nOperator with {args.tasks} live cells: live progress written vs off (same tasks, same run)")
    print(f"{'':28}{'progress':>12}{'off':>14}{'ratio':>8}")
    print(f"{'operator CPU (s)':28}{streamed['cpu']:12.2f}{plain['cpu']:14.2f}{streamed['cpu'] / plain['cpu']:8.2f}")
    print(f"{'operator peak RSS (MiB)':28}{streamed['peak'] / 2**20:12.1f}{plain['peak'] / 2**20:14.1f}"
          f"{streamed['peak'] / plain['peak']:8.2f}")
    print(f"{'wall clock (s)':28}{streamed['wall']:12.1f}{plain['wall']:14.1f}{streamed['wall'] / plain['wall']:8.2f}")
    print(f"{'status writes per task':28}{streamed['patches']:12.1f}{plain['patches']:14.1f}")
    print(f"succeeded: {streamed['succeeded']}/{args.tasks} with progress, {plain['succeeded']}/{args.tasks} off")
    for failure in streamed["failures"] + plain["failures"]:
        print(f"  failed: {failure}")


if __name__ == "__main__":
    sys.exit(main())
