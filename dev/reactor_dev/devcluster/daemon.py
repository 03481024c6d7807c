"""The background process behind ``reactor dev-cluster up``.

Runs a :class:`ControlPlane` (or, with ``--node``, a :class:`NodeCluster`) until SIGTERM
(or SIGINT), then stops it cleanly. A node keeps a copy of its host record in the state
dir from its first change to the host on, so ``down`` can undo a crashed daemon's node. Once the
control plane is ready it writes ``kubeconfig`` and then ``state.json`` into the state
dir; ``state.json`` appearing is the readiness signal ``up`` waits for. Both are removed
on the way out, so a state dir without them never claims a running cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from reactor.errors import ReactorError

STATE_FILE = "state.json"
KUBECONFIG_FILE = "kubeconfig"
NODE_RECORD_FILE = "node-record.json"


def _raise_exit(signum: int, _frame: object) -> None:
    # Unwinds whatever runs (even a start() in progress, whose cleanup stops what it began).
    raise SystemExit(128 + signum)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.touch(mode=0o600)
    tmp.write_text(text)
    os.replace(tmp, path)


def run(state_dir: Path, node: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGINT, _raise_exit)
    # Imported here: the CLI imports this module for its file names on every `reactor` call.
    if node:
        from reactor_dev.devcluster.node import NodeCluster

        control_plane = NodeCluster(record_copy=state_dir / NODE_RECORD_FILE)
    else:
        from reactor_dev.devcluster.controlplane import ControlPlane

        control_plane = ControlPlane()
    state, kubeconfig = state_dir / STATE_FILE, state_dir / KUBECONFIG_FILE
    try:
        control_plane.start()
        write_atomically(kubeconfig, control_plane.kubeconfig_path.read_text())
        write_atomically(
            state,
            json.dumps(
                {
                    "pid": os.getpid(),
                    "server_url": control_plane.server_url,
                    "kubeconfig": str(kubeconfig),
                    "work_dir": str(control_plane.work_dir),
                    "pids": control_plane.pids,
                    "node": node,
                },
                indent=2,
            ),
        )
        print(f"ready: {control_plane.server_url}, pids {control_plane.pids}", flush=True)
        # Wakes once a second only to notice a crashed etcd or kube-apiserver.
        idle = threading.Event()
        while control_plane.running:
            idle.wait(1.0)
        print(f"a control plane process exited\n{control_plane.log_tails()}", flush=True)
        return 1
    except ReactorError as error:
        print(f"error: {error}", flush=True)
        return 1
    finally:
        state.unlink(missing_ok=True)
        kubeconfig.unlink(missing_ok=True)
        left = control_plane.stop()
        print(f"stopped; left behind: {left}" if left else "stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reactor_dev.devcluster.daemon")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--node", action="store_true", help="a NodeCluster (control plane + kubelet) instead")
    args = parser.parse_args(argv)
    return run(args.state_dir.resolve(), node=args.node)


if __name__ == "__main__":
    sys.exit(main())
