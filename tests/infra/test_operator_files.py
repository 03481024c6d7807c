"""The operator never follows a link a cell planted, and keeps its own files (server logs,
temp files such as the kubernetes client's key files) outside every cell-writable tree.
Rule-level checks with real files; the end-to-end path is tests/security/test_planted.py."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reactor.infra import safefs
from reactor.infra.private import OperatorFiles
from reactor.infra.servers import OpenCodeServer, ServerSpec

ORIGINAL = "the operator's own file\n"


def outside_files(tmp_path: Path, *names: str) -> dict[str, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    files = {}
    for name in names:
        files[name] = outside / name
        files[name].write_text(ORIGINAL)
    return files


def server_for(tmp_path: Path, seed: Path | None = None) -> OpenCodeServer:
    return OpenCodeServer(ServerSpec(binary="opencode", cwd=tmp_path, port=1, cell_id="c", state_dir=tmp_path / "cells" / "c",
                                     work_dir=tmp_path, seed_dir=seed, log_path=tmp_path / "operator" / "logs" / "c.log"))


def make_seed(tmp_path: Path) -> Path:
    seed = tmp_path / "seed"
    (seed / "node_modules").mkdir(parents=True)
    (seed / "package.json").write_text('{"seed": 1}\n')
    (seed / "package-lock.json").write_text('{"lock": 1}\n')
    return seed


def test_preparing_a_state_dir_replaces_planted_links_and_writes_through_none(tmp_path):
    """What the agent left in its state dir before killing its server: links from every file
    the operator writes there to files outside the cell, and its home dir as a link to a
    directory outside. The restart writes the cell's files anew; the targets are unchanged."""
    targets = outside_files(tmp_path, "gitconfig", "bash_profile", "package.json", "package-lock.json")
    victim_dir = tmp_path / "outside" / "victim-home"
    victim_dir.mkdir()
    server = server_for(tmp_path, make_seed(tmp_path))
    server._prepare_state_dir()
    state = server.spec.state_dir
    (state / "home" / ".profile").unlink()
    (state / "home" / ".profile").symlink_to(targets["gitconfig"])
    (state / "home" / ".bash_profile").unlink()
    os.link(targets["bash_profile"], state / "home" / ".bash_profile")  # a hard link is not written through either
    for name in ("package.json", "package-lock.json"):
        (state / "config" / "opencode" / name).unlink()
        (state / "config" / "opencode" / name).symlink_to(targets[name])
    (state / "tmp").rmdir()
    (state / "tmp").symlink_to(victim_dir)

    server._prepare_state_dir()

    for target in targets.values():
        assert target.read_text() == ORIGINAL, f"{target} unchanged"
    assert list(victim_dir.iterdir()) == []
    profile = state / "home" / ".profile"
    assert not profile.is_symlink() and "PATH=" in profile.read_text()
    assert not (state / "tmp").is_symlink() and (state / "tmp").is_dir()
    assert (state / "config" / "opencode" / "package.json").read_text() == '{"seed": 1}\n'
    assert (state / "config" / "opencode" / "node_modules").resolve() == (tmp_path / "seed" / "node_modules").resolve()


def test_a_planted_home_dir_link_is_replaced_not_entered(tmp_path):
    victim_dir = tmp_path / "victim-home"
    victim_dir.mkdir()
    (victim_dir / ".profile").write_text(ORIGINAL)
    server = server_for(tmp_path)
    (server.spec.state_dir).mkdir(parents=True)
    (server.spec.state_dir / "home").symlink_to(victim_dir)
    server._prepare_state_dir()
    assert (victim_dir / ".profile").read_text() == ORIGINAL
    assert not (server.spec.state_dir / "home").is_symlink()


def test_the_server_log_is_the_operators_not_in_the_state_dir(tmp_path):
    server = server_for(tmp_path)
    assert server.spec.state_dir not in server.log_path.parents
    (server.spec.state_dir).mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.write_text("TOP-SECRET\n")
    (server.spec.state_dir / "server.log").symlink_to(secret)  # where the log used to be
    assert "TOP-SECRET" not in server.log_tail()


