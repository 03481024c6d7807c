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


GREEN = "refs/reactor/green/uid-1"


async def test_a_green_record_is_found_by_another_replica_only_when_it_descends_from_the_start(tmp_path):
    """A fleet replica records its green commit in the repository (refs/reactor/green/<uid>);
    an adopter with its own mirror (its own volume) finds it there, fetched as objects only,
    and only when it descends from the commit the lost run started from: a ref someone else
    moved to another history is not built on. The record goes when the task ends."""
    from reactor.workflow.origin import MirrorOrigin

    origin = make_repo(tmp_path / "origin")
    url, start = f"file://{origin}", git(origin, "rev-parse", "main")
    lost = RepositoryMirrors(tmp_path / "lost" / "mirrors", RepositoryPolicy(tmp_path / "lost", (tmp_path,)))
    adopter = RepositoryMirrors(tmp_path / "adopter" / "mirrors", RepositoryPolicy(tmp_path / "adopter", (tmp_path,)))
    recording = MirrorOrigin(lost, "team", url, green_ref=GREEN)
    await recording.fetch()
    tree = git(recording.path, "rev-parse", "main^{tree}")
    green = git(recording.path, "commit-tree", tree, "-p", start, "-m", "Task t1: green, not pushed yet")
    await recording.record_green(green)
    assert git(origin, "rev-parse", GREEN) == green
    assert not git_ok(origin, "rev-parse", "--verify", "refs/heads/reactor/t1"), "a record, not a result"

    finding = MirrorOrigin(adopter, "team", url, green_ref=GREEN)
    assert await finding.find_green(start) == green
    assert git_ok(finding.path, "cat-file", "-e", green), "in the adopter's own mirror now"
    assert await finding.find_green(green) is None, "nothing beyond the start: nothing to resume from"
    # Someone who may push to the repository moves the record to a commit of another history.
    planted = git(origin, "commit-tree", tree, "-m", "unrelated root")
    git(origin, "update-ref", GREEN, planted)
    assert await MirrorOrigin(adopter, "team", url, green_ref=GREEN).find_green(start) is None
    # The task ends: its record goes, from the repository and the mirror.
    await finding.forget_green()
    assert not git_ok(origin, "rev-parse", "--verify", GREEN)
    assert not git_ok(finding.path, "rev-parse", "--verify", GREEN)
    # One replica keeps no record: its mirror, on its own volume, holds the commit.
    single = MirrorOrigin(lost, "team", url)
    await single.record_green(green)
    assert await single.find_green(start) is None and not git_ok(origin, "rev-parse", "--verify", GREEN)
