"""``reactor dev-cluster up|down|status|load``: a local cluster in the background.

``up`` runs a control plane (etcd + kube-apiserver: an API server, no pods); ``up --node``
a one-node cluster that runs pods (controller-manager, scheduler, containerd, kubelet,
kube-proxy, in a network namespace of its own; needs root; see docs/node.md). ``load``
imports an image archive into the node's containerd, as ``kind load image-archive`` does.

``up`` starts ``python -m reactor_dev.devcluster.daemon`` detached (its own session), waits
until it reports ready and prints ``export KUBECONFIG=...`` on stdout (so
``eval "$(reactor dev-cluster up)"`` works); everything else goes to stderr. State lives
in ``.reactor/dev-cluster/`` under the current directory: ``daemon.pid``, ``daemon.log``,
then ``kubeconfig`` and ``state.json`` once ready.

Exit codes: 0 ok (for ``status``: running), 1 failure (for ``status``: not running).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml

from reactor_dev.devcluster.assets import find_assets
from reactor_dev.devcluster.daemon import KUBECONFIG_FILE, NODE_RECORD_FILE, STATE_FILE
from reactor.errors import ReactorError

DEFAULT_STATE_DIR = Path(".reactor") / "dev-cluster"
PID_FILE = "daemon.pid"
LOG_FILE = "daemon.log"
DAEMON_MODULE = "reactor_dev.devcluster.daemon"
# The daemon's own stop() takes up to 10 s per process before SIGKILL (a node: a few groups).
_DOWN_GRACE = 60.0


def add_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``dev-cluster`` with ``up``, ``down`` and ``status`` to a ``reactor`` parser."""
    parser = subparsers.add_parser(
        "dev-cluster",
        help="a local Kubernetes cluster for development: a control plane, or with --node one that runs pods",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="where its state lives (default: %(default)s)"
    )
    actions = parser.add_subparsers(dest="dev_cluster_command", required=True, metavar="{up,down,status}")
    up = actions.add_parser("up", help="start it in the background and print `export KUBECONFIG=...`")
    up.add_argument("--timeout", type=float, default=None,
                    help="seconds to wait for readiness (default: 90, with --node 180)")
    up.add_argument("--node", action="store_true",
                    help="also run a node (containerd, kubelet, kube-proxy, pod network, local volumes) so pods "
                         "run; needs root and `make node` (binaries, Debian packages)")
    up.set_defaults(func=cmd_up)
    actions.add_parser("down", help="stop it and remove its state").set_defaults(func=cmd_down)
    actions.add_parser("status", help="say whether it runs, and where").set_defaults(func=cmd_status)
    load = actions.add_parser("load", help="import an image archive (docker/podman save) into the node's containerd")
    load.add_argument("archive", type=Path, help="e.g. the path `make image` prints")
    load.add_argument("--tag", action="append", default=[], metavar="NAME",
                      help="also tag it NAME (repeatable), e.g. docker.io/library/reactor:0.1.0")
    load.set_defaults(func=cmd_load)
    return parser


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def _daemon_process(state_dir: Path) -> psutil.Process | None:
    """The recorded daemon if it still runs (a reused PID running something else is not it)."""
    try:
        pid = int((state_dir / PID_FILE).read_text())
        process = psutil.Process(pid)
        if DAEMON_MODULE in process.cmdline() and process.status() != psutil.STATUS_ZOMBIE:
            return process
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def _read_state(state_dir: Path) -> dict | None:
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _log_tail(state_dir: Path, lines: int = 60) -> str:
    try:
        return "\n".join((state_dir / LOG_FILE).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cmd_up(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir.resolve()
    kubeconfig = state_dir / KUBECONFIG_FILE
    if _daemon_process(state_dir) and _read_state(state_dir):
        _err(f"dev cluster already running ({state_dir})")
        print(f"export KUBECONFIG={kubeconfig}")
        return 0
    _stop(state_dir)  # leftovers of a crashed or half-started one
    try:
        find_assets()  # fail here, in the foreground, with the actionable message
        if args.node:
            from reactor_dev.devcluster.node import check_host, find_node_assets

            check_host()
            find_node_assets()
    except ReactorError as error:
        _err(f"error: {error}")
        return 1

    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / LOG_FILE, "wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", DAEMON_MODULE, "--state-dir", str(state_dir), *(["--node"] if args.node else [])],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command and the terminal's Ctrl-C
            cwd=state_dir,
        )
    (state_dir / PID_FILE).write_text(f"{daemon.pid}\n")
    _err(f"starting dev cluster (pid {daemon.pid}, log {state_dir / LOG_FILE})")

    timeout = args.timeout if args.timeout is not None else (180.0 if args.node else 90.0)
    deadline = time.monotonic() + timeout
    while _read_state(state_dir) is None:
        if daemon.poll() is not None or time.monotonic() > deadline:
            reason = f"exited with code {daemon.returncode}" if daemon.returncode is not None else "timed out"
            _err(f"error: dev cluster did not start ({reason}); its log:\n{_log_tail(state_dir)}")
            _stop(state_dir)
            return 1
        time.sleep(0.1)
    state = _read_state(state_dir) or {}
    _err(f"dev cluster{' with a node' if args.node else ''} ready at {state.get('server_url')}")
    print(f"export KUBECONFIG={kubeconfig}")
    return 0


