"""Candidates: results replayed onto the base tip by Reactor, from git objects alone.

A result is one commit whose only parent is the base commit it was tested on. Replaying it
onto a later tip is a three-way merge with that parent as the merge base (a cherry-pick),
done with `git merge-tree --write-tree`: no checkout, no index, no hook, no filter runs, and
nothing an agent wrote is executed; a textual conflict is its exit status 1 with the
conflicting paths. `commit-tree` then makes the candidate commit (the result's author and
message, Reactor as committer, a trailer naming the queue entry).

Without `--merge-base` (git 2.40) merge-tree takes the merge base of the two commits; that is
the result's parent exactly when the parent is in the tip's history, which holds because
the base only moves forward through the queue: a result tested on a commit the base branch
no longer contains (history rewritten) is refused as StaleBase before it is replayed.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from reactor.infra.git import GitError, git, git_ok, git_status
from reactor.infra.worktrees import committer_identity

# Names the queue entry on each integrated commit. Git reads trailers from a message's last
# paragraph only, and Reactor writes that paragraph after the task's message: a task cannot
# forge one for another entry.
TRAILER = "Reactor-Queue-Entry"


class TextualConflict(Exception):
    def __init__(self, paths: list[str], onto: str, tree: str = ""):
        super().__init__(f"conflicts with {onto[:12]} in {', '.join(paths) or 'the tree'}")
        self.paths, self.onto = paths, onto
        self.tree = tree  # the merge, conflict markers in the conflicting files


class StaleBase(Exception):
    pass


@dataclass(frozen=True)
class Replayed:
    entry_id: str
    commit: str  # the candidate commit carrying this entry


def check_result(repo: Path, commit: str, base: str) -> None:
    """A queued result is a single commit on the base commit it was tested on."""
    parents = git(repo, "rev-list", "--parents", "-n", "1", commit).split()[1:]
    if parents != [git(repo, "rev-parse", f"{base}^{{commit}}")]:
        raise ValueError(f"result {commit[:12]} is not a single commit on {base[:12]} "
                         f"(parents: {', '.join(p[:12] for p in parents) or 'none'})")


def replay(repo: Path, entry_id: str, commit: str, base: str, onto: str) -> Replayed:
    """``commit`` (whose parent is ``base``) replayed onto ``onto``. Raises TextualConflict,
    StaleBase."""
    if not git_ok(repo, "merge-base", "--is-ancestor", base, onto):
        raise StaleBase(f"tested on {base[:12]}, which the base branch no longer contains")
    if base == onto:
        tree = git(repo, "rev-parse", f"{commit}^{{tree}}")
    else:
        merged = _merge_tree(repo, onto, commit)
        if merged.returncode == 1:  # conflicts: the tree id (markers in its files), then the paths
            lines = merged.stdout.splitlines()
            raise TextualConflict(sorted({p for p in lines[1:] if p}), onto, lines[0] if lines else "")
        if merged.returncode != 0:
            raise GitError(["merge-tree", onto, commit], merged.returncode, merged.stderr)
        tree = merged.stdout.splitlines()[0]
    author = git(repo, "log", "-1", "--format=%an%x00%ae%x00%ad", "--date=raw", commit).split("\0")
    message = git(repo, "log", "-1", "--format=%B", commit).rstrip()
    message = f"{message}\n\n{TRAILER}: {entry_id}\n"
    identity = committer_identity(repo)
    env = {"GIT_AUTHOR_NAME": author[0], "GIT_AUTHOR_EMAIL": author[1], "GIT_AUTHOR_DATE": author[2],
           "GIT_COMMITTER_NAME": identity["name"], "GIT_COMMITTER_EMAIL": identity["email"]}
    candidate = git(repo, "commit-tree", tree, "-p", onto, "-m", message, env=env)
    return Replayed(entry_id, candidate)


def conflicted_replay(repo: Path, entry_id: str, conflict: TextualConflict) -> str:
    """A commit on the tip holding the conflicting merge, markers and all, for the task's
    rebase round (``TaskSpec.start_from``); kept reachable by ``refs/reactor/conflicts/<id>``."""
    identity = committer_identity(repo)  # the operator's git reads no global config: named here
    env = {"GIT_AUTHOR_NAME": identity["name"], "GIT_AUTHOR_EMAIL": identity["email"],
           "GIT_COMMITTER_NAME": identity["name"], "GIT_COMMITTER_EMAIL": identity["email"]}
    commit = git(repo, "commit-tree", conflict.tree, "-p", conflict.onto, "-m",
                 f"{entry_id}: replayed onto {conflict.onto[:12]}, conflicts in {', '.join(conflict.paths)}", env=env)
    git(repo, "update-ref", f"refs/reactor/conflicts/{entry_id}", commit)
    return commit


def rebase_prompt(prompt: str, branch: str, onto: str, paths: list[str]) -> str:
    """The prompt of a task's rebase round, in its own cell, on the base branch's new tip."""
    return (f"Your earlier change for this task no longer applies to {branch}: rebase it onto {onto}. "
            f"It has been replayed onto {onto} in this checkout, and {', '.join(paths)} now hold git "
            "conflict markers (<<<<<<<, =======, >>>>>>>). Resolve every conflict so that the intent of "
            f"both sides is kept, keep the tests green, and change nothing else.\n\nThe task was:\n{prompt}")


def carried_since(repo: Path, since: str, tip: str) -> dict[str, str]:
    """Entry ids carried onto the branch after ``since`` (by their trailers), with the commit:
    what a driver whose record was not saved (or was refused: it lost its Lease) already
    integrated, so it is never replayed again."""
    out = git(repo, "log", f"--format=%H %(trailers:key={TRAILER},valueonly,separator=%x20)", f"{since}..{tip}")
    carried = {}
    for line in out.splitlines():
        commit, _, ids = line.partition(" ")
        for entry_id in ids.split():
            carried.setdefault(entry_id, commit)
    return carried


def _merge_tree(repo: Path, onto: str, commit: str) -> subprocess.CompletedProcess:
    return git_status(repo, "merge-tree", "--write-tree", "--name-only", "--no-messages", onto, commit)
