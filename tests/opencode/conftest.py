"""Real `opencode serve` processes against the scripted model (no mocks), started and
stopped by the engine's own server manager (reactor.infra.servers).

One ScriptedModel and one server per module are shared by the tests that do not change
the server's state; each test adds its own scenario with a unique marker (the model is
parallel-safe by design). Tests that need a clean repository or kill the server start
their own through ``opencode_factory``.

The fixtures are synchronous and module-scoped while each test has its own event loop,
so the servers live on an event loop of their own in a background thread.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reactor.errors import ConfigurationError
from reactor.infra.servers import OpenCodeServer, ServerSpec, find_opencode_binary
from reactor.opencode.client import OpenCodeClient
from reactor_dev.testing.helpers import free_port
from reactor_dev.testing.repos import make_repo
from reactor_dev.testing.scripted_model import Script, ScriptedModel

# CPU may be busy (other builds): a start normally takes 2-3 s.
START_TIMEOUT = 90.0


class BackgroundLoop:
    """An event loop in a daemon thread, for sync fixtures that own async resources."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="opencode-servers", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


@dataclass
class Server:
    """A running server as the tests see it: where it listens, its password, its repository."""

    process: OpenCodeServer
    repo: Path
    background: BackgroundLoop

    @property
    def base_url(self) -> str:
        return self.process.base_url

    @property
    def password(self) -> str:
        return self.process.password

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def client(self, **kwargs) -> OpenCodeClient:
        return OpenCodeClient(self.base_url, self.password, **kwargs)

    def alive(self) -> bool:
        return self.process.alive()

    def stop(self) -> None:
        self.background.run(self.process.stop())


def start_server(binary: str, model: ScriptedModel, root: Path, background: BackgroundLoop) -> Server:
    repo = make_repo(root / "repo", {"README.md": "hello\nworld\n"})
    process = OpenCodeServer(ServerSpec(
        binary=binary, cwd=repo, port=free_port(), cell_id=f"client-test-{uuid.uuid4().hex[:8]}",
        state_dir=root / "state", work_dir=root, config=model.opencode_config(),
    ))
    background.run(process.start(timeout=START_TIMEOUT))
    return Server(process, repo, background)


@pytest.fixture(scope="module")
def background() -> BackgroundLoop:
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def opencode_bin() -> str:
    try:
        return find_opencode_binary()
    except ConfigurationError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="module")
def model():
    """One scripted model for the module; tests add scenarios with unique markers."""
    with ScriptedModel(Script()) as scripted:
        yield scripted


@pytest.fixture
def opencode_factory(opencode_bin, tmp_path, background):
    """Start servers (``factory(model)``) that are all stopped after the test."""
    servers: list[Server] = []

    def factory(scripted: ScriptedModel) -> Server:
        root = tmp_path / f"server-{len(servers)}"
        root.mkdir()
        server = start_server(opencode_bin, scripted, root, background)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(opencode_bin, model, tmp_path_factory, background):
    """A server shared by the module's tests (state accumulates: do not assert on git status)."""
    shared = start_server(opencode_bin, model, tmp_path_factory.mktemp("opencode"), background)
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