def _stop(state_dir: Path) -> bool:
    """Stop the daemon and anything it left behind; remove the state dir. True when all is gone."""
    if not state_dir.exists():
        return True
    state = _read_state(state_dir) or {}
    daemon = _daemon_process(state_dir)
    if daemon is not None:
        daemon.terminate()  # the daemon stops etcd and kube-apiserver itself
        try:
            daemon.wait(_DOWN_GRACE)
        except psutil.TimeoutExpired:
            _kill_group(daemon.pid)
    # A daemon killed with SIGKILL cannot have stopped its children: do it for it.
    for name, pid in (state.get("pids") or {}).items():
        try:
            process = psutil.Process(pid)
            if Path(process.exe()).name == name:
                _kill_group(pid)
                process.wait(10)
        except (psutil.Error, OSError):
            pass
    record_file = state_dir / NODE_RECORD_FILE
    if record_file.exists():  # a node whose daemon did not undo it (crashed, killed)
        from reactor_dev.devcluster.hostnode import HostRecord, teardown

        left = teardown(HostRecord.load(record_file))
        if left:
            _err("error: the dev node left behind: " + "; ".join(left))
            return False
    if state.get("work_dir"):
        shutil.rmtree(state["work_dir"], ignore_errors=True)
    shutil.rmtree(state_dir, ignore_errors=True)
    return _daemon_process(state_dir) is None and not state_dir.exists()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def cmd_down(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir.resolve()
    was_running = _daemon_process(state_dir) is not None
    if not _stop(state_dir):
        _err(f"error: could not stop the dev cluster in {state_dir}")
        return 1
    _err("dev cluster stopped" if was_running else "dev cluster was not running")
    return 0


def _ready(kubeconfig: Path, server_url: str) -> bool:
    """GET /readyz, verifying the server against the kubeconfig's CA (anonymous may read it)."""
    try:
        config = yaml.safe_load(kubeconfig.read_text())
        ca = base64.b64decode(config["clusters"][0]["cluster"]["certificate-authority-data"]).decode()
        context = ssl.create_default_context(cadata=ca)
        return httpx.get(f"{server_url}/readyz", verify=context, timeout=3.0).status_code == 200
    except (OSError, ValueError, KeyError, IndexError, TypeError, httpx.HTTPError):
        return False


def cmd_status(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir.resolve()
    daemon, state = _daemon_process(state_dir), _read_state(state_dir)
    if daemon is None or state is None:
        print("dev cluster: not running" + (" (starting)" if daemon is not None else ""))
        return 1
    ready = _ready(Path(state["kubeconfig"]), state["server_url"])
    print(f"dev cluster: running{'' if ready else ' (not ready)'}")
    print(f"server: {state['server_url']}")
    print(f"kubeconfig: {state['kubeconfig']}")
    print(f"pid: {daemon.pid}")
    return 0 if ready else 1


def cmd_load(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir.resolve()
    state = _read_state(state_dir)
    if _daemon_process(state_dir) is None or state is None or not state.get("node"):
        _err(f"error: no dev cluster with a node runs here ({state_dir}); start one with `reactor dev-cluster up --node`")
        return 1
    if not args.archive.is_file():
        _err(f"error: no image archive at {args.archive} (`make image` prints where it saved one)")
        return 1
    from reactor_dev.devcluster.hostnode import HostRecord
    from reactor_dev.devcluster.node import import_image

    record = HostRecord.load(state_dir / NODE_RECORD_FILE)
    started = time.monotonic()
    try:
        names = import_image(record.containerd_socket, args.archive, *args.tag)
    except ReactorError as error:
        _err(f"error: {error}")
        return 1
    _err(f"loaded {', '.join(names) or '(no named image)'} in {time.monotonic() - started:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m reactor_dev.devcluster.cli dev-cluster up`` (until ``reactor`` wires it in)."""
    parser = argparse.ArgumentParser(prog="python -m reactor_dev.devcluster.cli")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
