"""The suite runs on parallel workers (pytest-xdist, `-n 2` in `make test`): each worker gets
port ranges of its own, so two modules that both name, say, 18600-18700 never hand the same
free port to two servers (a port is checked free when allocated but bound seconds later,
when opencode has booted)."""

from __future__ import annotations

import os

from reactor.infra.ports import PortRange

# Worker gwN uses every range shifted down by N * SHIFT: the suite's ranges (18000-24000) stay
# above 1024 and below Linux's ephemeral ports (32768-) for up to three workers.
SHIFT = 8000
MAX_WORKERS = 3


def worker_index() -> int:
    """0 outside xdist and on its first worker (gw0), N on gwN."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(name.removeprefix("gw"))
    if index >= MAX_WORKERS:
        raise RuntimeError(f"the suite's port ranges allow {MAX_WORKERS} workers, not {name}")
    return index


def ports(low: int, high: int) -> PortRange:
    shift = SHIFT * worker_index()
    return PortRange(low - shift, high - shift)


def port_range(text: str) -> str:
    """``"18600-18700"`` as this worker's own range, for a ``--port-range`` argument."""
    low, high = (int(part) for part in text.split("-"))
    return str(ports(low, high))
