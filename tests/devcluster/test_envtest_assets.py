"""Binary lookup and the pinned versions (no control plane needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from reactor_dev.devcluster import assets
from reactor_dev.devcluster.assets import AssetsNotFound, find_assets, find_kubectl, store_dir

REPO = Path(__file__).resolve().parents[2]


def _fake_binaries(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in assets.BINARIES:
        binary = directory / name
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)


def test_pinned_versions_match_the_go_modules():
    kubernetes_mod = (REPO / "hack/envtest/kubernetes/go.mod").read_text()
    etcd_mod = (REPO / "hack/envtest/etcd/go.mod").read_text()
    pinned = re.escape(assets.KUBERNETES_VERSION)
    assert re.search(rf"^(require)?\s*k8s\.io/kubernetes {pinned}\b", kubernetes_mod, re.M)
    assert re.search(rf"^\s*go\.etcd\.io/etcd/server/v3 {re.escape(assets.ETCD_VERSION)}\b", etcd_mod, re.M)


def test_every_staging_module_is_replaced_at_the_matching_version():
    kubernetes_mod = (REPO / "hack/envtest/kubernetes/go.mod").read_text()
    staging = assets.KUBERNETES_VERSION.replace("v1.", "v0.", 1)
    replaced = dict(re.findall(r"(k8s\.io/[a-z0-9-]+) => k8s\.io/[a-z0-9-]+ (v\S+)", kubernetes_mod))
    assert {"k8s.io/api", "k8s.io/apiserver", "k8s.io/client-go", "k8s.io/kubectl"} <= replaced.keys()
    assert set(replaced.values()) == {staging}


def test_store_dir_follows_xdg_data_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    version = assets.KUBERNETES_VERSION.removeprefix("v")
    assert store_dir().parent == tmp_path / "kubebuilder-envtest" / "k8s"
    assert store_dir().name.startswith(f"{version}-linux-")


def test_kubebuilder_assets_then_per_binary_overrides(tmp_path):
    _fake_binaries(tmp_path / "dir")
    _fake_binaries(tmp_path / "other")
    env = {"KUBEBUILDER_ASSETS": str(tmp_path / "dir")}
    assert find_assets(env).kube_apiserver == tmp_path / "dir" / "kube-apiserver"
    env["TEST_ASSET_ETCD"] = str(tmp_path / "other" / "etcd")
    found = find_assets(env)
    assert found.etcd == tmp_path / "other" / "etcd"
    assert found.kubectl == tmp_path / "dir" / "kubectl"
    assert find_kubectl(env) == tmp_path / "dir" / "kubectl"


def test_missing_binaries_raise_an_actionable_error(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "empty"))
    with pytest.raises(AssetsNotFound) as caught:
        find_assets({})
    message = str(caught.value)
    assert "make envtest" in message and "KUBEBUILDER_ASSETS" in message
    assert str(tmp_path / "empty") in message
    assert find_kubectl({}) is None
