"""`reactor dev-cluster up --node` / `status` / `load` as a user runs them: a node that runs
pods from a loaded image with no registry. (`down`, leaving nothing on the host, is checked
when the node of tests/node stops: conftest.py.)"""

from __future__ import annotations

import json

from reactor_dev.testing.node import IMAGE, dev_cluster
from reactor_dev.testing.tasks import kubectl_ok


def test_up_node_says_how_to_reach_it_and_runs_a_pod_from_the_loaded_image(dev_node):
    state = dev_node.state
    assert dev_node.up.strip() == f"export KUBECONFIG={state.resolve() / 'kubeconfig'}"
    status = dev_cluster(state, "status")
    assert status.returncode == 0 and "running" in status.stdout, status.stdout + status.stderr
    assert json.loads((state / "state.json").read_text())["node"] is True
    # A pod runs from the image `reactor dev-cluster load` put in the node: `reactor --version` in it.
    cluster = dev_node.cluster
    kubectl_ok(cluster, "run", "version", f"--image={IMAGE}", "--image-pull-policy=Never", "--restart=Never",
               "--command", "--", "reactor", "--version")
    try:
        kubectl_ok(cluster, "wait", "pod/version", "--for=jsonpath={.status.phase}=Succeeded", "--timeout=120s",
                   timeout=150)
        logs = kubectl_ok(cluster, "logs", "version")
        assert logs.startswith("reactor "), logs
    finally:
        cluster.kubectl("delete", "pod", "version", "--wait=false")
