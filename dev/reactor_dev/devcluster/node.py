"""A one-node Kubernetes cluster on this machine, in a network namespace of its own.

:class:`ControlPlane` is an API server without a node: nothing runs pods. ``NodeCluster``
adds what a real cluster has, so the operator runs as users run it (its image, its
Deployment, its ServiceAccount token, Pod Security ``restricted``):

- etcd, kube-apiserver, kube-controller-manager, kube-scheduler (control plane);
- containerd + runc from Debian's packages, a locally built pause image, the kubelet and
  kube-proxy (the node);
- pod networking with the CNI ``bridge`` plugin, and a default StorageClass with local
  PersistentVolumes (directories in the work dir).

Every process runs inside one network namespace, joined to the host by a veth pair
(node 10.99.N.1, host 10.99.N.2): no default route, no NAT, so nothing the cluster runs
reaches beyond this machine; the API server and the kubelet listen only there, and
kube-proxy's iptables rules live and die with the namespace. The binaries come from
``hack/envtest/build.sh`` (control plane) and ``hack/node/build.sh`` (node); the Debian
packages from ``hack/node/install-packages.sh``. Needs root (namespaces, mounts, cgroups).

    with NodeCluster() as cluster:
        cluster.load_image("reactor.tar")
        cluster.kubectl("apply", "-k", "manifests/")

:meth:`stop` leaves no process, mount, device, cgroup, sysctl change or file behind; see
:mod:`reactor_dev.devcluster.hostnode` for the teardown and what the kubelet and containerd
write outside their configured directories.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import platform
import shutil
import ssl
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import yaml

from reactor_dev.devcluster import hostnode, pki
from reactor_dev.devcluster.assets import KUBERNETES_VERSION, Assets, find_assets
from reactor_dev.devcluster.controlplane import ControlPlaneError, _run_kubectl, kubeconfig_yaml
from reactor_dev.devcluster.hostnode import HostRecord, NodeHostError

T = TypeVar("T")

NODE_NAME = "reactor-node"
API_PORT = 6443
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # the `kubernetes` Service: what pods' in-cluster config dials
PAUSE_IMAGE = "localhost/reactor/pause:dev"
STORAGE_CLASS = "local"
NODE_BINARIES = ("kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy", "pause")
# Host tools and the Debian package each comes from (hack/node/install-packages.sh node).
HOST_TOOLS = {
    "containerd": "containerd", "ctr": "containerd", "runc": "runc", "iptables": "iptables",
    "conntrack": "conntrack", "ip": "iproute2", "nsenter": "util-linux", "unshare": "util-linux",
}
CNI_DIR = Path("/usr/lib/cni")  # containernetworking-plugins
# Who changed AgentTasks and posted Events, so tests can tell the operator pod's
# ServiceAccount from an admin; nothing else is recorded.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "Metadata", "verbs": ["create", "update", "patch", "delete"],
         "resources": [{"group": "reactor.dev", "resources": ["agenttasks", "agenttasks/status"]},
                       {"group": "", "resources": ["events"]}]},
        {"level": "None"},
    ],
}
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
# Processes stop in this order (the first group are stopped by hostnode.teardown first).
_STOP_ORDER = ("kubelet", "kube-proxy", "containerd", "kube-scheduler", "kube-controller-manager",
               "kube-apiserver", "etcd")


class NodeClusterError(ControlPlaneError):
    """The dev node did not start (the message names the process and carries its log tail)."""


@dataclass(frozen=True)
class NodeAssets:
    kubelet: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kube_proxy: Path
    pause: Path


def node_store_dir(version: str = KUBERNETES_VERSION) -> Path:
    """Where hack/node/build.sh puts the node binaries for ``version``."""
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    machine = platform.machine().lower()
    return data_home / "reactor" / "node" / f"{version.removeprefix('v')}-{platform.system().lower()}-{_ARCH.get(machine, machine)}"


def find_node_assets(env: dict[str, str] | None = None) -> NodeAssets:
    env = dict(os.environ) if env is None else env
    directory = Path(env["REACTOR_NODE_ASSETS"]) if env.get("REACTOR_NODE_ASSETS") else node_store_dir()
    missing = [name for name in NODE_BINARIES if not os.access(directory / name, os.X_OK)]
    if missing:
        raise NodeHostError(
            f"node binaries not found in {directory}: {', '.join(missing)}. Run `make node` "
            f"(hack/node/build.sh builds them from the pinned Kubernetes {KUBERNETES_VERSION} module) "
            "or set REACTOR_NODE_ASSETS to a directory holding them."
        )
    return NodeAssets(*(directory / name for name in NODE_BINARIES))


def check_host() -> None:
    """Root, and the Debian packages' tools; raises with the command that fixes it."""
    if os.geteuid() != 0:
        raise NodeHostError("the dev node needs root (network namespace, mounts, cgroups)")
    missing = {package for tool, package in HOST_TOOLS.items() if shutil.which(tool) is None}
    if not (CNI_DIR / "bridge").exists():
        missing.add("containernetworking-plugins")
    if missing:
        raise NodeHostError(
            f"missing Debian packages for the dev node: {' '.join(sorted(missing))}. "
            "Run `make node-deps` (hack/node/install-packages.sh node)."
        )


