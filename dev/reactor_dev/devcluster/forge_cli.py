"""``reactor dev-forge``: a local Gitea to try pull requests with (spec.result.kind pullRequest).

Runs in the foreground until Ctrl-C: Gitea (hack/forge/build.sh builds it from Go modules on
first use) on 127.0.0.1, SQLite, offline, an admin user ``reactor`` and an API token written
to a 0600 file, never printed. State lives in ``.reactor/dev-forge/`` (fresh at each start)."""

from __future__ import annotations

import argparse
import shutil
import signal
import threading
from pathlib import Path

DEFAULT_STATE_DIR = Path(".reactor") / "dev-forge"


def add_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("dev-forge", help="a local Gitea (real forge) to try pull requests with, until Ctrl-C",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="its data (default: %(default)s)")
    parser.add_argument("--port", type=int, default=3000, help="HTTP port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--repo", type=Path, action="append", default=[],
                        help="a local git repository to push into the forge as reactor/<its name> (repeatable)")
    parser.set_defaults(func=cmd_dev_forge)
    return parser


def cmd_dev_forge(args: argparse.Namespace) -> int:
    from reactor_dev.testing.forge import GiteaServer

    state = args.state_dir.resolve()
    shutil.rmtree(state, ignore_errors=True)
    forge = GiteaServer(state / "gitea", port=args.port)
    forge.start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        token_file = state / "token"
        token_file.touch(mode=0o600)
        token_file.write_text(forge.token + "\n")
        password_file = state / "password"
        password_file.touch(mode=0o600)
        password_file.write_text(forge.password + "\n")
        urls = []
        for repo in args.repo:
            name = repo.resolve().name
            urls.append(forge.create_repository(name, repo.resolve()))
        print(f"Gitea on {forge.url} (admin user reactor; started in {forge.start_seconds:.1f}s)")
        for url in urls:
            print(f"  repository: {url}")
        print(f"API token in {token_file}, password in {password_file}. For the operator:\n"
              f"  kubectl create secret generic forge-token --from-file=token={token_file}\n"
              f"  kubectl create secret generic git-creds --from-literal=username=reactor "
              f"--from-file=password={password_file}\n"
              f"and in the AgentTask: repository.url {forge.repo_url('NAME')}, credentialsSecretRef git-creds,\n"
              f"  result: {{kind: pullRequest, forge: gitea, tokenSecretRef: {{name: forge-token}}}}\n"
              "Ctrl-C stops it.", flush=True)
        stop.wait()
    finally:
        forge.stop()
    return 0
