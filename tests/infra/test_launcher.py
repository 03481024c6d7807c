"""The cell launcher (infra/landlock.py run as a script), rule by rule, on the real kernel:
what reaches a process before it is confined, what outlives a cell, which sockets and ports a
cell gets, and the deadline of Reactor's git steps in a checkout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from reactor.infra import landlock, launcher
from reactor.infra.confinement import PortRulesets, readable_roots
from reactor.infra.git import GitTimeout
from reactor.infra.worktrees import WorktreeManager
from reactor_dev.testing.attacks import build_preload_object
from reactor_dev.testing.helpers import wait_for
from reactor_dev.testing.repos import git
from reactor_dev.testing.matrix import process_alive

ABI = landlock.abi_version()
needs_landlock = pytest.mark.skipif(ABI < 1, reason="Landlock unavailable in this kernel")
needs_net = pytest.mark.skipif(ABI < landlock.NET_ABI, reason="Landlock network rules need ABI 4")


def policy_for(cell: Path, hidden: list[Path] = (), **extra) -> dict:
    """A cell's policy: read everything but ``hidden``, write only ``cell``."""
    return {"read": readable_roots(Path("/"), sorted(Path(os.path.realpath(p)) for p in hidden)),
            "write": [str(cell), "/dev/null"], "abi": ABI,
            "refuse_socket_families": list(launcher.REFUSED_SOCKET_FAMILIES), **extra}


def start(command: list[str], env: dict[str, str], policy: dict | None, *, cwd: Path, deadline: float | None = None,
          launcher_env: dict[str, str] | None = None, extra_fds=()) -> subprocess.Popen:
    launch = launcher.prepare(command, env, policy, deadline=deadline, term_grace=0.2, launcher_env=launcher_env,
                              extra_fds=extra_fds)
    try:
        return subprocess.Popen(launch.argv, cwd=cwd, env=launch.env, pass_fds=launch.pass_fds, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    finally:
        launch.close()


def run(command: list[str], env: dict[str, str], policy: dict | None, *, cwd: Path, **kw) -> subprocess.CompletedProcess:
    proc = start(command, env, policy, cwd=cwd, **kw)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.fixture
def cell(tmp_path: Path) -> Path:
    path = tmp_path / "cell"
    path.mkdir()
    return path


@pytest.fixture
def preload(tmp_path: Path) -> Path:
    shared = build_preload_object(tmp_path)
    if shared is None:
        pytest.skip("no C compiler to build the preloaded object")
    return shared


# -- nothing a task supplies is seen before confinement --

@needs_landlock
def test_a_task_env_acts_only_in_the_confined_command_never_on_the_launcher(tmp_path, cell, preload):
    secret = tmp_path / "operator-key"
    secret.write_text("key\n")
    inside, outside = cell / "inside.txt", tmp_path / "outside.txt"
    task_env = {"PATH": os.environ["PATH"], "LD_PRELOAD": str(preload), "GCONV_PATH": str(tmp_path),
                "PYTHONSTARTUP": str(preload), "PROTECTED": str(secret), "MARK_INSIDE": str(inside),
                "MARK_OUTSIDE": str(outside), "TOKEN": "s3cret-4711"}
    proc = start(["sh", "-c", 'echo "$TOKEN"; exec sleep 60'],
                 task_env, policy_for(cell, [secret]), cwd=cell, launcher_env={"REACTOR_CELL": "c1"})
    try:
        assert proc.stdout.readline().strip() == "s3cret-4711", "the task's variables reach the confined command"
        reaper = psutil.Process(proc.pid)
        assert reaper.environ() == {"REACTOR_CELL": "c1"}, "the launcher's environment is fixed by the operator"
        assert "s3cret-4711" not in " ".join(reaper.cmdline())
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert not outside.exists(), "the preloaded object never ran outside the cell (nor before confinement)"
    ran = inside.read_text().splitlines()
    assert ran and all(line.endswith("no-secret") for line in ran), ran  # it ran, confined, and read nothing


def test_python_variables_do_not_reach_the_launcher(tmp_path, cell):
    """-I -S: even if the operator's spawn let PYTHON* through, the launcher ignores them."""
    hook = tmp_path / "sitecustomize.py"
    hook.write_text(f"open({str(tmp_path / 'hooked')!r}, 'w').write('x')\n")
    launch = launcher.prepare(["true"], {"PATH": os.environ["PATH"]}, None)
    try:
        done = subprocess.run(launch.argv, cwd=cell, pass_fds=launch.pass_fds, capture_output=True, timeout=30,
                              env={"PYTHONPATH": str(tmp_path), "PYTHONSTARTUP": str(hook), "PYTHONINSPECT": "1"})
    finally:
        launch.close()
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "hooked").exists()


# -- no process of a cell outlives it --

