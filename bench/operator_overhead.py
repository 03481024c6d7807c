"""Operator figures, measured against `reactor run` in the same run.

  - latency from `kubectl apply` (an API create) to status phase Bootstrapping;
  - the operator's overhead per task: apply -> Succeeded against `reactor run` of the same
    task (a subprocess, wall clock), interleaved, median ratio;
  - operator memory (RSS of the operator process alone, servers excluded) idle and at the
    peak of 10 concurrent tasks.

Goals: apply-to-Bootstrapping < 1 s; overhead < 10 %.

    python bench/operator_overhead.py [--rounds 3] [--concurrent 10]
"""

from __future__ import annotations

import argparse
from collections import Counter
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kubernetes
import psutil

ROOT = Path(__file__).resolve().parents[1]

from reactor_dev.devcluster.controlplane import ControlPlane  # noqa: E402
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, text  # noqa: E402
from reactor_dev.testing.operator_process import OperatorProcess  # noqa: E402
from reactor_dev.testing.helpers import install_crds  # noqa: E402
from reactor_dev.testing.repos import make_repo  # noqa: E402


FIX = edit("calc.py", "return a - b", "return a + b")


def manifest(name: str, repo: Path, config: dict) -> str:
    return json.dumps({
        "apiVersion": "reactor.dev/v1alpha1", "kind": "AgentTask", "metadata": {"name": name},
        "spec": {"prompt": f"{name}: fix add", "repository": {"url": f"file://{repo}"}, "resultBranch": f"reactor/{name}",
                 "test": {"command": "python3 -m pytest -q"}, "agent": {"config": config}, "timeout": "5m"},
    })


def status_reader(cluster):
    """Reads a task's status through the Python client: polling with kubectl would start a
    process every few milliseconds and load the very machine being measured."""
    api = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(str(cluster.kubeconfig_path)))

    def read(ns: str, name: str) -> dict:
        try:
            return api.get_namespaced_custom_object("reactor.dev", "v1alpha1", ns, "agenttasks", name).get("status") or {}
        except kubernetes.client.ApiException:
            return {}
    return read


def operator_task(op: OperatorProcess, ns: str, name: str, repo: Path, config: dict) -> tuple[float, float]:
    """(apply -> Bootstrapping, apply -> terminal) in seconds."""
    read = status_reader(op.cluster)
    start = time.perf_counter()
    op.cluster.kubectl("create", "-n", ns, "-f", "-", input=manifest(name, repo, config))
    booted = None
    while True:
        status = read(ns, name)
        phase = status.get("phase")
        if booted is None and phase not in (None, "Pending"):
            booted = time.perf_counter() - start
        if phase in ("Succeeded", "Failed"):
            assert phase == "Succeeded", status
            return booted or 0.0, time.perf_counter() - start
        time.sleep(0.01)


def cli_task(work: Path, name: str, repo: Path, config_path: Path) -> float:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "reactor.cli", "run", "--task", name, "--prompt", f"{name}: fix add",
                          "--repo", str(repo), "--test-cmd", "python3 -m pytest -q", "--opencode-config",
                          str(config_path), "--work-dir", str(work), "--port-range", "18700-18800"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reactor-bench-op-") as tmp_text, ControlPlane() as cluster:
        tmp = Path(tmp_text)
        install_crds(cluster)
        cluster.kubectl("create", "namespace", "bench")
        repo = make_repo(tmp / "app")
        names = [f"op-{i}" for i in range(args.rounds)] + [f"cli-{i}" for i in range(args.rounds)] + \
                [f"many-{i}" for i in range(args.concurrent)]
        with ScriptedModel([Scenario(f"{n}:", [FIX, text("Fixed.")]) for n in names]) as model:
            config = model.opencode_config()
            config_path = tmp / "opencode.json"
            config_path.write_text(json.dumps(config))
            (tmp / "op-work").mkdir()
            op = OperatorProcess(cluster, "bench", tmp / "op-work", "--max-agents", str(args.concurrent)).start()
            try:
                operator_proc = psutil.Process(op.process.pid)
                time.sleep(2.0)  # settle before sampling idle memory (measurement, not synchronisation)
                idle_rss = operator_proc.memory_info().rss
                boots, op_times, cli_times = [], [], []
                for i in range(args.rounds):  # interleaved so load drift hits both sides
                    cli_times.append(cli_task(tmp / "cli-work", f"cli-{i}", repo, config_path))
                    boot, total = operator_task(op, "bench", f"op-{i}", repo, config)
                    boots.append(boot)
                    op_times.append(total)

                for i in range(args.concurrent):
                    cluster.kubectl("create", "-n", "bench", "-f", "-", input=manifest(f"many-{i}", repo, config))
                peak = idle_rss
                read = status_reader(cluster)
                while True:
                    peak = max(peak, operator_proc.memory_info().rss)
                    phases = [read("bench", f"many-{i}").get("phase") for i in range(args.concurrent)]
                    if all(p in ("Succeeded", "Failed") for p in phases):
                        break
                    time.sleep(0.05)
            finally:
                cluster.kubectl("delete", "agenttasks", "--all", "-n", "bench", "--timeout=60s")
                op.stop()

    med = statistics.median
    print(f"\nOperator vs `reactor run` (median of {args.rounds}, interleaved, same task)")
    print(f"apply -> Bootstrapping        {med(boots):7.3f} s   (all: {', '.join(f'{b:.2f}' for b in boots)}; goal < 1 s)")
    print(f"operator apply -> Succeeded   {med(op_times):7.3f} s")
    print(f"reactor run (CLI process)     {med(cli_times):7.3f} s")
    print(f"operator / reactor run        {med(op_times) / med(cli_times):7.3f}     (goal <= 1.10)")
    print(f"operator RSS idle             {idle_rss / 2**20:7.1f} MiB")
    print(f"operator RSS, {args.concurrent} tasks (peak) {peak / 2**20:7.1f} MiB   (servers not included)")
    print(f"final phases of the {args.concurrent} concurrent tasks: {dict(Counter(phases))}")


if __name__ == "__main__":
    main()
