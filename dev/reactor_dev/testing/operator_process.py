"""`reactor operator` as a real subprocess against a cluster (a ControlPlane, or any object
with ``kubeconfig_path`` and ``kubectl``): for tests, benchmarks and the demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from reactor_dev.testing.helpers import free_port, wait_for
from reactor_dev.testing.workers import port_range

START_TIMEOUT = 180.0


class OperatorProcess:
    def __init__(self, cluster, namespace: str, work_dir: Path, *extra_args: str, kubeconfig: Path | None = None,
                 allow_file_urls: tuple[Path, ...] | None = None):
        """``allow_file_urls``: prefixes for file:// repositories (--allow-file-urls); default:
        the work dir's parent, where tests keep their origin repositories (the work dir itself
        stays refused)."""
        self.cluster, self.namespace, self.work_dir = cluster, namespace, work_dir
        prefixes = (Path(work_dir).resolve().parent,) if allow_file_urls is None else allow_file_urls
        self.file_url_args = tuple(f"--allow-file-urls={p}" for p in prefixes)
        # The identity the operator runs as: the cluster's admin unless given (e.g. a
        # ServiceAccount's, minted with cluster.kubeconfig_for).
        self.kubeconfig = Path(kubeconfig) if kubeconfig is not None else Path(cluster.kubeconfig_path)
        self.extra_args = extra_args  # a --port-range among them: the caller's, shifted with workers.port_range
        self.process: subprocess.Popen | None = None
        self.log_path = work_dir / "operator.log"
        self._api = None

    def start(self, live: bool = True, liveness_port: int | None = None) -> OperatorProcess:
        """``live``: return once kopf's liveness endpoint answers; False: at once (an
        operator meant to die at a crash hook may get there before it is live).
        ``liveness_port``: its predecessor's (a restarted pod keeps its ports; they are part of
        the cells' confinement, so a reattached cell's rules match only with the same ones)."""
        port = self.liveness_port = liveness_port or free_port()
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "reactor.cli", "operator", "--namespace", self.namespace,
                 "--work-dir", str(self.work_dir), "--port-range", port_range("18500-19000"),  # this test worker's own
                 "--liveness", f"http://127.0.0.1:{port}/healthz", *self.file_url_args, *self.extra_args],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        if not live:
            return self
        # Liveness answers after kopf's startup handlers, which reap a killed predecessor's
        # orphans (up to the stop grace each): give a loaded machine room.
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # ready when kopf's liveness endpoint answers
            if self.process.poll() is not None:
                raise RuntimeError(f"operator exited {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"operator not live in {START_TIMEOUT:g}s:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        os.killpg(self.process.pid, sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()

    # -- reading the cluster --

    def get(self, name: str) -> dict | None:
        """The AgentTask as the cluster's admin reads it (an API call, not a kubectl process:
        tests poll this often, on two cores shared with the cells)."""
        import kubernetes

        if self._api is None:
            self._api = kubernetes.client.CustomObjectsApi(
                kubernetes.config.new_client_from_config(str(self.cluster.kubeconfig_path)))
        try:
            return self._api.get_namespaced_custom_object("reactor.dev", "v1alpha1", self.namespace, "agenttasks", name)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def wait_for(self, name: str, predicate, timeout: float = 180, what: str = "condition") -> dict | None:
        """Poll the object until ``predicate(obj)`` holds (``obj`` is None once it is gone)."""
        seen: list[dict | None] = [None]

        def check() -> bool:
            seen[0] = self.get(name)
            return bool(predicate(seen[0]))

        wait_for(check, timeout, f"{name}: {what}",
                 detail=lambda: f"last status: {json.dumps((seen[0] or {}).get('status'), indent=1)}\n"
                                f"operator log:\n{self.log()}")
        return seen[0]

    def wait_terminal(self, name: str, timeout: float = 180) -> dict:
        return self.wait_for(name, lambda o: o and (o.get("status") or {}).get("phase") in ("Succeeded", "Failed"),
                             timeout, "a terminal phase")

    def events(self, name: str) -> list[dict]:
        out = self.cluster.kubectl("get", "events", "-n", self.namespace, "--field-selector",
                                   f"involvedObject.name={name}", "-o", "json")
        items = json.loads(out.stdout)["items"]
        return sorted(items, key=lambda e: e["metadata"]["creationTimestamp"])


@contextmanager
def operators(cluster, namespace: str, work_dir: Path, kubeconfig: Path | None = None) -> Iterator:
    """Yields ``start(*args) -> OperatorProcess``; on exit deletes the namespace's tasks while
    the operators still run (so they reap their cells and release finalizers), then stops them."""
    started: list[OperatorProcess] = []

    def start(*args: str, work_dir: Path = work_dir, live: bool = True) -> OperatorProcess:
        """``work_dir``: a replica of a fleet has its own (its own volume, in a StatefulSet);
        an operator started again on a work dir is that replica restarted, on its ports;
        ``live``: see OperatorProcess.start."""
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        before = next((p.liveness_port for p in reversed(started) if Path(p.work_dir) == Path(work_dir)
                       and p.process is not None and p.process.poll() is not None), None)  # (a live one holds it)
        proc = OperatorProcess(cluster, namespace, work_dir, *args, kubeconfig=kubeconfig).start(live, before)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        cluster.kubectl("delete", "agenttasks", "--all", "-n", namespace, "--wait=true", "--timeout=30s")
        for proc in started:
            proc.stop()
