"""The queue's state: one small record per queue and one per entry, plain JSON.

Everything the queue must not forget lives here and is saved before it acts on it, so a
driver that dies at any instant (SIGKILL, a replica losing its Lease) can be replaced by
another that loads the record and goes on: ``pending`` names the base advance that was
about to happen (old tip, new tip, the entries it carries); the advance itself is a
compare-and-swap, so on resume the base's tip says whether it happened. Nothing merges
twice, nothing is lost.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

from reactor.errors import ConfigurationError

# An entry id goes into a commit trailer and a file name: keep it plain.
_ENTRY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,299}$")  # a task name (253) and uid


class EntryState(str, Enum):
    QUEUED = "Queued"
    INTEGRATING = "Integrating"  # part of a base advance that is being made (``pending``)
    INTEGRATED = "Integrated"
    EJECTED = "Ejected"


class Reason(str, Enum):
    TEXTUAL_CONFLICT = "TextualConflict"  # does not apply on the base tip: the task must rebase
    SEMANTIC_CONFLICT = "SemanticConflict"  # applies cleanly, but the tests fail with it (bisected)
    STALE_BASE = "StaleBase"  # tested on a commit the base branch no longer contains (rewritten)
    WITHDRAWN = "Withdrawn"
    MERGE_REFUSED = "MergeRefused"  # its pull request's merge was refused again and again (checks, a moved head)


@dataclass
class QueueConfig:
    """What a queue is for and how it integrates; the test command is locked when the queue
    is made (an integration-only stricter command, or the tasks' own)."""

    repo: str  # the repository holding the results' objects (the user's, or the operator's mirror)
    base_branch: str
    test_command: str
    max_batch: int = 4  # results tested together as one candidate (a failed batch is bisected)
    max_parallel: int = 1  # candidates tested at once (speculative batches, and bisection points)
    test_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_parallel < 1:
            raise ConfigurationError("maxBatch and maxParallel must be at least 1")
        if not self.test_command.strip():
            raise ConfigurationError("a merge queue needs a test command")


@dataclass
class Entry:
    id: str
    commit: str  # the green result: a single commit whose only parent is ``base``
    base: str  # the base commit the result was tested on
    enqueued_at: float = field(default_factory=time.time)
    state: EntryState = EntryState.QUEUED
    reason: str = ""  # Reason, when ejected
    detail: str = ""  # conflicting paths, or the failing test output's tail
    integrated_as: str = ""  # the commit on the base branch that carries it
    # TextualConflict: the result replayed onto the tip with conflict markers, and the paths:
    # what its task's rebase round starts from (TaskSpec.start_from).
    conflict_commit: str = ""
    conflict_paths: list[str] = field(default_factory=list)
    conflict_onto: str = ""  # the tip it was replayed onto (the conflict commit's parent)
    # The result's pull request on the forge (0: none): it lands through the forge's merge,
    # guarded by the tested candidate as its head, so the pull request reads as merged.
    pull_request: int = 0
    merge_refusals: int = 0  # forge merges refused so far (each time re-tested; ejected after MAX_MERGE_REFUSALS)
    integrated_at: float = 0.0
    finished_at: float = 0.0

    def __post_init__(self) -> None:
        self.state = EntryState(self.state)
        if not _ENTRY_ID.match(self.id) or ".." in self.id:
            raise ConfigurationError(f"{self.id!r} is not a valid queue entry id")


@dataclass
class Pending:
    """A base advance about to be made: saved before the compare-and-swap."""

    old_tip: str
    new_tip: str
    carried: dict[str, str]  # entry id -> its commit in the new base history
    pull_request: int = 0  # made through the forge's merge of this pull request (not a push)


@dataclass
class Stats:
    test_runs: int = 0
    integrated: int = 0
    ejected: int = 0
    last_integration: str = ""  # the base commit of the last advance
    last_integration_at: float = 0.0
    base_green: bool = True  # the base tip passed the locked test command (every advance is tested)


@dataclass
class QueueState:
    config: QueueConfig
    entries: list[Entry] = field(default_factory=list)
    pending: Pending | None = None
    stats: Stats = field(default_factory=Stats)
    runs: int = 0  # sequence for test-run names

    # -- views --

    def queued(self) -> list[Entry]:
        return [e for e in self.entries if e.state is EntryState.QUEUED]

    def get(self, entry_id: str) -> Entry | None:
        return next((e for e in self.entries if e.id == entry_id), None)

    def position(self, entry_id: str) -> int | None:
        """1-based place among the queued entries (None when not queued)."""
        for index, entry in enumerate(self.queued(), start=1):
            if entry.id == entry_id:
                return index
        return None

    def prune(self, keep: int) -> None:
        """Forget all but the last ``keep`` finished entries (the record stays small; the base
        history's trailers still say what was integrated)."""
        finished = [e for e in self.entries if e.state in (EntryState.INTEGRATED, EntryState.EJECTED)]
        for entry in finished[:max(0, len(finished) - keep)]:
            self.entries.remove(entry)

    @property
    def depth(self) -> int:
        return len(self.queued())

    # -- serialisation --

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=lambda o: o.value))

    @classmethod
    def from_dict(cls, data: dict) -> QueueState:
        pending = data.get("pending")
        return cls(config=QueueConfig(**data["config"]),
                   entries=[Entry(**e) for e in data.get("entries", [])],
                   pending=Pending(**pending) if pending else None,
                   stats=Stats(**data.get("stats", {})),
                   runs=int(data.get("runs", 0)))


class Store(Protocol):
    """Where a queue's record lives (a file, the API server). ``save`` returns once durable."""

    def load(self) -> QueueState | None: ...

    def save(self, state: QueueState) -> None: ...


class MemoryStore:
    """Keeps a serialised copy (so what survives is exactly what a real store would keep)."""

    def __init__(self) -> None:
        self.data: dict | None = None

    def load(self) -> QueueState | None:
        return QueueState.from_dict(json.loads(json.dumps(self.data))) if self.data else None

    def save(self, state: QueueState) -> None:
        self.data = state.to_dict()


class FileStore:
    """A JSON file, replaced atomically and fsynced (a crash leaves the old or the new record)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> QueueState | None:
        try:
            return QueueState.from_dict(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None

    def save(self, state: QueueState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as out:
            json.dump(state.to_dict(), out, indent=1, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
