"""``reactor dev-cluster up|down|status``: a local control plane in the background.

``up`` starts ``python -m reactor.devcluster.daemon`` detached (its own session), waits
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

from reactor.devcluster.assets import AssetsNotFound, find_assets
from reactor.devcluster.daemon import KUBECONFIG_FILE, STATE_FILE

DEFAULT_STATE_DIR = Path(".reactor") / "dev-cluster"
PID_FILE = "daemon.pid"
LOG_FILE = "daemon.log"
DAEMON_MODULE = "reactor.devcluster.daemon"
# The daemon's own stop() takes up to 10 s per process before SIGKILL.
_DOWN_GRACE = 30.0


def add_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``dev-cluster`` with ``up``, ``down`` and ``status`` to a ``reactor`` parser."""
    parser = subparsers.add_parser(
        "dev-cluster",
        help="a local Kubernetes control plane (etcd + kube-apiserver) for development",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="where its state lives (default: %(default)s)"
    )
    actions = parser.add_subparsers(dest="dev_cluster_command", required=True, metavar="{up,down,status}")
    up = actions.add_parser("up", help="start it in the background and print `export KUBECONFIG=...`")
    up.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for readiness (default: %(default)s)")
    up.set_defaults(func=cmd_up)
    actions.add_parser("down", help="stop it and remove its state").set_defaults(func=cmd_down)
    actions.add_parser("status", help="say whether it runs, and where").set_defaults(func=cmd_status)
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
    except AssetsNotFound as error:
        _err(f"error: {error}")
        return 1

    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / LOG_FILE, "wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", DAEMON_MODULE, "--state-dir", str(state_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command and the terminal's Ctrl-C
            cwd=state_dir,
        )
    (state_dir / PID_FILE).write_text(f"{daemon.pid}\n")
    _err(f"starting dev cluster (pid {daemon.pid}, log {state_dir / LOG_FILE})")

    deadline = time.monotonic() + args.timeout
    while _read_state(state_dir) is None:
        if daemon.poll() is not None or time.monotonic() > deadline:
            reason = f"exited with code {daemon.returncode}" if daemon.returncode is not None else "timed out"
            _err(f"error: dev cluster did not start ({reason}); its log:\n{_log_tail(state_dir)}")
            _stop(state_dir)
            return 1
        time.sleep(0.1)
    state = _read_state(state_dir) or {}
    _err(f"dev cluster ready at {state.get('server_url')}")
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


def main(argv: list[str] | None = None) -> int:
    """``python -m reactor.devcluster.cli dev-cluster up`` (until ``reactor`` wires it in)."""
    parser = argparse.ArgumentParser(prog="python -m reactor.devcluster.cli")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
