"""`reactor dev-cluster up --node` / `load` / `down` as a user runs them: a node that runs
pods, and a `down` after which nothing of it is left on the host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from reactor_dev.devcluster.assets import find_kubectl
from reactor_dev.devcluster.hostnode import HostRecord, leftovers

ROOT = Path(__file__).resolve().parents[2]


def reactor(state_dir: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reactor.cli", "dev-cluster", "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, timeout=timeout)


def host_snapshot() -> dict:
    """What a node could leave behind on the host, in forms that compare across runs."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {
        "links": sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()),
        "routes": subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True).stdout,
        "iptables": subprocess.run(["iptables-save"], capture_output=True, text=True).stdout.splitlines()
        if Path("/usr/sbin/iptables-save").exists() else [],
        "netns": sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else None,
        "sysctls": {k: Path("/proc/sys", k).read_text() for k in ("vm/overcommit_memory", "kernel/panic_on_oops")},
        "paths": {p: os.path.exists(p) for p in ("/var/lib/kubelet", "/var/log/containers", "/var/lib/cni",
                                                  "/run/containerd", "/opt/containerd", "/etc/cni/net.d")},
    }


def _comparable_iptables(lines: list[str]) -> list[str]:
    return [line for line in lines if not line.startswith(("#", ":"))]  # counters and dates vary


def test_up_node_runs_pods_and_down_leaves_nothing(tmp_path, operator_image_archive):
    state = tmp_path / "state"
    before = host_snapshot()
    started = time.monotonic()
    up = reactor(state, "up", "--node")
    assert up.returncode == 0, up.stderr
    print(f"\nreactor dev-cluster up --node: {time.monotonic() - started:.1f}s")
    try:
        assert up.stdout.strip() == f"export KUBECONFIG={state.resolve() / 'kubeconfig'}"
        status = reactor(state, "status")
        assert status.returncode == 0 and "running" in status.stdout
        record = HostRecord.load(state / "node-record.json")
        env = {**os.environ, "KUBECONFIG": str(state / "kubeconfig")}
        assert json.loads((state / "state.json").read_text())["node"] is True

        loaded = reactor(state, "load", str(operator_image_archive), "--tag", "docker.io/library/reactor:0.1.0")
        assert loaded.returncode == 0, loaded.stderr
        # A pod runs from the loaded image with no registry: `reactor --version` in it.
        kubectl_bin = str(find_kubectl())
        run = subprocess.run(
            [kubectl_bin, "run", "version", "--image=reactor:0.1.0", "--image-pull-policy=Never", "--restart=Never",
             "--command", "--", "reactor", "--version"], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        waited = subprocess.run([kubectl_bin, "wait", "pod/version", "--for=jsonpath={.status.phase}=Succeeded",
                                 "--timeout=120s"], env=env, capture_output=True, text=True, timeout=150)
        assert waited.returncode == 0, waited.stderr
        logs = subprocess.run([kubectl_bin, "logs", "version"], env=env, capture_output=True, text=True)
        assert logs.stdout.startswith("reactor "), logs.stdout + logs.stderr
    finally:
        stopped = time.monotonic()
        down = reactor(state, "down")
        print(f"reactor dev-cluster down: {time.monotonic() - stopped:.1f}s")
    assert down.returncode == 0, down.stderr
    assert leftovers(record) == []
    assert not state.exists()
    after = host_snapshot()
    # Another checkout's dev node may come or go meanwhile (its veth, the kubelet's paths and
    # sysctls): then only what is ours (leftovers above) can be compared.
    others = {link for link in before["links"] + after["links"] if link.startswith("rnode")} - {record.host_veth}
    if not others:
        assert _comparable_iptables(after.pop("iptables")) == _comparable_iptables(before.pop("iptables"))
        assert after == before
    mine = [p for p in psutil.process_iter(["cmdline"]) if record.work_dir in " ".join(p.info["cmdline"] or [])]
    assert mine == [], mine
