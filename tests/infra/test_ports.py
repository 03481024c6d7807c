import socket
import threading

import pytest

from reactor.errors import ConfigurationError
from reactor.infra.ports import PortAllocator, PortRange, PortsExhausted


def free_block(size: int) -> PortRange:
    """A range whose ports are all free right now (found by scanning a high range)."""
    for start in range(41000, 60000, size):
        rng = PortRange(start, start + size)
        if all(_free(p) for p in range(rng.start, rng.end)):
            return rng
    raise RuntimeError("no free block")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_never_hands_out_a_held_port_twice_even_across_threads():
    allocator = PortAllocator(free_block(40))
    got: list[int] = []
    lock = threading.Lock()

    def grab():
        for _ in range(5):
            port = allocator.allocate("t")
            with lock:
                got.append(port)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 40 and len(set(got)) == 40
    with pytest.raises(PortsExhausted, match="no free port"):
        allocator.allocate("one too many")


def test_skips_a_port_another_process_listens_on():
    rng = free_block(3)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", rng.start))
        busy.listen()
        allocator = PortAllocator(rng)
        assert allocator.allocate("a") == rng.start + 1


def test_release_makes_a_port_available_again_last():
    rng = free_block(2)
    allocator = PortAllocator(rng)
    first = allocator.allocate("a")
    second = allocator.allocate("b")
    allocator.release(first)
    assert allocator.held() == {second: "b"}
    assert allocator.allocate("c") == first


@pytest.mark.parametrize("text", ["8000", "9000-8000", "80-90", "a-b", "8000-70000"])
def test_bad_range_is_a_clear_error(text):
    with pytest.raises(ConfigurationError, match="port range"):
        PortRange.parse(text)


def test_default_range_is_the_seeds_thousand_ports():
    """What a user gets without --port-range: 8000-9000 with END excluded, 1000 ports."""
    from reactor.cli import build_parser

    args = build_parser().parse_args(["run", "--task", "t", "--prompt", "p"])
    assert PortRange.parse(args.port_range) == PortAllocator().range == PortRange(8000, 9000)
    assert len(PortAllocator().range) == 1000
