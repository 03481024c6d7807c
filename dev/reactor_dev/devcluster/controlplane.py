"""A real Kubernetes control plane as two local processes: etcd and kube-apiserver.

The way controller-runtime's envtest does it: free ports on 127.0.0.1, etcd's data in a
temporary directory, a freshly minted PKI, RBAC authorization. There is no
controller-manager or scheduler: no garbage collection, namespaces never finish
deleting, pods never run. Use a fresh namespace per test.

    with ControlPlane() as cp:
        cp.kubectl("get", "namespaces")

``from_environment()`` honours ``USE_EXISTING_CLUSTER=true`` (the current kubeconfig).
"""

from __future__ import annotations

import atexit
import base64
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import httpx
import yaml

from reactor_dev.devcluster import pki
from reactor_dev.devcluster.assets import Assets, find_assets, find_kubectl
from reactor.errors import ReactorError

HOST = "127.0.0.1"
CLUSTER_NAME = "reactor-dev"
_LOG_TAIL_LINES = 30


class ControlPlaneError(ReactorError):
    """The control plane did not start (the message carries its processes' log tails)."""


class Cluster(Protocol):
    """What tests and tools need from a cluster, started here or existing."""

    @property
    def kubeconfig_path(self) -> Path: ...

    @property
    def server_url(self) -> str: ...

    def kubectl(
        self, *args: str, input: str | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]: ...

    def kubeconfig_for(self, user: str, groups: list[str], path: Path | str) -> Path: ...


def use_existing_cluster(env: dict[str, str] | None = None) -> bool:
    """``USE_EXISTING_CLUSTER`` parsed as envtest does (a Go bool: true/t/1, any case)."""
    value = (os.environ if env is None else env).get("USE_EXISTING_CLUSTER", "")
    return value.strip().lower() in {"1", "t", "true"}


def from_environment(**kwargs) -> ControlPlane | ExistingCluster:
    """An :class:`ExistingCluster` when ``USE_EXISTING_CLUSTER=true``, else a new (not yet
    started) :class:`ControlPlane` built with ``kwargs``."""
    if use_existing_cluster():
        return ExistingCluster()
    return ControlPlane(**kwargs)


def kubeconfig_yaml(server: str, ca_pem: bytes, user: str, client: pki.KeyPair) -> str:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": CLUSTER_NAME, "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}
            ],
            "users": [
                {
                    "name": user,
                    "user": {"client-certificate-data": b64(client.cert_pem), "client-key-data": b64(client.key_pem)},
                }
            ],
            "contexts": [{"name": CLUSTER_NAME, "context": {"cluster": CLUSTER_NAME, "user": user}}],
            "current-context": CLUSTER_NAME,
        },
        sort_keys=False,
    )


