"""The operator as users run it: its image, built here, on a real one-node cluster.

Every test here gets the ``node`` mark (``pytest -m node`` selects them, ``-m "not node"``
skips them). They need root, the Debian packages and node binaries of ``make node``
(``make test`` does that first) and build the image themselves (``hack/image/build.sh``:
incremental, so it always holds the code under test).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reactor import OPENCODE_VERSION
from reactor_dev.devcluster.node import NodeCluster
from reactor.errors import ReactorError

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "reactor:0.1.0"
# What `image: reactor:0.1.0` in manifests/deployment.yaml means to the kubelet.
IMAGE_QUALIFIED = "docker.io/library/reactor:0.1.0"
NAMESPACE = "reactor-system"
POD_MOUNT = Path("/var/lib/reactor")  # the operator's volume inside its pod
OPERATOR_UID = 10001


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.node)
            # The first test also builds the image and starts the node (~1-2 min cached).
            item.add_marker(pytest.mark.timeout(900))


def build_image() -> tuple[Path, float]:
    started = time.monotonic()
    out = subprocess.run([str(ROOT / "hack/image/build.sh"), IMAGE, OPENCODE_VERSION],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        pytest.fail(f"make image failed:\n{out.stderr[-4000:]}", pytrace=False)
    print(out.stderr.strip().splitlines()[-1])
    return Path(out.stdout.strip().splitlines()[-1]), time.monotonic() - started


@pytest.fixture(scope="session")
def operator_image_archive() -> Path:
    return build_image()[0]


@pytest.fixture(scope="module")
def node_cluster(kube_assets, operator_image_archive) -> Iterator[NodeCluster]:
    failure = None
    cluster = NodeCluster(kube_assets)
    try:
        cluster.start()
    except ReactorError as error:
        failure = error
    if failure:
        pytest.fail(str(failure), pytrace=False)
    try:
        print(f"\nnode ready in {cluster.started_in:.1f}s")
        cluster.load_image(operator_image_archive, IMAGE_QUALIFIED)
        yield cluster
    finally:
        left = cluster.stop()
        assert left == [], f"the dev node left behind: {left}"


def kubectl_ok(cluster, *args: str, input: str | None = None, timeout: float = 120) -> str:
    out = cluster.kubectl(*args, input=input, timeout=timeout)
    assert out.returncode == 0, f"kubectl {' '.join(args)} failed ({out.returncode}):\n{out.stderr}\n{out.stdout}"
    return out.stdout


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
