"""Where the control plane binaries are: envtest's conventions, then our build's store dir.

Precedence (as in controller-runtime's envtest): ``TEST_ASSET_ETCD`` /
``TEST_ASSET_KUBE_APISERVER`` / ``TEST_ASSET_KUBECTL`` per binary, then the directory
``KUBEBUILDER_ASSETS``, then the directory ``hack/envtest/build.sh`` builds into
(setup-envtest's layout, ``$XDG_DATA_HOME/kubebuilder-envtest/k8s/<version>-<os>-<arch>``).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from reactor.errors import ReactorError

# Must match hack/envtest/kubernetes/go.mod and etcd/go.mod (a test checks it).
KUBERNETES_VERSION = "v1.37.2"
ETCD_VERSION = "v3.6.16"

BINARIES = {"etcd": "TEST_ASSET_ETCD", "kube-apiserver": "TEST_ASSET_KUBE_APISERVER", "kubectl": "TEST_ASSET_KUBECTL"}

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class AssetsNotFound(ReactorError):
    """etcd, kube-apiserver or kubectl is missing: nothing was built and nothing was pointed at."""


@dataclass(frozen=True)
class Assets:
    etcd: Path
    kube_apiserver: Path
    kubectl: Path


def store_dir(version: str = KUBERNETES_VERSION) -> Path:
    """The directory build.sh fills for ``version`` (it need not exist)."""
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    machine = platform.machine().lower()
    suffix = f"{platform.system().lower()}-{_ARCH.get(machine, machine)}"
    return data_home / "kubebuilder-envtest" / "k8s" / f"{version.removeprefix('v')}-{suffix}"


def _candidate(name: str, env: dict[str, str]) -> tuple[Path, str]:
    """Where ``name`` should be, and which setting said so."""
    variable = BINARIES[name]
    if env.get(variable):
        return Path(env[variable]), variable
    if env.get("KUBEBUILDER_ASSETS"):
        return Path(env["KUBEBUILDER_ASSETS"]) / name, "KUBEBUILDER_ASSETS"
    return store_dir() / name, "make envtest"


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_assets(env: dict[str, str] | None = None) -> Assets:
    """Resolve the three binaries or raise :class:`AssetsNotFound` naming what is missing."""
    env = dict(os.environ) if env is None else env
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in BINARIES:
        path, source = _candidate(name, env)
        if _is_executable(path):
            found[name] = path
        else:
            missing.append(f"{path} (from {source})")
    if missing:
        raise AssetsNotFound(
            "control plane binaries not found: " + ", ".join(missing) + ". "
            f"Run `make envtest` (builds etcd, kube-apiserver and kubectl {KUBERNETES_VERSION} from Go modules), "
            "or set KUBEBUILDER_ASSETS to a directory holding etcd, kube-apiserver and kubectl, "
            "or USE_EXISTING_CLUSTER=true to use the cluster of the current kubeconfig."
        )
    return Assets(etcd=found["etcd"], kube_apiserver=found["kube-apiserver"], kubectl=found["kubectl"])


def find_kubectl(env: dict[str, str] | None = None) -> Path | None:
    """kubectl alone, looked up as :func:`find_assets` does (an existing cluster needs no etcd)."""
    path, _ = _candidate("kubectl", dict(os.environ) if env is None else env)
    return path if _is_executable(path) else None
