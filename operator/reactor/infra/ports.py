"""Port allocation for cell servers: each server gets a port no other live cell holds."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

from reactor.errors import ConfigurationError, ReactorError

DEFAULT_PORT_RANGE = (8000, 9000)


class PortsExhausted(ReactorError):
    """Every port of the range is held by a cell or taken by another process."""


class PortTaken(ReactorError):
    """A port to reserve is held by another cell."""


@dataclass(frozen=True)
class PortRange:
    """Ports ``start`` up to but not including ``end`` (8000-9000 is 1000 ports, the design's default)."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> PortRange:
        try:
            low, high = (int(part) for part in text.split("-", 1))
        except ValueError:
            raise ConfigurationError(f"port range {text!r} is not of the form START-END, e.g. 8000-9000") from None
        if not (1024 <= low < high <= 65536):
            raise ConfigurationError(f"port range {text!r} must satisfy 1024 <= START < END <= 65536")
        return cls(low, high)

    def __len__(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port. SO_REUSEADDR mirrors what servers set, so a
    port lingering in TIME_WAIT still counts as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class PortAllocator:
    """Hands out ports of a range, never the same one twice while it is held.

    Thread-safe. Allocation walks the range round-robin from the last port handed out, so a
    port just released is the last to be reused (its old server may still be closing).
    A port can still be taken by an unrelated process between allocation and the server's
    bind; the server then fails to boot and its restart (BOOT_RETRY) allocates another.
    """

    def __init__(self, port_range: PortRange = PortRange(*DEFAULT_PORT_RANGE), host: str = "127.0.0.1"):
        self.range = port_range
        self.host = host
        self._held: dict[int, str] = {}
        self._cursor = port_range.start
        self._lock = threading.Lock()

    def allocate(self, owner: str) -> int:
        with self._lock:
            for offset in range(len(self.range)):
                port = self.range.start + (self._cursor - self.range.start + offset) % len(self.range)
                if port in self._held or not port_is_free(port, self.host):
                    continue
                self._held[port] = owner
                self._cursor = port + 1
                return port
        raise PortsExhausted(
            f"no free port in {self.range}: {len(self._held)} held by cells, the rest in use by other processes; "
            "widen --port-range or lower --max-agents"
        )

    def reserve(self, port: int, owner: str) -> int:
        """Hold ``port``, which a running server already listens on (a cell reattached after
        an operator restart): never handed out while held. PortTaken when another cell holds
        it already (it was free when that cell got it: the reattached server is not there)."""
        with self._lock:
            holder = self._held.get(port)
            if holder is not None and holder != owner:
                raise PortTaken(f"port {port} is held by cell {holder}")
            self._held[port] = owner
            return port

    def release(self, port: int) -> None:
        with self._lock:
            self._held.pop(port, None)

    def held(self) -> dict[int, str]:
        with self._lock:
            return dict(self._held)
