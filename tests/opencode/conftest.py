"""Real `opencode serve` processes against the scripted model (no mocks).

Small on purpose: the engine's server manager (reactor.infra.servers) replaces this later.
One ScriptedModel and one server per module are shared by the tests that do not change
the server's state; each test adds its own scenario with a unique marker (the model is
parallel-safe by design). Tests that need a clean repository or kill the server start
their own through ``opencode_factory``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from reactor.opencode.client import OpenCodeClient
from reactor.testing.scripted_model import Script, ScriptedModel

DEV_FALLBACK_BIN = "/tmp/octest/node_modules/.bin/opencode"
SHARED_CACHE = Path("/tmp/reactor-test-cache")
START_TIMEOUT = 90.0  # CPU may be busy (other builds); a start normally takes 2-3 s


def opencode_binary() -> str | None:
    for candidate in (os.environ.get("REACTOR_OPENCODE_BIN"), shutil.which("opencode"), DEV_FALLBACK_BIN):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_git_repo(path: Path, files: dict[str, str] | None = None) -> Path:
    path.mkdir(parents=True)
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=path, check=True, capture_output=True)
    git("init", "--quiet", "--initial-branch=main")
    git("config", "user.email", "dev@example.com")
    git("config", "user.name", "Dev")
    for name, content in (files or {"README.md": "hello\nworld\n"}).items():
        (path / name).write_text(content)
    git("add", "--all")
    git("commit", "--quiet", "-m", "initial")
    return path


@dataclass
class Server:
    process: subprocess.Popen
    base_url: str
    password: str
    repo: Path
    log_path: Path

    def client(self, **kwargs) -> OpenCodeClient:
        return OpenCodeClient(self.base_url, self.password, **kwargs)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after 5 s."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_server(binary: str, model: ScriptedModel, root: Path) -> Server:
    repo = make_git_repo(root / "repo")
    state = root / "state"
    state.mkdir()
    SHARED_CACHE.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(16)
    port = free_port()
    env = {
        **os.environ,
        "OPENCODE_CONFIG_CONTENT": json.dumps(model.opencode_config()),
        "OPENCODE_SERVER_PASSWORD": password,
        "XDG_DATA_HOME": str(state / "data"),
        "XDG_STATE_HOME": str(state / "state"),
        "XDG_CONFIG_HOME": str(state / "config"),
        "XDG_CACHE_HOME": str(SHARED_CACHE),
        "OPENCODE_DISABLE_AUTOUPDATE": "1",
        "OPENCODE_DISABLE_MODELS_FETCH": "1",
    }
    log_path = state / "server.log"
    log_file = open(log_path, "ab")
    process = subprocess.Popen(
        [binary, "serve", "--port", str(port), "--hostname", "127.0.0.1", "--print-logs"],
        cwd=repo, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file,
        start_new_session=True,
    )
    log_file.close()
    server = Server(process, f"http://127.0.0.1:{port}", password, repo, log_path)
    listening = threading.Event()

    def pump() -> None:  # copy stdout to the log, notice the listening line
        assert process.stdout is not None
        with open(log_path, "ab") as out:
            for line in process.stdout:
                out.write(line)
                out.flush()
                if b"opencode server listening on" in line:
                    listening.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    try:
        # Requests sent before the listening line can hang forever (measured): wait for it.
        while not listening.wait(0.05):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"opencode serve did not start:\n{server.log_tail()}")
        with httpx.Client(auth=("opencode", password), timeout=2.0) as http:
            while True:
                try:
                    if http.get(server.base_url + "/global/health").status_code == 200:
                        return server
                except httpx.HTTPError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"opencode serve not healthy:\n{server.log_tail()}")
                time.sleep(0.05)
    except BaseException:
        server.stop()
        raise


@pytest.fixture(scope="module")
def opencode_bin() -> str:
    binary = opencode_binary()
    if binary is None:
        pytest.skip("no opencode binary: run `make opencode` or set REACTOR_OPENCODE_BIN")
    return binary


@pytest.fixture(scope="module")
def model():
    """One scripted model for the module; tests add scenarios with unique markers."""
    with ScriptedModel(Script()) as scripted:
        yield scripted


@pytest.fixture
def opencode_factory(opencode_bin, tmp_path):
    """Start servers (``factory(model)``) that are all stopped after the test."""
    servers: list[Server] = []

    def factory(scripted: ScriptedModel) -> Server:
        root = tmp_path / f"server-{len(servers)}"
        root.mkdir()
        server = start_server(opencode_bin, scripted, root)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(opencode_bin, model, tmp_path_factory):
    """A server shared by the module's tests (state accumulates: do not assert on git status)."""
    shared = start_server(opencode_bin, model, tmp_path_factory.mktemp("opencode"))
    yield shared
    shared.stop()


@pytest.fixture
async def client(server):
    async with server.client() as opencode:
        yield opencode


@pytest.fixture
def marker() -> str:
    """A unique scenario marker for the test."""
    return f"TASK-{uuid.uuid4().hex[:8]}"
