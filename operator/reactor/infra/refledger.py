"""The refs Reactor vouches for in a repository it shares with cells (a mirror, or the
user's repository in `reactor run`), so it can notice refs that moved behind its back.

Every ref Reactor writes there goes through ``record`` (under the repository lock), into
``<git-dir>/reactor-refs.json``. Before a result is accepted or pushed, ``restore_tampered``
compares the repository's refs with that record: a ref that differs was written by someone
else — with confinement on, a cell cannot (Landlock); without it, this check is what stops a
cell from moving the base branch or another task's branch and having it pushed. Such refs
are put back and reported, and the task fails with reason RefsTampered.

Scope: in a mirror Reactor owns every ref (``own_all``); in the user's repository it owns
only what it created (the user may commit on the base branch meanwhile).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from reactor.infra.git import git

LEDGER_FILE = "reactor-refs.json"


def current_refs(git_dir: Path) -> dict[str, str]:
    out = git(git_dir, "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads", "refs/tags")
    return dict(line.split(" ", 1) for line in out.splitlines() if line)


class RefLedger:
    def __init__(self, git_dir: Path):
        self.git_dir = Path(git_dir)
        self.path = self.git_dir / LEDGER_FILE

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"own_all": False, "refs": {}}

    def _save(self, ledger: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ledger, sort_keys=True))
        os.replace(tmp, self.path)

    def record_all(self) -> None:
        """Reactor just wrote every ref (a mirror's fetch): vouch for all of them."""
        self._save({"own_all": True, "refs": current_refs(self.git_dir)})

    def record(self, ref: str, sha: str | None) -> None:
        """Reactor set ``ref`` to ``sha`` (None: deleted it)."""
        ledger = self._load()
        if sha is None:
            ledger["refs"].pop(ref, None)
        else:
            ledger["refs"][ref] = sha
        self._save(ledger)

    def restore_tampered(self, ignore: set[str] = frozenset()) -> list[str]:
        """Put back every ref that differs from the record; return what was wrong."""
        ledger = self._load()
        recorded: dict[str, str] = ledger["refs"]
        actual = current_refs(self.git_dir)
        names = set(recorded) | (set(actual) if ledger["own_all"] else set())
        tampered = []
        for ref in sorted(names - set(ignore)):
            want, have = recorded.get(ref), actual.get(ref)
            if want == have:
                continue
            tampered.append(f"{ref}: {have or 'deleted'} (expected {want or 'absent'})")
            if want is None:
                git(self.git_dir, "update-ref", "-d", ref)
            else:
                git(self.git_dir, "update-ref", ref, want)
        return tampered
