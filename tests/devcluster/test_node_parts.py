"""Pieces of the dev node that need neither root nor a node (the node itself: tests/node)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from reactor_dev.devcluster import node
from reactor_dev.devcluster.hostnode import HostRecord, NodeHostError


def test_pause_image_archive_is_a_docker_archive_with_one_layer(tmp_path):
    binary = tmp_path / "pause"
    binary.write_bytes(b"\x7fELF not really")
    with tarfile.open(fileobj=io.BytesIO(node.pause_image_archive(binary, "localhost/x/pause:1"))) as archive:
        manifest = json.load(archive.extractfile("manifest.json"))
        assert manifest[0]["RepoTags"] == ["localhost/x/pause:1"]
        config = json.load(archive.extractfile(manifest[0]["Config"]))
        layer = archive.extractfile(manifest[0]["Layers"][0]).read()
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    assert config["config"]["Entrypoint"] == ["/pause"]
    with tarfile.open(fileobj=io.BytesIO(layer)) as files:
        pause = files.getmember("pause")
        assert pause.mode == 0o755 and files.extractfile(pause).read() == b"\x7fELF not really"


def test_host_record_round_trips_and_derives_addresses(tmp_path):
    record = HostRecord(work_dir=str(tmp_path), index=7, sysctls={"vm/overcommit_memory": "0"})
    record.save(tmp_path / "record.json")
    again = HostRecord.load(tmp_path / "record.json")
    assert again == record
    assert (again.node_ip, again.host_ip, again.pod_cidr) == ("10.99.7.1", "10.99.7.2", "10.244.7.0/24")


def test_missing_node_binaries_say_how_to_build_them(tmp_path):
    with pytest.raises(NodeHostError, match="make node"):
        node.find_node_assets({"REACTOR_NODE_ASSETS": str(tmp_path)})


def test_node_store_dir_follows_xdg_data_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert node.node_store_dir().parent == tmp_path / "reactor" / "node"
