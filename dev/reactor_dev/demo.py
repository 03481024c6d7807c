"""The offline demo (`make demo` / `python -m reactor_dev.demo`): the whole product on one
machine, with no cluster and no API key.

It starts a local control plane (etcd + kube-apiserver), installs the CRD, runs the
operator, makes a small repository whose test fails, applies an AgentTask whose agent (the
real OpenCode server, driven by the scripted model) fixes it, follows the task's phases,
shows `kubectl get agenttasks` and the result branch's commit, then tears everything down.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path


from reactor_dev.devcluster.controlplane import ControlPlane
from reactor_dev.testing.operator_process import OperatorProcess
from reactor_dev.testing.repos import git, make_repo
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, text

def say(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reactor_dev.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--crd", type=Path, default=Path("crds"), help="the CRD directory (AgentTask, SpendLimit)")
    parser.add_argument("--keep", action="store_true", help="keep the demo's temporary directory")
    args = parser.parse_args(argv)
    if not (args.crd / "kustomization.yaml").is_file():
        parser.error(f"{args.crd} not found: run the demo from the repository root (make demo)")

    with ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="reactor-demo-"))
        if not args.keep:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)

        say("Starting a local Kubernetes control plane (etcd + kube-apiserver)")
        started = time.monotonic()
        cluster = stack.enter_context(ControlPlane())
        print(f"    API server {cluster.server_url} ready in {time.monotonic() - started:.1f}s")
        kubectl = cluster.kubectl

        say("Installing the CRDs (AgentTask, SpendLimit)")
        for step in (("apply", "--server-side", "-k", str(args.crd)),
                     ("wait", "--for=condition=Established", "--timeout=60s", "crd/agenttasks.reactor.dev",
                      "crd/spendlimits.reactor.dev"),
                     ("create", "namespace", "demo")):
            out = kubectl(*step)
            if out.returncode != 0:
                raise SystemExit(f"kubectl {' '.join(step)} failed: {out.stderr}")
            print("    " + out.stdout.strip())

        say("Starting the scripted model (an OpenAI-compatible server on 127.0.0.1)")
        model = stack.enter_context(ScriptedModel([
            Scenario("fix-calc:", [edit("calc.py", "return a - b", "return a + b"), text("Fixed add(): it subtracted.")]),
        ]))
        print(f"    {model.base_url}")

        repo = make_repo(tmp / "app")
        say(f"A repository whose test fails: {repo}")
        failing = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=repo, capture_output=True, text=True)
        print("    " + (failing.stdout.strip().splitlines() or ["?"])[-1])

        say("Starting the operator (reactor operator)")
        (tmp / "work").mkdir()
        operator = OperatorProcess(cluster, "demo", tmp / "work")
        stack.callback(operator.stop)
        operator.start()
        print(f"    pid {operator.process.pid}, log {operator.log_path}")

        say("kubectl apply -f task.yaml")
        task = {
            "apiVersion": "reactor.dev/v1alpha1", "kind": "AgentTask",
            "metadata": {"name": "fix-calc", "namespace": "demo"},
            "spec": {
                "description": "Fix add()",
                "prompt": "fix-calc: the test in test_calc.py fails; fix add() in calc.py.",
                "repository": {"url": f"file://{repo}", "branch": "main"},
                "test": {"command": "python3 -m pytest -q"},
                "agent": {"config": model.opencode_config()},
                "timeout": "5m",
            },
        }
        print("    " + kubectl("apply", "-f", "-", input=json.dumps(task)).stdout.strip())

        say("Following the task")
        seen, final = None, None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            out = kubectl("get", "-n", "demo", "agenttask", "fix-calc", "-o", "json")
            status = json.loads(out.stdout).get("status", {}) if out.returncode == 0 else {}
            phase = status.get("phase")
            if phase and phase != seen:
                print(f"    {phase:<13} {status.get('message', '')}", flush=True)
                seen = phase
            if phase in ("Succeeded", "Failed"):
                final = status
                break
            time.sleep(0.1)
        if final is None:
            raise SystemExit(f"the task did not finish in time; operator log:\n{operator.log()}")

        say("kubectl get agenttasks -n demo -o wide")
        print(kubectl("get", "agenttasks", "-n", "demo", "-o", "wide").stdout)
        if final["phase"] == "Succeeded":
            say("The result branch in the repository (main is unchanged)")
            print(git(repo, "log", "--stat", "-1", "reactor/fix-calc"))
            print(git(repo, "log", "--oneline", "main"))
        say("Tearing down (operator, model, control plane)")
        return 0 if final["phase"] == "Succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
