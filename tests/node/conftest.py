"""The operator as users run it: its image, built here, on a real one-node cluster.

Every test here gets the ``node`` mark (``pytest -m node`` selects them, ``-m "not node"``
skips them) and needs root (skipped without it, named at the end of the run). They need the
Debian packages and node binaries of ``make node`` (``make test`` does that first) and build
the image themselves (``hack/image/build.sh``: incremental, so it always holds the code under
test).

One node serves every test of this directory: started with `reactor dev-cluster up --node`
and the image loaded with `reactor dev-cluster load`, as a user does; `reactor dev-cluster
down` after the last test must leave nothing on the host (checked in the fixture's teardown).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from reactor import OPENCODE_VERSION
from reactor_dev.devcluster.hostnode import HostRecord, leftovers
from reactor_dev.devcluster.node import NodeCluster
from reactor_dev.testing.node import IMAGE_QUALIFIED, build_image, dev_cluster, host_snapshot


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.node)
            item.add_marker(pytest.mark.needs("root"))
            # The first test also builds the image and starts the node (~1-2 min cached).
            item.add_marker(pytest.mark.timeout(900))


@pytest.fixture(scope="package")
def operator_image_archive() -> Path:
    try:
        archive, said, took = build_image(OPENCODE_VERSION)
    except AssertionError as error:
        pytest.fail(str(error), pytrace=False)
    print(f"\n{said} ({took:.1f}s)")
    return archive


@dataclass
class DevNode:
    state: Path  # the state dir of `reactor dev-cluster`
    up: str  # what `up` printed
    record: HostRecord
    cluster: NodeCluster


@pytest.fixture(scope="package")
def dev_node(kube_assets, operator_image_archive, tmp_path_factory) -> Iterator[DevNode]:
    """The node for every test here, as `reactor dev-cluster up --node` + `load` start it."""
    state = tmp_path_factory.mktemp("dev-node") / "state"
    before = host_snapshot()
    up = dev_cluster(state, "up", "--node")
    if up.returncode != 0:
        dev_cluster(state, "down")
        pytest.fail(f"reactor dev-cluster up --node failed:\n{up.stderr}", pytrace=False)
    record = HostRecord.load(state / "node-record.json")
    try:
        loaded = dev_cluster(state, "load", str(operator_image_archive), "--tag", IMAGE_QUALIFIED)
        assert loaded.returncode == 0, loaded.stderr
        print(f"\n{up.stderr.strip()}\n{loaded.stderr.strip()}")
        yield DevNode(state, up.stdout, record, NodeCluster.attach(record, kube_assets))
    finally:
        down = dev_cluster(state, "down")
    # `down` leaves nothing of the node on the host.
    assert down.returncode == 0, down.stderr
    assert leftovers(record) == []
    assert not state.exists()
    after = host_snapshot()
    # Another checkout's dev node may come or go meanwhile (its veth, the kubelet's paths and
    # sysctls): then only what is ours (leftovers above) can be compared.
    if not {link for link in before["links"] + after["links"] if link.startswith("rnode")} - {record.host_veth}:
        assert after == before
    mine = [p for p in psutil.process_iter(["cmdline"]) if record.work_dir in " ".join(p.info["cmdline"] or [])]
    assert mine == [], mine


@pytest.fixture(scope="package")
def node_cluster(dev_node: DevNode) -> NodeCluster:
    return dev_node.cluster
