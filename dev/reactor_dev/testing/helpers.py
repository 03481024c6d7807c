"""Small helpers shared by the tests, the benchmarks and the demo: one home for each."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
POLL_INTERVAL = 0.02
CRDS = Path(__file__).resolve().parents[3] / "crds"  # the repository's CRDs (a kustomization)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition",
             detail: Callable[[], str] | None = None, interval: float = POLL_INTERVAL) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; an
    AssertionError naming ``what`` (and ``detail()``, e.g. a log tail) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:g}s" + (f"\n{detail()}" if detail else ""))
        time.sleep(interval)


async def until(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """``wait_for`` for async tests: polls without blocking the event loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:g}s")
        await asyncio.sleep(POLL_INTERVAL)


def install_crds(cluster) -> None:
    """Every CRD the operator watches (AgentTask, SpendLimit), established."""
    out = cluster.kubectl("apply", "--server-side", "-k", str(CRDS))
    assert out.returncode == 0, out.stderr
    done = cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                           "crd/agenttasks.reactor.dev", "crd/spendlimits.reactor.dev")
    assert done.returncode == 0, done.stderr
