"""A cell's reads are an allowlist: the OS directories minus their secrets, the toolchains on
PATH, opencode, Reactor, the cell's own paths; not temp dirs, /run, home dirs, the work dir
or what the operator keeps for itself. Policy rules as unit tests, then the real kernel
(Landlock through the launcher, no opencode); the end-to-end attack is in tests/security."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from reactor.infra import launcher

from reactor.infra.confinement import Confinement, ConfinementSettings, kernel_support, toolchain_roots

HOME = Path(os.path.expanduser("~")).resolve()


def grants(paths: list[str]) -> list[Path]:
    return [Path(p) for p in paths]


def covers(granted: list[Path], path: Path) -> bool:
    path = Path(os.path.realpath(path))
    return any(path == g or g in path.parents for g in granted)


@pytest.fixture
def confinement(tmp_path: Path) -> Confinement:
    if not kernel_support().filesystem:
        pytest.skip("no Landlock in this kernel")
    return Confinement(ConfinementSettings(), tmp_path / "work", shared_read=[])


def test_reads_are_the_os_and_toolchains_not_temp_run_home_or_secrets(confinement, tmp_path):
    read = grants(confinement.system_read(os.environ["PATH"]))
    for allowed in ("/usr/bin/env", "/etc/passwd", "/proc/self/status", "/dev/null"):
        assert covers(read, Path(allowed)), allowed
    python = shutil.which("python3")
    assert covers(read, Path(python)), "the toolchain on PATH"
    for denied in ("/tmp", "/var/tmp", "/run", "/home", str(HOME), str(tmp_path), "/etc/shadow", "/etc/gshadow",
                   "/etc/sudoers", "/dev/shm", "/var/lib"):
        assert not covers(read, Path(denied)), denied
    assert not any(Path(denied) in g.parents or g == Path(denied) for g in read
                   for denied in ("/etc/shadow", str(tmp_path / "work")))


def test_a_path_entry_in_home_grants_that_entry_not_the_home(tmp_path):
    assert toolchain_roots(f"{tmp_path}/missing/bin") == [], "missing dirs are not granted"
    (tmp_path / "bin").mkdir()
    roots = toolchain_roots(f"{tmp_path / 'bin'}:{HOME}:/bin")
    assert tmp_path in roots, "an install prefix in a temp dir, named on PATH"
    assert HOME not in roots and HOME.parent not in roots and Path("/") not in roots, "PATH=~:/bin grants neither ~ nor /"


def test_readable_and_protected_paths_add_and_subtract(tmp_path):
    if not kernel_support().filesystem:
        pytest.skip("no Landlock in this kernel")
    tools = tmp_path / "tools"
    (tools / "lib").mkdir(parents=True)
    (tools / "secret").mkdir()
    settings = ConfinementSettings(readable_paths=[str(tools)], protected_paths=[str(tools / "secret")])
    read = grants(Confinement(settings, tmp_path / "work", shared_read=[]).system_read("/usr/bin"))
    assert covers(read, tools / "lib") and not covers(read, tools / "secret")


_PROBE = r'''
import json, os, subprocess, sys
results = {}
for path in json.loads(sys.argv[1]):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            os.listdir(path)
        else:
            open(path, "rb").read(1)
        results[path] = "read"
    except OSError as exc:
        results[path] = type(exc).__name__
for tool in ([["git", "--version"], ["bash", "-c", "echo ok"], ["python3", "-c", "import ssl"], ["make", "--version"],
              ["node", "--version"]]):
    try:
        results[tool[0]] = subprocess.run(tool, capture_output=True).returncode
    except OSError as exc:
        results[tool[0]] = type(exc).__name__
print(json.dumps(results))
'''


def test_a_confined_process_reads_what_is_allowed_and_nothing_else(confinement, tmp_path):
    """As root here, /etc/shadow is readable to an unconfined process with its capabilities,
    and stays so with them dropped (root owns it): only the policy hides it."""
    work = tmp_path / "work"
    cell, other = work / "cells" / "mine", work / "cells" / "other"
    private_tmp = work / "operator" / "tmp" / "1_2"
    for directory in (cell, other, private_tmp):
        directory.mkdir(parents=True)
    (cell / "own.txt").write_text("mine")
    (other / "theirs.txt").write_text("theirs")
    (private_tmp / "tmpkey").write_text("client key")
    (tmp_path / "in-tmp.txt").write_text("temp")
    policy = confinement.cell_policy(writable=[cell], readable=[], path_env=os.environ["PATH"])
    denied = ["/tmp", str(tmp_path / "in-tmp.txt"), str(private_tmp / "tmpkey"), str(work / "operator"), "/run",
              str(HOME), str(other / "theirs.txt"), "/etc/shadow", "/var/tmp"]
    allowed = [str(cell / "own.txt"), "/etc/passwd", "/usr/bin", "/proc/self/status"]
    launch = launcher.prepare([shutil.which("python3"), "-I", "-c", _PROBE, json.dumps(denied + allowed)],
                              {"PATH": os.environ["PATH"]}, policy.launch_policy(no_tcp=True))
    try:
        probe = subprocess.run(launch.argv, env=launch.env, pass_fds=launch.pass_fds, cwd=cell,
                               capture_output=True, text=True, timeout=60)
    finally:
        launch.close()
    assert probe.returncode == 0, probe.stderr
    results = json.loads(probe.stdout)
    for path in denied:
        if os.path.exists(path):
            assert results[path] == "PermissionError", (path, results[path])
    for path in allowed:
        assert results[path] == "read", (path, results[path])
    for tool in ("git", "bash", "python3", "make", "node"):
        if shutil.which(tool):
            assert results[tool] == 0, (tool, results[tool])


def test_a_system_link_to_runtime_state_grants_its_directory_only(tmp_path):
    """/etc/resolv.conf -> /run/systemd/resolve/stub-resolv.conf: the resolver's directory
    (it rewrites the file by rename), not /run."""
    from reactor.infra.confinement import _link_targets

    resolve = tmp_path / "run" / "resolve"
    resolve.mkdir(parents=True)
    (resolve / "stub-resolv.conf").write_text("nameserver 127.0.0.53\n")
    (tmp_path / "run" / "other").write_text("x")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "resolv.conf").symlink_to(resolve / "stub-resolv.conf")
    (etc / "in-usr").symlink_to("/usr/bin/env")
    assert _link_targets(etc, [Path("/usr")], never={tmp_path / "run"}) == [resolve]
