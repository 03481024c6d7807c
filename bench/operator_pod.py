"""The operator as a pod on the dev node against the operator as a local process, same run.

  - image: build time (this run: incremental) and size;
  - node: start time (`NodeCluster.start`, to node Ready), image load, apply -k -> available;
  - apply -> Succeeded of the same task, run by the operator pod (its image, its
    ServiceAccount, the pod network) and by `reactor operator` as a local process on the
    same cluster (a namespace of its own), interleaved; median ratio pod / local;
  - the operator pod's memory (the kubelet's working set of the container: the operator
    and every cell in it) idle and with 4 cells mid-turn.

Needs root and `make node` (packages, binaries); builds the image itself.

    python bench/operator_pod.py [--rounds 3] [--cells 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kubernetes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reactor import OPENCODE_VERSION  # noqa: E402
from reactor_dev.devcluster.node import NodeCluster  # noqa: E402
from reactor_dev.testing.operator_process import OperatorProcess  # noqa: E402
from reactor_dev.testing.repos import make_repo  # noqa: E402
from reactor_dev.testing.scripted_model import Scenario, ScriptedModel, edit, hang, text  # noqa: E402

NAMESPACE, LOCAL_NAMESPACE = "reactor-system", "bench-local"
TEST_COMMAND = "python3 -c 'from calc import add; assert add(2, 3) == 5'"
FIX = edit("calc.py", "return a - b", "return a + b")


def kubectl(cluster: NodeCluster, *args: str, input: str | None = None) -> str:
    out = cluster.kubectl(*args, input=input, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)}: {out.stderr}")
    return out.stdout


def manifest(name: str, namespace: str, url: str, config: dict) -> str:
    return json.dumps({
        "apiVersion": "reactor.dev/v1alpha1", "kind": "AgentTask", "metadata": {"name": name, "namespace": namespace},
        "spec": {"prompt": f"{name}: fix add", "repository": {"url": url}, "resultBranch": f"reactor/{name}",
                 "test": {"command": TEST_COMMAND}, "agent": {"config": config}, "timeout": "5m"},
    })


def apply_to_terminal(cluster: NodeCluster, api, namespace: str, name: str, url: str, config: dict) -> float:
    start = time.perf_counter()
    kubectl(cluster, "create", "-f", "-", input=manifest(name, namespace, url, config))
    while True:
        try:
            status = api.get_namespaced_custom_object("reactor.dev", "v1alpha1", namespace, "agenttasks", name)
        except kubernetes.client.ApiException:
            status = {}
        phase = (status.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            assert phase == "Succeeded", status["status"]
            return time.perf_counter() - start
        time.sleep(0.02)


def working_set_mib(cluster: NodeCluster) -> float:
    metrics = cluster.kubelet_get("/metrics/resource").text
    for line in metrics.splitlines():
        if line.startswith("container_memory_working_set_bytes{") and 'container="operator"' in line \
                and f'namespace="{NAMESPACE}"' in line:
            return float(line.split()[1]) / 2**20
    raise SystemExit("no working set of the operator container in the kubelet's /metrics/resource")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cells", type=int, default=4)
    args = parser.parse_args()

    started = time.perf_counter()
    built = subprocess.run([str(ROOT / "hack/image/build.sh"), "reactor:0.1.0", OPENCODE_VERSION],
                           capture_output=True, text=True, cwd=ROOT)
    if built.returncode != 0:
        raise SystemExit(built.stderr[-3000:])
    archive = Path(built.stdout.split()[-1])
    print(f"image build (incremental, this run): {time.perf_counter() - started:.1f}s; "
          f"{built.stderr.strip().splitlines()[-1]}")

    cluster = NodeCluster()
    cluster.start()
    local = None
    try:
        print(f"node start -> Ready: {cluster.started_in:.1f}s")
        started = time.perf_counter()
        cluster.load_image(archive, "docker.io/library/reactor:0.1.0")
        print(f"image load into containerd: {time.perf_counter() - started:.1f}s")
        started = time.perf_counter()
        kubectl(cluster, "apply", "-k", str(ROOT / "manifests"))
        kubectl(cluster, "rollout", "status", "-n", NAMESPACE, "deployment/reactor", "--timeout=180s")
        print(f"apply -k manifests/ -> Deployment available: {time.perf_counter() - started:.1f}s")

        model = ScriptedModel(host=cluster.node_ip)  # inside the node's namespace: pods reach it
        cluster.run_in_netns(model.start)
        claim = json.loads(kubectl(cluster, "get", "pvc", "-n", NAMESPACE, "reactor-work", "-o", "json"))
        volume = Path(json.loads(kubectl(cluster, "get", "pv", claim["spec"]["volumeName"], "-o", "json"))
                      ["spec"]["local"]["path"])
        scratch = Path(tempfile.mkdtemp(prefix="bench-pod-"))
        source = make_repo(scratch / "app")
        pod_repo = volume / "repos" / "app.git"
        subprocess.run(["git", "clone", "-q", "--bare", str(source), str(pod_repo)], check=True)
        subprocess.run(["chown", "-R", "10001:10001", str(volume / "repos")], check=True)
        local_repo = scratch / "app.git"
        subprocess.run(["git", "clone", "-q", "--bare", str(source), str(local_repo)], check=True)

        kubectl(cluster, "create", "namespace", LOCAL_NAMESPACE)
        # Ports of its own: other checkouts' tests on this machine use 18500-19000 too.
        local = OperatorProcess(cluster, LOCAL_NAMESPACE, scratch / "work", "--max-agents", "4",
                                "--port-range", "31000-31100")
        (scratch / "work").mkdir()
        local.start()
        api = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(str(cluster.kubeconfig_path)))

        pod_times, local_times = [], []
        for round_ in range(args.rounds + 1):  # round 0 warms both up, not counted
            for where, namespace, url, times in (("pod", NAMESPACE, "file:///var/lib/reactor/repos/app.git", pod_times),
                                                 ("local", LOCAL_NAMESPACE, f"file://{local_repo}", local_times)):
                name = f"{where}-{round_}"
                model.script.add(Scenario(f"{name}:", [FIX, text("Fixed.")]))
                took = apply_to_terminal(cluster, api, namespace, name, url, model.opencode_config())
                if round_:
                    times.append(took)
        pod_median, local_median = statistics.median(pod_times), statistics.median(local_times)
        print(f"apply -> Succeeded, median of {args.rounds}: pod {pod_median:.2f}s, local process "
              f"{local_median:.2f}s, ratio pod/local {pod_median / local_median:.2f} "
              f"(pod {[round(t, 2) for t in pod_times]}, local {[round(t, 2) for t in local_times]})")

        idle = working_set_mib(cluster)
        names = [f"busy-{i}" for i in range(args.cells)]
        for name in names:
            model.script.add(Scenario(f"{name}:", [hang(times=1), FIX, text("Fixed.")]))
            kubectl(cluster, "create", "-f", "-", input=manifest(name, NAMESPACE, "file:///var/lib/reactor/repos/app.git",
                                                                  model.opencode_config()))
        deadline = time.monotonic() + 180
        while len({r.get("scenario") for r in model.requests if r["kind"] == "hang"} & {f"{n}:" for n in names}) \
                < len(names):
            if time.monotonic() > deadline:
                raise SystemExit("the cells did not all reach the model in 180 s")
            time.sleep(0.2)
        samples = []
        for _ in range(4):  # the kubelet's resource metrics are sampled (cAdvisor, ~every 10 s)
            time.sleep(4)
            samples.append(working_set_mib(cluster))
        busy = max(samples)
        print(f"operator pod working set: idle {idle:.0f} MiB, with {args.cells} cells mid-turn {busy:.0f} MiB "
              f"({(busy - idle) / args.cells:.0f} MiB per cell)")
        kubectl(cluster, "delete", "agenttasks", "--all", "-n", NAMESPACE, "--timeout=60s")
        model.stop()
    finally:
        if local is not None:
            cluster.kubectl("delete", "agenttasks", "--all", "-n", LOCAL_NAMESPACE, "--timeout=60s")
            local.stop()
        left = cluster.stop()
        if left:
            print(f"the node left behind: {left}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