def _free_ports(count: int) -> list[int]:
    """Distinct ports free right now; all sockets are held until every port is picked."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _run_kubectl(
    kubectl: Path, kubeconfig: Path, args: tuple[str, ...], input: str | None, timeout: float, cache_dir: Path | None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if cache_dir is not None:
        # Keeps kubectl's discovery cache out of ~/.kube and apart per cluster.
        env["KUBECACHEDIR"] = str(cache_dir)
    return subprocess.run(
        [str(kubectl), "--kubeconfig", str(kubeconfig), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


class ControlPlane:
    """etcd + kube-apiserver on free ports of 127.0.0.1. Not thread-safe."""

    def __init__(
        self,
        assets: Assets | None = None,
        *,
        startup_timeout: float = 60.0,
        stop_grace: float = 10.0,
        apiserver_args: list[str] | None = None,
        temp_root: Path | str | None = None,
    ):
        self.assets = assets
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.apiserver_args = list(apiserver_args or [])
        self.temp_root = temp_root
        self.work_dir: Path | None = None
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._ca: pki.CertificateAuthority | None = None
        self._server_url: str | None = None
        self._etcd_url: str | None = None

    # --- public API ----------------------------------------------------------------

    @property
    def kubeconfig_path(self) -> Path:
        return self._require_work_dir() / "kubeconfig"

    @property
    def server_url(self) -> str:
        if self._server_url is None:
            raise ControlPlaneError("the control plane is not started")
        return self._server_url

    @property
    def etcd_url(self) -> str:
        if self._etcd_url is None:
            raise ControlPlaneError("the control plane is not started")
        return self._etcd_url

    @property
    def pids(self) -> dict[str, int]:
        """PIDs of the running processes (each leads its own process group)."""
        return {name: process.pid for name, process in self._processes.items()}

    @property
    def running(self) -> bool:
        """Started, and neither process has exited since."""
        return bool(self._processes) and all(process.poll() is None for process in self._processes.values())

    def start(self) -> ControlPlane:
        if self.work_dir is not None:
            raise ControlPlaneError("the control plane is already started")
        if self.assets is None:
            self.assets = find_assets()
        self.work_dir = Path(tempfile.mkdtemp(prefix="reactor-controlplane-", dir=self.temp_root))
        # Stopping at interpreter exit covers a test session that dies on an error.
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate both processes (SIGTERM, SIGKILL after ``stop_grace``) and remove the
        temporary directory. Idempotent."""
        atexit.unregister(self.stop)
        # The API server first: stopping etcd under it only produces error noise.
        for name in ("kube-apiserver", "etcd"):
            process = self._processes.pop(name, None)
            if process is not None:
                _terminate_group(process, self.stop_grace)
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        self.work_dir = None
        self._server_url = self._etcd_url = None
        self._ca = None

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def kubeconfig_for(self, user: str, groups: list[str], path: Path | str) -> Path:
        """Write a kubeconfig authenticating as ``user`` in ``groups`` (a client certificate
        signed by the client CA). A service account is user
        ``system:serviceaccount:<ns>:<name>`` in groups ``system:serviceaccounts`` and
        ``system:serviceaccounts:<ns>``; RBAC then grants it exactly its bindings."""
        if self._ca is None:
            raise ControlPlaneError("the control plane is not started")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = kubeconfig_yaml(self.server_url, self._ca.cert_pem, user, self._ca.client(user, list(groups)))
        pki.write_private(path, text.encode())
        return path

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this control plane as admin (never raises on exit code)."""
        assert self.assets is not None
        return _run_kubectl(
            self.assets.kubectl, self.kubeconfig_path, args, input, timeout, self._require_work_dir() / "kubectl-cache"
        )

    def log_tails(self) -> str:
        work_dir = self._require_work_dir()
        parts = []
        for name in ("etcd", "kube-apiserver"):
            log = work_dir / "logs" / f"{name}.log"
            if log.exists():
                lines = log.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
                parts.append(f"--- last {len(lines)} lines of {name} log ({log}) ---\n" + "\n".join(lines))
        return "\n".join(parts)

    # --- internals -------------------------------------------------------------------

    def _require_work_dir(self) -> Path:
        if self.work_dir is None:
            raise ControlPlaneError("the control plane is not started")
        return self.work_dir

    def _start(self) -> None:
        assert self.assets is not None and self.work_dir is not None
        deadline = time.monotonic() + self.startup_timeout
        work = self.work_dir
        pki_dir, logs = work / "pki", work / "logs"
        pki_dir.mkdir(mode=0o700)
        logs.mkdir()
        etcd_port, peer_port, api_port = _free_ports(3)
        self._etcd_url = f"http://{HOST}:{etcd_port}"
        self._server_url = f"https://{HOST}:{api_port}"

        ca = self._ca = pki.CertificateAuthority()
        serving = ca.serving([HOST, "localhost"])
        admin = ca.client("admin", ["system:masters"])
        sa = pki.service_account_key()
        (pki_dir / "ca.crt").write_bytes(ca.cert_pem)
        (pki_dir / "apiserver.crt").write_bytes(serving.cert_pem)
        pki.write_private(pki_dir / "apiserver.key", serving.key_pem)
        (pki_dir / "admin.crt").write_bytes(admin.cert_pem)
        pki.write_private(pki_dir / "admin.key", admin.key_pem)
        (pki_dir / "sa.pub").write_bytes(sa.cert_pem)
        pki.write_private(pki_dir / "sa.key", sa.key_pem)

        peer_url = f"http://{HOST}:{peer_port}"
        self._spawn(
            "etcd",
            [
                str(self.assets.etcd),
                f"--data-dir={work / 'etcd'}",
                f"--listen-client-urls={self._etcd_url}",
                f"--advertise-client-urls={self._etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                # Test data is thrown away: skipping fsync makes etcd far faster on slow disks.
                "--unsafe-no-fsync=true",
            ],
        )
        self._wait_until(deadline, "etcd /health", lambda: _etcd_healthy(self.etcd_url))

        self._spawn(
            "kube-apiserver",
            [
                str(self.assets.kube_apiserver),
                f"--etcd-servers={self._etcd_url}",
                f"--cert-dir={pki_dir}",
                f"--tls-cert-file={pki_dir / 'apiserver.crt'}",
                f"--tls-private-key-file={pki_dir / 'apiserver.key'}",
                f"--client-ca-file={pki_dir / 'ca.crt'}",
                f"--secure-port={api_port}",
                f"--bind-address={HOST}",
                # Without it the server looks for a routable interface and fails where there is none.
                f"--advertise-address={HOST}",
                # 1.37+ refuses a loopback advertise address for the `kubernetes` Service's
                # endpoints; nothing here routes to them, so do not maintain them at all.
                "--endpoint-reconciler-type=none",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                # It would wait for a default ServiceAccount that only controller-manager creates.
                "--disable-admission-plugins=ServiceAccount",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={self._server_url}/",
                f"--service-account-key-file={pki_dir / 'sa.pub'}",
                f"--service-account-signing-key-file={pki_dir / 'sa.key'}",
                *self.apiserver_args,
            ],
        )

        ssl_context = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
        ssl_context.load_cert_chain(str(pki_dir / "admin.crt"), str(pki_dir / "admin.key"))
        with httpx.Client(base_url=self._server_url, verify=ssl_context, timeout=5.0) as http:
            self._wait_until(deadline, "kube-apiserver /readyz", lambda: http.get("/readyz").status_code == 200)
            # /readyz can pass a moment before the bootstrap controller creates `default`.
            self._wait_until(
                deadline, "namespace default", lambda: http.get("/api/v1/namespaces/default").status_code == 200
            )
        pki.write_private(self.kubeconfig_path, kubeconfig_yaml(self._server_url, ca.cert_pem, "admin", admin).encode())

    def _spawn(self, name: str, argv: list[str]) -> None:
        assert self.work_dir is not None
        with open(self.work_dir / "logs" / f"{name}.log", "wb") as log:
            self._processes[name] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group: a Ctrl-C meant for the caller does not reach it,
                # and stop() can signal the whole group.
                start_new_session=True,
                cwd=self.work_dir,
            )

    def _wait_until(self, deadline: float, what: str, ready: Callable[[], bool]) -> None:
        """Poll ``ready`` until it is true; fail early if a process died, or at ``deadline``."""
        while True:
            for name, process in self._processes.items():
                if process.poll() is not None:
                    raise ControlPlaneError(
                        f"{name} exited with code {process.returncode} while waiting for {what}\n{self.log_tails()}"
                    )
            try:
                if ready():
                    return
            except (httpx.HTTPError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"timed out after {self.startup_timeout:.0f}s waiting for {what}\n{self.log_tails()}"
                )
            time.sleep(0.05)


def _etcd_healthy(url: str) -> bool:
    response = httpx.get(f"{url}/health", timeout=2.0)
    return response.status_code == 200 and response.json().get("health") == "true"


def _terminate_group(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group led by ``process``, SIGKILL it after ``grace`` seconds; reap."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


class ExistingCluster:
    """The cluster of the current kubeconfig (``USE_EXISTING_CLUSTER=true``); not started
    or stopped here. kubectl is the built one if present, else the one on PATH."""

    def __init__(self, kubeconfig: Path | str | None = None):
        if kubeconfig is None:
            env = os.environ.get("KUBECONFIG", "")
            # Like kubectl, the first entry of a KUBECONFIG list holds the current context.
            first = next((p for p in env.split(os.pathsep) if p), "")
            kubeconfig = first or Path.home() / ".kube" / "config"
        self._kubeconfig = Path(kubeconfig).expanduser().resolve()
        if not self._kubeconfig.is_file():
            raise ControlPlaneError(f"USE_EXISTING_CLUSTER=true but there is no kubeconfig at {self._kubeconfig}")
        self._kubectl = find_kubectl() or (Path(p) if (p := shutil.which("kubectl")) else None)

    @property
    def kubeconfig_path(self) -> Path:
        return self._kubeconfig

    @property
    def server_url(self) -> str:
        config = yaml.safe_load(self._kubeconfig.read_text()) or {}
        contexts = {c["name"]: c["context"] for c in config.get("contexts") or []}
        clusters = {c["name"]: c["cluster"] for c in config.get("clusters") or []}
        context = contexts.get(config.get("current-context", ""), {})
        return clusters.get(context.get("cluster", ""), {}).get("server", "")

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        if self._kubectl is None:
            raise ControlPlaneError("no kubectl: run `make envtest`, set KUBEBUILDER_ASSETS, or put kubectl on PATH")
        return _run_kubectl(self._kubectl, self._kubeconfig, args, input, timeout, None)

    def kubeconfig_for(self, user: str, groups: list[str], path: Path | str) -> Path:
        raise ControlPlaneError(
            "kubeconfig_for needs the control plane's client CA key, which an existing cluster does not give out; "
            "create a ServiceAccount token kubeconfig for it instead"
        )