DAEMONS = r'''
import os, sys, time
def daemon(path, clear_env):
    if os.fork():
        return
    os.setsid()
    if os.fork():
        os._exit(0)
    if clear_env:
        os.environ.clear()  # and its markers with it
    open(path, "w").write(str(os.getpid()))
    while True:
        time.sleep(1)
daemon("daemon.pid", False)
daemon("unmarked.pid", True)
while not (os.path.exists("daemon.pid") and os.path.exists("unmarked.pid")):
    time.sleep(0.01)
print("started", flush=True)
if sys.argv[1] == "stay":
    time.sleep(600)
'''


@pytest.mark.parametrize("ending", ["command exits", "operator stops the cell"])
def test_daemons_and_unmarked_processes_die_with_the_cell(cell, ending):
    (cell / "daemons.py").write_text(DAEMONS)
    stay = "stay" if ending == "operator stops the cell" else "exit"
    proc = start([sys.executable, "daemons.py", stay], {"PATH": os.environ["PATH"], "REACTOR_CELL": "c1"},
                 policy_for(cell) if ABI >= 1 else None, cwd=cell)
    assert proc.stdout.readline().strip() == "started"
    pids = [int((cell / name).read_text()) for name in ("daemon.pid", "unmarked.pid")]
    assert all(process_alive(pid) for pid in pids)
    began = time.monotonic()
    if stay == "stay":
        proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert time.monotonic() - began < 5
    assert [pid for pid in pids if process_alive(pid)] == [], "every process of the cell is gone when its launcher is"
    assert proc.returncode == (0 if stay == "exit" else 128 + signal.SIGTERM)


def test_the_deadline_kills_the_command_and_everything_it_started(cell):
    (cell / "daemons.py").write_text(DAEMONS)
    began = time.monotonic()
    done = run([sys.executable, "daemons.py", "stay"], {"PATH": os.environ["PATH"]}, None, cwd=cell, deadline=2)
    assert done.returncode == launcher.EXIT_DEADLINE and "deadline of 2s expired" in done.stderr, done.stderr
    assert 2 <= time.monotonic() - began < 10
    assert not any(process_alive(int((cell / name).read_text())) for name in ("daemon.pid", "unmarked.pid"))