def test_reading_a_cell_file_follows_no_link(tmp_path):
    cell = tmp_path / "cell"
    (cell / "dir").mkdir(parents=True)
    (cell / "dir" / "plain.txt").write_text("plain\n")
    secret = tmp_path / "secret"
    secret.write_text("TOP-SECRET\n")
    (cell / "link.txt").symlink_to(secret)
    (cell / "linkdir").symlink_to(tmp_path)
    assert safefs.read_regular(cell, "dir/plain.txt") == b"plain\n"
    assert safefs.read_regular(cell, "link.txt") is None
    assert safefs.read_regular(cell, "linkdir/secret") is None
    assert safefs.read_regular(cell, "missing") is None
    with pytest.raises(ValueError):
        safefs.read_regular(cell, "../secret")


def test_removing_a_cell_dir_removes_its_links_not_their_targets(tmp_path):
    """shutil.rmtree is fd-based on Linux (avoids_symlink_attacks): the cell's links go, the
    directories and files they point to stay."""
    assert shutil.rmtree.avoids_symlink_attacks
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "keep.txt").write_text(ORIGINAL)
    cell = tmp_path / "cells" / "c"
    (cell / "home").mkdir(parents=True)
    (cell / "home" / "dirlink").symlink_to(outside)
    (cell / "filelink").symlink_to(outside / "sub" / "keep.txt")
    shutil.rmtree(cell)
    assert not cell.exists() and (outside / "sub" / "keep.txt").read_text() == ORIGINAL


def test_the_operators_temp_files_and_git_home_are_private_and_outlive_no_process(tmp_path):
    """`reactor operator` and `reactor run` claim a private temp dir before loading a
    kubeconfig: the kubernetes client's key files land there (0700, under the work dir, which
    no cell may read), and a later start removes what a SIGKILLed process left behind."""
    key = b"-----BEGIN EC PRIVATE KEY-----\nnot-a-real-key\n-----END EC PRIVATE KEY-----\n"
    b64 = base64.b64encode
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1", "certificate-authority-data": b64(b"ca").decode()}}],
        "users": [{"name": "u", "user": {"client-certificate-data": b64(b"cert").decode(), "client-key-data": b64(key).decode()}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    work = tmp_path / "work"
    program = ("import os, signal, sys, tempfile; from reactor.infra.private import claim_process_dirs; "
               "claim_process_dirs(sys.argv[1]); import kubernetes; kubernetes.config.load_kube_config(sys.argv[2]); "
               "print(tempfile.gettempdir(), os.environ['TMPDIR'], flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", program, str(work), str(kubeconfig)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    temp, tmpdir = killed.stdout.split()
    files = OperatorFiles(work)
    assert temp == tmpdir and Path(temp).parent == files.temp_root
    assert any(f.read_bytes() == key for f in Path(temp).iterdir()), "the client key is in the private temp dir"
    for path in (files.root, files.temp_root, Path(temp)):
        assert os.stat(path).st_mode & 0o777 == 0o700

    subprocess.run([sys.executable, "-c", program.replace("os.kill(os.getpid(), signal.SIGKILL)", "pass"), str(work),
                    str(kubeconfig)], check=True, capture_output=True)
    assert not Path(temp).exists(), "the next start removed the killed process's keys"
    assert list(files.temp_root.iterdir()) == [], "and a clean exit removes its own"


def test_a_private_dir_that_is_a_link_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "operator").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(safefs.PlantedPath):
        OperatorFiles(tmp_path / "work").prepare()


async def test_the_servers_output_reaches_its_log_through_pipes_whatever_its_lines(tmp_path):
    """stdout and stderr are copied into the operator's log (a 200 KB line included: longer
    than a stream reader's line limit) and the listening line is noticed."""
    import asyncio

    server = server_for(tmp_path)
    script = "head -c 200000 /dev/zero | tr '\\0' x >&2; echo >&2; echo 'opencode server listening on http://x'"
    server._process = await asyncio.create_subprocess_exec(
        "sh", "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await server._pump_output()
    await server._process.wait()
    assert server._listening.is_set()
    log = server.log_path.read_bytes()
    assert log.count(b"x") >= 200000 and b"listening on" in log
    assert os.stat(server.log_path).st_mode & 0o777 == 0o600
