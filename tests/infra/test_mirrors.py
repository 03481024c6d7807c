"""The operator's repository mirrors (infra/mirrors.py) with real git: one per namespace and
URL, and credentials that reach git without touching argv or disk."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from reactor.infra.git import git_ok
from reactor.infra.mirrors import GitCredentials, RepositoryMirrors
from reactor.infra.repository_urls import RepositoryPolicy, RepositoryRefused
from reactor_dev.testing.repos import git, make_repo


@pytest.fixture
def mirrors(tmp_path: Path, work_dir: Path) -> RepositoryMirrors:
    return RepositoryMirrors(work_dir / "mirrors", RepositoryPolicy(work_dir, (tmp_path,)))


def test_two_namespaces_on_one_url_do_not_see_each_others_results(mirrors, tmp_path):
    url = f"file://{make_repo(tmp_path / 'origin')}"
    mine, theirs = mirrors.sync("team-a", url), mirrors.sync("team-b", url)
    assert mine != theirs
    # An unpushed result of team-a: a commit and its branch, in team-a's mirror only.
    tree = git(mine, "rev-parse", "main^{tree}")
    result = git(mine, "commit-tree", tree, "-p", "main", "-m", "Task SECRET-42: unpushed")
    git(mine, "update-ref", "refs/heads/reactor/SECRET-42", result)
    assert mirrors.sync("team-b", url) == theirs  # a fetch of team-b's mirror brings nothing of team-a's
    assert not git_ok(theirs, "cat-file", "-e", result), "team-b's mirror holds team-a's result commit"
    assert "SECRET-42" not in git(theirs, "for-each-ref", "--format=%(refname)")
    assert git_ok(mine, "cat-file", "-e", result)


def test_a_refused_url_never_reaches_git(mirrors, tmp_path, work_dir):
    other = mirrors.sync("team-a", f"file://{make_repo(tmp_path / 'origin')}")
    with pytest.raises(RepositoryRefused, match="operator's work dir"):
        mirrors.sync("team-b", f"file://{other}")
    assert sorted(p.name for p in (work_dir / "mirrors").iterdir()) == ["team-a"], "nothing was cloned for team-b"


def test_an_ssh_key_reaches_ssh_through_memory_only(tmp_path):
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    before = set(os.listdir(tempfile.gettempdir()))
    with GitCredentials(ssh_private_key=key.read_text()).environment() as auth:
        command = auth.env["GIT_SSH_COMMAND"]
        assert str(tempfile.gettempdir()) not in command and "/dev/fd/" in command
        # What ssh does with `-i /dev/fd/N` (in a child of git, which inherits the descriptor).
        path = command.split("-i ", 1)[1].split()[0]
        public = subprocess.run(["ssh-keygen", "-y", "-f", path], pass_fds=auth.fds, capture_output=True, text=True)
        assert public.stdout.split()[:2] == (tmp_path / "id.pub").read_text().split()[:2], public.stderr
        assert set(os.listdir(tempfile.gettempdir())) == before, "the key was written to the temp dir"
    assert all(not os.path.exists(f"/proc/self/fd/{fd}") for fd in auth.fds), "closed afterwards"
