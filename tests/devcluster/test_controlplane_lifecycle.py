"""Starting and stopping control planes of our own: nothing may outlive them."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import kubernetes
import psutil
import pytest
from kubernetes.client import ApiException
from reactor_dev.devcluster import cli
from reactor_dev.devcluster.assets import ETCD_VERSION, KUBERNETES_VERSION, Assets
from reactor_dev.devcluster.controlplane import ControlPlane, ControlPlaneError, use_existing_cluster

pytestmark = [
    pytest.mark.kube,
    pytest.mark.skipif(use_existing_cluster(), reason="starts its own control planes: not with USE_EXISTING_CLUSTER"),
]


def alive(pid: int, created: float) -> bool:
    """The very process is still there (a PID reused since does not count)."""
    try:
        process = psutil.Process(pid)
        return process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(text in arg for arg in process.info["cmdline"] or ()):
            found.append(process)
    return found


def test_start_serves_the_pinned_versions_and_stop_leaves_nothing(kube_assets: Assets, tmp_path: Path):
    plane = ControlPlane(kube_assets, temp_root=tmp_path)
    with plane:
        work_dir = plane.work_dir
        identities = {name: (pid, psutil.Process(pid).create_time()) for name, pid in plane.pids.items()}
        assert {psutil.Process(pid).name() for pid, _ in identities.values()} == {"etcd", "kube-apiserver"}
        assert work_dir.is_dir() and plane.kubeconfig_path.is_file()
        for pid, _ in identities.values():
            assert os.getpgid(pid) == pid  # each leads its own process group

        version = plane.kubectl("version", "--output=json")
        assert version.returncode == 0, version.stderr
        versions = json.loads(version.stdout)
        assert versions["clientVersion"]["gitVersion"] == KUBERNETES_VERSION
        assert versions["serverVersion"]["gitVersion"] == KUBERNETES_VERSION
        etcd = subprocess.run([str(kube_assets.etcd), "--version"], capture_output=True, text=True, check=True)
        assert f"etcd Version: {ETCD_VERSION.removeprefix('v')}" in etcd.stdout

    assert not any(alive(*identity) for identity in identities.values())
    assert not work_dir.exists()
    assert list(tmp_path.iterdir()) == []
    plane.stop()  # idempotent


def test_a_failed_start_reports_the_log_and_leaves_nothing(kube_assets: Assets, tmp_path: Path):
    plane = ControlPlane(kube_assets, temp_root=tmp_path, apiserver_args=["--no-such-flag=1"])
    with pytest.raises(ControlPlaneError) as caught:
        plane.start()
    assert "kube-apiserver exited" in str(caught.value)
    assert "unknown flag: --no-such-flag" in str(caught.value)  # the tail of its own log
    assert processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


def test_kubeconfig_for_a_service_account_gets_only_its_rbac(kube_assets, control_plane, kube_api, namespace, tmp_path):
    user = f"system:serviceaccount:{namespace}:robot"
    path = control_plane.kubeconfig_for(
        user, ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"], tmp_path / "robot.kubeconfig"
    )
    whoami = subprocess.run(
        [str(kube_assets.kubectl), "--kubeconfig", str(path), "auth", "whoami", "--output=json"],
        capture_output=True, text=True, env={"KUBECACHEDIR": str(tmp_path / "cache")},
    )
    assert whoami.returncode == 0, whoami.stderr
    assert json.loads(whoami.stdout)["status"]["userInfo"]["username"] == user

    robot = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(str(path)))
    with pytest.raises(ApiException) as caught:
        robot.list_namespaced_config_map(namespace)
    assert caught.value.status == 403

    rbac = kubernetes.client.RbacAuthorizationV1Api(kube_api)
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "read-config-maps"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
    })
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "robot-reads-config-maps"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-config-maps"},
        "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": namespace}],
    })
    deadline = time.monotonic() + 30
    while True:  # the authorizer sees new bindings through an informer: poll briefly
        try:
            robot.list_namespaced_config_map(namespace)
            break
        except ApiException as error:
            assert error.status == 403 and time.monotonic() < deadline
            time.sleep(0.05)
    with pytest.raises(ApiException) as caught:
        robot.list_namespaced_secret(namespace)
    assert caught.value.status == 403


def test_dev_cluster_up_status_down(kube_assets: Assets, tmp_path: Path, capsys):
    parser = argparse.ArgumentParser(prog="reactor")
    cli.add_subparser(parser.add_subparsers(dest="command", required=True))
    state_dir = tmp_path / "state"

    def run(*argv: str) -> tuple[int, str]:
        args = parser.parse_args(["dev-cluster", "--state-dir", str(state_dir), *argv])
        code = args.func(args)
        return code, capsys.readouterr().out

    try:
        code, out = run("up")
        assert code == 0
        assert out.strip() == f"export KUBECONFIG={state_dir / 'kubeconfig'}"
        state = json.loads((state_dir / "state.json").read_text())
        daemon = psutil.Process(int((state_dir / "daemon.pid").read_text()))
        watched = [daemon, *(psutil.Process(pid) for pid in state["pids"].values())]

        code, out = run("status")
        assert code == 0 and "running" in out and state["server_url"] in out

        namespaces = subprocess.run(
            [str(kube_assets.kubectl), "--kubeconfig", str(state_dir / "kubeconfig"), "get", "namespace", "default"],
            capture_output=True, text=True, env={"KUBECACHEDIR": str(tmp_path / "cache")},
        )
        assert namespaces.returncode == 0, namespaces.stderr

        assert run("up") == (0, f"export KUBECONFIG={state_dir / 'kubeconfig'}\n")  # already up: reused
        assert json.loads((state_dir / "state.json").read_text())["pid"] == daemon.pid
    finally:
        code, _ = run("down")
    assert code == 0
    assert not state_dir.exists()
    assert not any(process.is_running() and process.status() != psutil.STATUS_ZOMBIE for process in watched)
    assert not Path(state["work_dir"]).exists()
    code, out = run("status")
    assert code == 1 and "not running" in out
    assert run("down")[0] == 0  # nothing to stop is fine
