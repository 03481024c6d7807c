"""Ways through the cell boundary found by an adversarial review of the launcher, each
turned into a test at the cheapest level that proves it (the launcher run directly, as
``reactor.infra.launcher`` starts every cell)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from reactor.infra import landlock, launcher
from reactor.infra.confinement import readable_roots

ABI = landlock.abi_version()
needs_landlock = pytest.mark.skipif(ABI < 1, reason="Landlock unavailable in this kernel")

# socket() and connect() without the socket() syscall: io_uring's IORING_OP_SOCKET (45) and
# IORING_OP_CONNECT (16), submitted through a ring (ctypes + mmap, no liburing). A seccomp
# filter on socket() never sees them.
IO_URING_UNIX_CLIENT = r'''
import ctypes, mmap, struct, sys
libc = ctypes.CDLL(None, use_errno=True); libc.syscall.restype = ctypes.c_long
params = ctypes.create_string_buffer(120)
ring = libc.syscall(425, 8, params)  # io_uring_setup
if ring < 0:
    print("refused", ctypes.get_errno()); sys.exit(0)
sq_entries, cq_entries = struct.unpack_from("II", params, 0)
sq_head, sq_tail, sq_mask, _, _, _, sq_array = struct.unpack_from("7I", params, 40)
cq_head, cq_tail, cq_mask, _, _, cqes = struct.unpack_from("6I", params, 80)
sq = mmap.mmap(ring, sq_array + 4 * sq_entries, offset=0)
cq = mmap.mmap(ring, cqes + 16 * cq_entries, offset=0x8000000)
sqes = mmap.mmap(ring, 64 * sq_entries, offset=0x10000000)
def submit(opcode, fd, off=0, addr=0):
    tail = struct.unpack_from("I", sq, sq_tail)[0]; i = tail & struct.unpack_from("I", sq, sq_mask)[0]
    sqes[64 * i:64 * i + 64] = struct.pack("BBHiQQ", opcode, 0, 0, fd, off, addr).ljust(64, b"\0")
    struct.pack_into("I", sq, sq_array + 4 * i, i); struct.pack_into("I", sq, sq_tail, tail + 1)
    if libc.syscall(426, ring, 1, 1, 1, None, 0) < 0:
        return -ctypes.get_errno()
    head = struct.unpack_from("I", cq, cq_head)[0]; j = head & struct.unpack_from("I", cq, cq_mask)[0]
    res = struct.unpack_from("i", cq, cqes + 16 * j + 8)[0]; struct.pack_into("I", cq, cq_head, head + 1)
    return res
fd = submit(45, 1, off=1)  # IORING_OP_SOCKET: AF_UNIX, SOCK_STREAM
if fd < 0:
    print("refused", -fd); sys.exit(0)
path = sys.argv[1].encode()
addr = ctypes.create_string_buffer(struct.pack("H", 1) + path + b"\0", 110)
res = submit(16, fd, off=110, addr=ctypes.addressof(addr))  # IORING_OP_CONNECT
print("connected" if res == 0 else "refused %d" % -res)
'''


def _run_in_cell(command: list[str], cell: Path) -> subprocess.CompletedProcess:
    policy = {"read": readable_roots(Path("/"), []), "write": [str(cell), "/dev/null"], "abi": ABI,
              "refuse_socket_families": list(launcher.REFUSED_SOCKET_FAMILIES)}
    launch = launcher.prepare(command, {"PATH": os.environ["PATH"]}, policy, deadline=30, term_grace=0.2)
    try:
        return subprocess.run(launch.argv, cwd=cell, env=launch.env, pass_fds=launch.pass_fds, text=True,
                              capture_output=True, timeout=60)
    finally:
        launch.close()


@needs_landlock
def test_a_cell_cannot_reach_a_unix_socket_through_io_uring(tmp_path):
    """The seccomp filter refuses socket(AF_UNIX); io_uring makes the same socket and
    connects it without that syscall, to an ssh-agent, docker or containerd socket."""
    cell = tmp_path / "cell"
    cell.mkdir()
    agent = tmp_path / "agent.sock"  # stands in for an ssh-agent or docker socket
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(agent))
        listener.listen()
        done = _run_in_cell([sys.executable, "-c", IO_URING_UNIX_CLIENT, str(agent)], cell)
    assert done.stdout.strip().startswith("refused"), (done.stdout, done.stderr)


@pytest.mark.opencode
async def test_the_repositorys_own_opencode_config_is_not_loaded(tmp_path):
    """A repository's opencode.json (and .opencode/ plugins) would be tenant code inside the
    server the tests run through: the cell's server ignores them (the review's finding 2)."""
    import httpx

    from reactor.infra.servers import OpenCodeServer, ServerSpec, find_opencode_binary
    from reactor_dev.testing.helpers import free_port
    from reactor_dev.testing.repos import make_repo

    repo = make_repo(tmp_path / "repo", {"opencode.json": '{"username": "from-the-repo"}\n'})
    server = OpenCodeServer(ServerSpec(binary=find_opencode_binary(), cwd=repo, port=free_port(),
                                       cell_id="project-config", state_dir=tmp_path / "state", work_dir=tmp_path,
                                       config={}))
    await server.start(timeout=60)
    try:
        async with httpx.AsyncClient(auth=("opencode", server.password), timeout=30) as http:
            config = (await http.get(f"{server.base_url}/config")).json()
    finally:
        await server.stop()
    assert config.get("username") != "from-the-repo", config