def pause_image_archive(pause_binary: Path, name: str = PAUSE_IMAGE) -> bytes:
    """A docker-archive (`docker save` format) holding one layer: /pause. ``ctr images
    import`` reads it; nothing is pulled."""
    layer_buffer = io.BytesIO()
    with tarfile.open(fileobj=layer_buffer, mode="w") as layer:
        info = layer.gettarinfo(str(pause_binary), arcname="pause")
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o755
        with open(pause_binary, "rb") as binary:
            layer.addfile(info, binary)
    layer_bytes = layer_buffer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    machine = platform.machine().lower()
    config = json.dumps({
        "architecture": _ARCH.get(machine, machine), "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "reactor dev node: hack/node/pause"}],
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [name], "Layers": ["layer.tar"]}]).encode()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for member, data in (("layer.tar", layer_bytes), (config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive.getvalue()


def _ctr(socket_path: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ctr", "--address", socket_path, "--namespace", "k8s.io", *args],
                          capture_output=True, text=True, timeout=timeout)


def import_image(containerd_socket: str, archive: Path | str, *also_tag: str) -> list[str]:
    """Import a `docker save`/`podman save`/OCI archive into a node's containerd, in the
    namespace the kubelet uses (what `kind load image-archive` does); returns the names it
    now holds from it. ``also_tag`` adds names (e.g. ``docker.io/library/reactor:0.1.0``,
    which a Pod's ``image: reactor:0.1.0`` normalises to)."""
    out = _ctr(containerd_socket, "images", "import", str(archive))
    if out.returncode != 0:
        raise NodeClusterError(f"ctr images import {archive} failed: {out.stderr.strip()}")
    names = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("unpacking ")]
    for extra in also_tag:
        if names and extra not in names:
            tagged = _ctr(containerd_socket, "images", "tag", "--force", names[0], extra)
            if tagged.returncode != 0:
                raise NodeClusterError(f"ctr images tag {names[0]} {extra} failed: {tagged.stderr.strip()}")
            names.append(extra)
    return names


class NodeCluster:
    """Control plane + one node, all in one network namespace. Not thread-safe."""

    def __init__(
        self,
        assets: Assets | None = None,
        node_assets: NodeAssets | None = None,
        *,
        volumes: int = 3,
        startup_timeout: float = 120.0,
        stop_grace: float = 10.0,
        temp_root: Path | str | None = None,
        record_copy: Path | None = None,
    ):
        self.assets = assets
        self.node_assets = node_assets
        self.volumes = volumes
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.temp_root = temp_root
        # Kept in step with the host record from its first change on (the daemon's state
        # dir), so what a crashed process left can still be undone.
        self.record_copy = record_copy
        self.record: HostRecord | None = None
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._ca: pki.CertificateAuthority | None = None
        self.started_in: float | None = None  # seconds from start() to node Ready

    # --- public API --------------------------------------------------------------------

    @property
    def work_dir(self) -> Path:
        if self.record is None:
            raise NodeClusterError("the dev node is not started")
        return Path(self.record.work_dir)

    @property
    def node_ip(self) -> str:
        return self._require().node_ip

    @property
    def host_ip(self) -> str:
        """The host's end of the veth: the only host address the node's namespace reaches."""
        return self._require().host_ip

    @property
    def netns(self) -> str:
        return self._require().netns

    @property
    def server_url(self) -> str:
        return f"https://{self.node_ip}:{API_PORT}"

    @property
    def kubeconfig_path(self) -> Path:
        return self.work_dir / "kubeconfig"

    @property
    def audit_log_path(self) -> Path:
        return self.work_dir / "logs" / "audit.jsonl"

    def audit_events(self) -> list[dict]:
        """The API server's audit log (AUDIT_POLICY: who wrote AgentTasks and Events)."""
        try:
            lines = self.audit_log_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def kubelet_get(self, path: str) -> httpx.Response:
        """GET from the kubelet's API (e.g. /metrics/probes, /metrics/resource) as admin."""
        pki_dir = self.work_dir / "pki"
        context = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
        context.load_cert_chain(str(pki_dir / "admin.crt"), str(pki_dir / "admin.key"))
        return httpx.get(f"https://{self.node_ip}:10250{path}", verify=context, timeout=10)

    @property
    def record_path(self) -> Path:
        return self.work_dir / "host-record.json"

    @property
    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self._processes.items()}

    @property
    def running(self) -> bool:
        return bool(self._processes) and all(p.poll() is None for p in self._processes.values())

    @property
    def containerd_socket(self) -> str:
        return self._require().containerd_socket

    def local_volume_dirs(self) -> list[Path]:
        return [self.work_dir / "volumes" / f"pv-{i}" for i in range(self.volumes)]

    def start(self) -> NodeCluster:
        if self.record is not None:
            raise NodeClusterError("the dev node is already started")
        started = time.monotonic()
        check_host()
        self.assets = self.assets or find_assets()
        self.node_assets = self.node_assets or find_node_assets()
        # Short: containerd's socket path must fit a sockaddr_un (108 bytes).
        work = Path(tempfile.mkdtemp(prefix="reactor-node-", dir=self.temp_root))
        self.record = HostRecord(work_dir=str(work))
        atexit.register(self.stop)
        try:
            self._start(time.monotonic() + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - started
        return self

    def stop(self) -> list[str]:
        """Stop everything and undo every change to the host; returns leftovers (none when
        clean). Idempotent."""
        atexit.unregister(self.stop)
        if self.record is None:
            return []
        record, self.record = self.record, None
        record.pids = {name: p.pid for name, p in self._processes.items() if p.poll() is None} or record.pids
        left = hostnode.teardown(record, grace=self.stop_grace)
        for process in self._processes.values():
            try:
                process.wait(1)
            except subprocess.TimeoutExpired:
                left.append(f"process {process.pid} did not exit")
        if self.record_copy is not None and not left:
            self.record_copy.unlink(missing_ok=True)
        self._processes.clear()
        self._ca = None
        return left

    def __enter__(self) -> NodeCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """The built kubectl as admin, from the host (through the veth)."""
        assert self.assets is not None
        return _run_kubectl(self.assets.kubectl, self.kubeconfig_path, args, input, timeout, self.work_dir / "kubectl-cache")

    def kubeconfig_for(self, user: str, groups: list[str], path: Path | str) -> Path:
        if self._ca is None:
            raise NodeClusterError("the dev node is not started")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = kubeconfig_yaml(self.server_url, self._ca.cert_pem, user, self._ca.client(user, list(groups)))
        pki.write_private(path, text.encode())
        return path

    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """containerd's `ctr` in the Kubernetes namespace (k8s.io) of this node."""
        return _ctr(self.containerd_socket, *args, timeout=timeout)

    def load_image(self, archive: Path | str, *also_tag: str) -> list[str]:
        """:func:`import_image` into this node."""
        return import_image(self.containerd_socket, archive, *also_tag)

    def run_in_netns(self, function: Callable[[], T]) -> T:
        """Call ``function`` inside the node's network namespace (e.g. start a server bound
        on :attr:`node_ip`, so pods reach it and nothing outside this machine can)."""
        return hostnode.in_network_namespace(self.netns, function)

    def log_tails(self, lines: int = 30) -> str:
        parts = []
        for log in sorted((self.work_dir / "logs").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- last {len(tail)} lines of {log.name} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    # --- internals -----------------------------------------------------------------------

    def _require(self) -> HostRecord:
        if self.record is None:
            raise NodeClusterError("the dev node is not started")
        return self.record

    def _save(self) -> None:
        record = self._require()
        record.pids = self.pids
        record.save(self.record_path)
        if self.record_copy is not None:
            record.save(self.record_copy)

    def _start(self, deadline: float) -> None:
        record = self._require()
        work = self.work_dir
        for sub in ("pki", "logs", "config", "pod-logs", "cni/net.d", "cni/ipam", "containerd", "kubelet", "volumes"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        record.containerd_socket = str(work / "containerd" / "containerd.sock")
        record.pod_logs_dir = str(work / "pod-logs")
        hostnode.record_host_paths(record, self._save)
        hostnode.record_sysctls(record, self._save)
        hostnode.create_network(record, self._save)
        record.cni_network = f"reactor-node-{record.index}"
        hostnode.create_cgroup_root(record, self._save)

        pki_dir, config = work / "pki", work / "config"
        self._write_pki(pki_dir, config)
        self._start_control_plane(pki_dir, deadline)
        self._start_node(pki_dir, config, deadline)
        self._create_storage()

    def _write_pki(self, pki_dir: Path, config: Path) -> None:
        record = self._require()
        ca = self._ca = pki.CertificateAuthority()
        (pki_dir / "ca.crt").write_bytes(ca.cert_pem)
        # The API server is dialled at the node IP (host, components), at the Service IP and
        # its DNS names (pods' in-cluster config) and at 127.0.0.1.
        pairs = {
            "apiserver": ca.serving([record.node_ip, SERVICE_IP, "127.0.0.1", "kubernetes", "kubernetes.default",
                                     "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"]),
            "kubelet-serving": ca.serving([record.node_ip, NODE_NAME]),
            "apiserver-kubelet-client": ca.client("kube-apiserver-kubelet-client", ["system:masters"]),
        }
        for name, pair in pairs.items():
            (pki_dir / f"{name}.crt").write_bytes(pair.cert_pem)
            pki.write_private(pki_dir / f"{name}.key", pair.key_pem)
        sa = pki.service_account_key()
        (pki_dir / "sa.pub").write_bytes(sa.cert_pem)
        pki.write_private(pki_dir / "sa.key", sa.key_pem)
        # One client identity per component, as kubeadm does: RBAC's bootstrap policy and
        # the Node authorizer grant each exactly its own rights.
        identities = {
            "admin": ("admin", ["system:masters"]),
            "controller-manager": ("system:kube-controller-manager", []),
            "scheduler": ("system:kube-scheduler", []),
            "kubelet": (f"system:node:{NODE_NAME}", ["system:nodes"]),
            "kube-proxy": ("system:kube-proxy", []),
        }
        for name, (user, groups) in identities.items():
            client = ca.client(user, groups)
            path = self.kubeconfig_path if name == "admin" else config / f"{name}.kubeconfig"
            pki.write_private(path, kubeconfig_yaml(self.server_url, ca.cert_pem, user, client).encode())
            if name == "admin":  # for the readiness checks
                (pki_dir / "admin.crt").write_bytes(client.cert_pem)
                pki.write_private(pki_dir / "admin.key", client.key_pem)

    def _start_control_plane(self, pki_dir: Path, deadline: float) -> None:
        assert self.assets is not None
        work = self.work_dir
        etcd_url, peer_url = "http://127.0.0.1:2379", "http://127.0.0.1:2380"
        audit_policy = work / "config" / "audit-policy.yaml"
        audit_policy.write_text(yaml.safe_dump(AUDIT_POLICY, sort_keys=False))
        self._spawn("etcd", [
            str(self.assets.etcd), f"--data-dir={work / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}", "--unsafe-no-fsync=true",
        ])
        self._spawn("kube-apiserver", [
            str(self.assets.kube_apiserver),
            f"--etcd-servers={etcd_url}",
            f"--cert-dir={pki_dir}",
            f"--tls-cert-file={pki_dir / 'apiserver.crt'}", f"--tls-private-key-file={pki_dir / 'apiserver.key'}",
            f"--client-ca-file={pki_dir / 'ca.crt'}",
            f"--secure-port={API_PORT}",
            # Inside the namespace: reachable from the host's veth end, the node and pods only.
            "--bind-address=0.0.0.0", f"--advertise-address={self.node_ip}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki_dir / 'sa.pub'}",
            f"--service-account-signing-key-file={pki_dir / 'sa.key'}",
            f"--kubelet-client-certificate={pki_dir / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki_dir / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki_dir / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--audit-policy-file={audit_policy}", f"--audit-log-path={self.audit_log_path}",
        ])
        ssl_context = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
        ssl_context.load_cert_chain(str(pki_dir / "admin.crt"), str(pki_dir / "admin.key"))
        with httpx.Client(base_url=self.server_url, verify=ssl_context, timeout=5.0) as http:
            self._wait_until(deadline, "kube-apiserver /readyz", lambda: http.get("/readyz").status_code == 200)
            self._wait_until(deadline, "namespace default",
                             lambda: http.get("/api/v1/namespaces/default").status_code == 200)
        config = self.work_dir / "config"
        self._spawn("kube-controller-manager", [
            str(self.node_assets.kube_controller_manager),
            f"--kubeconfig={config / 'controller-manager.kubeconfig'}",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki_dir / 'sa.key'}",
            f"--root-ca-file={pki_dir / 'ca.crt'}",
            "--leader-elect=false", "--bind-address=127.0.0.1",
            # Bind a new claim within a second instead of the 15 s default resync.
            "--pvclaimbinder-sync-period=1s",
        ])
        self._spawn("kube-scheduler", [
            str(self.node_assets.kube_scheduler),
            f"--kubeconfig={config / 'scheduler.kubeconfig'}",
            "--leader-elect=false", "--bind-address=127.0.0.1",
        ])

    def _start_node(self, pki_dir: Path, config: Path, deadline: float) -> None:
        record = self._require()
        work = self.work_dir
        containerd_dir = work / "containerd"
        (work / "cni" / "net.d" / "10-reactor.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0",
            "name": record.cni_network,
            "plugins": [{
                "type": "bridge", "bridge": "cni0", "isGateway": True,
                # No NAT: pod traffic never leaves the namespace (it has no default route).
                "ipMasq": False, "hairpinMode": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": record.pod_cidr}]],
                         "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(work / "cni" / "ipam")},
            }],
        }, indent=2))
        (config / "containerd.toml").write_text(_containerd_config(work, record.containerd_socket))
        self._spawn("containerd", ["containerd", "--config", str(config / "containerd.toml")])
        self._wait_until(deadline, "containerd", lambda: self.ctr("version", timeout=5).returncode == 0)
        pause_archive = containerd_dir / "pause.tar"
        assert self.node_assets is not None
        pause_archive.write_bytes(pause_image_archive(self.node_assets.pause))
        self.load_image(pause_archive)

        resolv = config / "resolv.conf"  # pods get no nameserver: there is nothing to resolve
        resolv.write_text("# reactor dev node: no DNS\noptions ndots:1\n")
        (config / "kubelet.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # This host mounts cgroup v1 (hybrid); 1.35+ refuses it unless told otherwise.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": True,
            "cgroupRoot": f"/{record.cgroup_name}",
            "containerRuntimeEndpoint": f"unix://{record.containerd_socket}",
            "authentication": {"x509": {"clientCAFile": str(pki_dir / "ca.crt")},
                               "webhook": {"enabled": True}, "anonymous": {"enabled": False}},
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(pki_dir / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(pki_dir / "kubelet-serving.key"),
            "address": record.node_ip,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "podLogsDir": record.pod_logs_dir,
            "resolvConf": str(resolv),
            "clusterDomain": "cluster.local",
            # The operator's Deployment requests ephemeral-storage.
            "localStorageCapacityIsolation": True,
            # Images are imported, never pulled: never garbage-collect them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "failSwapOn": False,
            "serializeImagePulls": False,
            "nodeStatusUpdateFrequency": "4s",
            "syncFrequency": "10s",
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "2%", "imagefs.available": "2%",
                             "nodefs.inodesFree": "2%"},
        }, sort_keys=False))
        self._spawn("kubelet", [
            str(self.node_assets.kubelet),
            f"--config={config / 'kubelet.yaml'}",
            f"--kubeconfig={config / 'kubelet.kubeconfig'}",
            f"--root-dir={work / 'kubelet'}",
            f"--cert-dir={pki_dir}",
            f"--node-ip={record.node_ip}",
            f"--hostname-override={NODE_NAME}",
            "--v=1",
        ])
        (config / "kube-proxy.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(config / "kube-proxy.kubeconfig")},
            "hostnameOverride": NODE_NAME,
            "clusterCIDR": record.pod_cidr,
            "bindAddress": record.node_ip,
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            # 0 = leave the host-wide conntrack sysctls alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False},
        }, sort_keys=False))
        self._spawn("kube-proxy", [str(self.node_assets.kube_proxy), f"--config={config / 'kube-proxy.yaml'}"])
        self._wait_until(deadline, f"node {NODE_NAME} Ready", self._node_ready)
        # Pods can be created once their namespace's ServiceAccount exists (controller-manager).
        self._wait_until(deadline, "serviceaccount default/default",
                         lambda: self.kubectl("get", "serviceaccount", "default", timeout=10).returncode == 0)

    def _node_ready(self) -> bool:
        out = self.kubectl("get", "node", NODE_NAME, "-o", "json", timeout=10)
        if out.returncode != 0:
            return False
        conditions = json.loads(out.stdout).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _create_storage(self) -> None:
        """A default StorageClass and local PersistentVolumes (directories here), as kind's
        local-path does. ``local`` rather than ``hostPath``: the kubelet applies a pod's
        fsGroup to a local volume, so the non-root operator can write to it."""
        documents: list[dict] = [{
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": STORAGE_CLASS, "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "WaitForFirstConsumer",
        }]
        for index, directory in enumerate(self.local_volume_dirs()):
            directory.mkdir(parents=True, exist_ok=True)
            documents.append({
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": f"{NODE_NAME}-pv-{index}"},
                "spec": {
                    "capacity": {"storage": "100Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": STORAGE_CLASS,
                    "local": {"path": str(directory)},
                    "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                        {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE_NAME]}]}]}},
                },
            })
        out = self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(documents))
        if out.returncode != 0:
            raise NodeClusterError(f"creating the StorageClass and PersistentVolumes failed: {out.stderr}")

    def _spawn(self, name: str, argv: list[str]) -> None:
        """Start ``name`` inside the node's network namespace, in its own process group.
        nsenter execs the binary, so the PID is the binary's."""
        with open(self.work_dir / "logs" / f"{name}.log", "wb") as log:
            self._processes[name] = subprocess.Popen(
                ["nsenter", f"--net={self.netns}", "--", *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.work_dir,
            )
        self._save()

    def _wait_until(self, deadline: float, what: str, ready: Callable[[], bool]) -> None:
        while True:
            for name, process in self._processes.items():
                if process.poll() is not None:
                    raise NodeClusterError(
                        f"{name} exited with code {process.returncode} while waiting for {what}\n{self.log_tails()}")
            try:
                if ready():
                    return
            except (httpx.HTTPError, OSError, subprocess.TimeoutExpired):
                pass
            if time.monotonic() > deadline:
                raise NodeClusterError(f"timed out after {self.startup_timeout:.0f}s waiting for {what}\n{self.log_tails()}")
            time.sleep(0.1)


def _containerd_config(work: Path, socket_path: str) -> str:
    containerd = work / "containerd"
    return f"""\
# containerd for the reactor dev node: every directory under {work}.
version = 2
root = "{containerd / 'root'}"
state = "{containerd / 'state'}"
# opt would create /opt/containerd; the others are snapshotters this node does not use.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{socket_path}"

[ttrpc]
  address = "{socket_path}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This VM refuses to lower oom_score_adj (no CAP_SYS_RESOURCE): without this runc fails
  # with "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  # Pod network namespaces under the state dir, not /var/run/netns.
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{containerd / 'runc'}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_DIR}"
    conf_dir = "{work / 'cni' / 'net.d'}"
    max_conf_num = 1
"""
