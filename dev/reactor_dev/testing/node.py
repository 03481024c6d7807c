"""Helpers for the tests on a real one-node cluster (tests/node): the operator image, the
`reactor dev-cluster` commands as a user runs them, what a node could leave on the host, and
paths of the operator's volume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from reactor_dev.testing.shipped import ROOT
from reactor_dev.testing.tasks import kubectl_ok

IMAGE = "reactor:0.1.0"
# What `image: reactor:0.1.0` in manifests/deployment.yaml means to the kubelet.
IMAGE_QUALIFIED = "docker.io/library/reactor:0.1.0"
NAMESPACE = "reactor-system"
POD_MOUNT = Path("/var/lib/reactor")  # the operator's volume inside its pod
OPERATOR_UID = 10001


def build_image(opencode_version: str) -> tuple[Path, str, float]:
    """`make image` (hack/image/build.sh): the archive's path, its last line of stderr (what
    was built, or that nothing changed) and the seconds it took. An AssertionError with the
    build's log when it fails."""
    started = time.monotonic()
    out = subprocess.run([str(ROOT / "hack/image/build.sh"), IMAGE, opencode_version],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, f"make image failed:\n{out.stderr[-4000:]}"
    return Path(out.stdout.strip().splitlines()[-1]), out.stderr.strip().splitlines()[-1], time.monotonic() - started


def dev_cluster(state_dir: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`reactor dev-cluster --state-dir STATE_DIR ARGS...`."""
    return subprocess.run([sys.executable, "-m", "reactor.cli", "dev-cluster", "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, timeout=timeout)


def host_snapshot() -> dict:
    """What a node could leave behind on the host, in forms that compare across runs."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {
        "links": sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()),
        "routes": subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True).stdout,
        "iptables": [line for line in subprocess.run(["iptables-save"], capture_output=True, text=True).stdout.splitlines()
                     if not line.startswith(("#", ":"))]  # counters and dates vary
        if Path("/usr/sbin/iptables-save").exists() else [],
        "netns": sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else None,
        "sysctls": {k: Path("/proc/sys", k).read_text() for k in ("vm/overcommit_memory", "kernel/panic_on_oops")},
        "paths": {p: os.path.exists(p) for p in ("/var/lib/kubelet", "/var/log/containers", "/var/lib/cni",
                                                  "/run/containerd", "/opt/containerd", "/etc/cni/net.d")},
    }


def get_json(cluster, *args: str) -> dict:
    return json.loads(kubectl_ok(cluster, "get", *args, "-o", "json"))


def host_path(volume: Path, pod_path: str) -> Path:
    """Where a path of the operator's volume (as the pod sees it) is on this host."""
    return volume / Path(pod_path).relative_to(POD_MOUNT)


def chown_tree(path: Path, uid: int = OPERATOR_UID) -> None:
    for directory, dirs, files in os.walk(path):
        os.chown(directory, uid, uid)
        for name in files:
            os.chown(os.path.join(directory, name), uid, uid, follow_symlinks=False)