# An operator stand-in: starts a cell under the launcher, says its pid, and waits to be killed.
PARENT = r"""
import subprocess, sys, time
from reactor.infra import launcher
launch = launcher.prepare([sys.executable, "daemons.py", "stay"], {"PATH": "/usr/bin:/bin"}, None,
                          deadline=float(sys.argv[2]) if sys.argv[2] != "none" else None, term_grace=0.2,
                          parent_death=sys.argv[1] == "dies")
proc = subprocess.Popen(launch.argv, pass_fds=launch.pass_fds, stdout=subprocess.DEVNULL, start_new_session=True)
print(proc.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("cells", ["die with the operator", "outlive the operator until their deadline"])
def test_a_killed_operators_cells_end_with_it_or_at_their_deadline(cell, cells):
    (cell / "daemons.py").write_text(DAEMONS)
    outlive = cells != "die with the operator"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, "outlives" if outlive else "dies", "5" if outlive else "none"],
                              cwd=cell, stdout=subprocess.PIPE, text=True)
    cell_launcher = int(parent.stdout.readline())
    pids = [int(wait_for(lambda n=name: (cell / n).exists() and (cell / n).read_text(), 30, name))
            for name in ("daemon.pid", "unmarked.pid")]
    parent.kill()
    parent.wait()
    killed = time.monotonic()
    if outlive:
        # The operator's death is not a stop: the cell runs on (to be reattached) ...
        assert process_alive(cell_launcher) and all(process_alive(pid) for pid in pids)
    # ... and ends, every process of it, with its deadline; without the option, at once.
    wait_for(lambda: not any(process_alive(pid) for pid in [cell_launcher, *pids]), 30, "the cell gone")
    assert time.monotonic() - killed < (15 if outlive else 5)


def test_a_cell_that_may_outlive_its_operator_needs_a_deadline():
    with pytest.raises(ValueError, match="needs a deadline"):
        launcher.prepare(["true"], {}, None, parent_death=False)


@needs_landlock
def test_a_cell_cannot_signal_its_launcher(cell):
    if ABI < 6:
        pytest.skip("signal scoping needs Landlock ABI 6")
    done = run([sys.executable, "-c", "import os\ntry:\n os.kill(os.getppid(), 15); print('sent')\n"
                "except PermissionError as e: print('refused')"],
               {"PATH": os.environ["PATH"]}, policy_for(cell), cwd=cell)
    assert done.stdout.strip() == "refused", done.stderr


# -- sockets and ports --

UNIX_CLIENT = r'''
import socket, sys
a, b = socket.socketpair(); a.sendall(b"x"); assert b.recv(1) == b"x"
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(sys.argv[1]); print("connected")
except OSError as e:
    print("refused", e.errno)
'''


@needs_landlock
def test_a_cell_cannot_reach_a_unix_socket_outside_it_but_keeps_socketpair(tmp_path, cell):
    agent = tmp_path / "agent.sock"  # stands in for an ssh-agent or docker socket
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(agent))
        listener.listen()
        env = {"PATH": os.environ["PATH"]}
        confined = run([sys.executable, "-c", UNIX_CLIENT, str(agent)], env, policy_for(cell), cwd=cell)
        unconfined = run([sys.executable, "-c", UNIX_CLIENT, str(agent)], env, None, cwd=cell)
    assert confined.stdout.strip() == "refused 13", confined.stderr
    assert unconfined.stdout.strip() == "connected", "the same program reaches it outside a cell"


PORTS = r'''
import socket, sys
for port in map(int, sys.argv[1:]):
    for what in ("bind", "connect"):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port)) if what == "bind" else s.connect(("127.0.0.1", port))
            print(what, port, "ok")
        except OSError as e:
            print(what, port, "refused" if e.errno == 13 else "errno %d" % e.errno)
        s.close()
'''


@needs_net
def test_a_cell_binds_only_its_own_port_of_the_range_and_no_operator_port(cell):
    with socket.socket() as web:  # the operator's page
        web.bind(("127.0.0.1", 0))
        web.listen()
        web_port = web.getsockname()[1]
        cell_range = range(18950, 18960)
        own, other = 18951, 18955
        with socket.socket() as free:  # a port no one protects, for a test suite of the cell
            free.bind(("127.0.0.1", 0))
            free_port = free.getsockname()[1]
        rulesets = PortRulesets({web_port, *cell_range})
        try:
            net = rulesets.take(own)
            done = run([sys.executable, "-c", PORTS, str(own), str(other), str(web_port), str(free_port)],
                       {"PATH": os.environ["PATH"]}, policy_for(cell, net_ruleset_fd=net), cwd=cell, extra_fds=(net,))
        finally:
            rulesets.close()
    lines = done.stdout.splitlines()
    assert f"bind {own} ok" in lines and f"connect {own} refused" in lines, done.stdout + done.stderr
    assert f"bind {other} refused" in lines and f"connect {other} refused" in lines
    assert f"bind {web_port} refused" in lines and f"connect {web_port} refused" in lines
    assert f"bind {free_port} ok" in lines, "other ports stay free for test suites"


# -- Reactor's git in a checkout --

def test_a_clean_filter_that_hangs_times_out_the_git_step_and_leaves_nothing(repo, work_dir, tmp_path):
    manager = WorktreeManager(work_dir / "worktrees")
    wt = manager.create(repo, "HANG", "main")
    pid_file = tmp_path / "filter.pid"
    # What an agent plants in its own checkout: a filter that never ends.
    git(wt.path, "config", "filter.hang.clean", f"sh -c 'echo $$ > {pid_file}; exec sleep 600'")
    (wt.path / ".gitattributes").write_text("*.py filter=hang\n")
    (wt.path / "calc.py").write_text("changed\n")
    cell_policy = policy_for(tmp_path, no_tcp=True) if ABI >= 1 else None
    wt.confine(cell_policy, git_deadline=2)
    began = time.monotonic()
    with pytest.raises(GitTimeout) as timeout:
        wt.changed_paths()
    assert time.monotonic() - began < 10
    assert timeout.value.step == "status" and "did not finish within 2s" in str(timeout.value)
    assert not process_alive(int(pid_file.read_text())), "the filter was killed with the step"
    manager.remove(wt, keep_branch=False)


@needs_net
def test_reactors_git_in_a_checkout_gets_no_tcp(repo, work_dir, tmp_path):
    with socket.socket() as web:
        web.bind(("127.0.0.1", 0))
        web.listen()
        port = web.getsockname()[1]
        manager = WorktreeManager(work_dir / "worktrees")
        wt = manager.create(repo, "NET", "main")
        report = tmp_path / "filter.txt"
        probe = (f"python3 -c \"import socket,sys\ntry: socket.create_connection(('127.0.0.1',{port}),2); "
                 f"r='connected'\nexcept OSError as e: r=str(e.errno)\nopen('{report}','w').write(r)\"; cat")
        git(wt.path, "config", "filter.probe.clean", probe)
        (wt.path / ".gitattributes").write_text("*.py filter=probe\n")
        (wt.path / "calc.py").write_text("changed\n")
        wt.confine(policy_for(tmp_path, no_tcp=True), git_deadline=30)
        assert "calc.py" in wt.changed_paths()
        manager.remove(wt, keep_branch=False)
    assert report.read_text() == "13", "a filter run by Reactor's git cannot reach the operator's port"
