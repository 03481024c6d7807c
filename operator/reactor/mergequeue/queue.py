"""The merge queue's driver: batches, speculation, bisection, and the base advance.

One round:
1. Build a chain on the base tip from the first ``max_batch * max_parallel`` queued entries,
   each replayed on the one before (``candidates.replay``). An entry that conflicts with the
   tip itself is ejected (TextualConflict: its task must rebase); one that applies on the tip
   but conflicts with an entry ahead of it waits for the next round (the entry ahead may yet
   be ejected).
2. Cut the chain into batches of ``max_batch`` and test every batch's last commit at once
   (up to ``max_parallel``): batch k is tested on top of batches 1..k-1, speculatively.
3. The leading green batches advance the base at once (one compare-and-swap to the last of
   them). The first red batch is bisected between its known-green start and its red end,
   testing up to ``max_parallel`` points at a time (one point: ceil(log2 n) runs for n
   entries); the first entry whose prefix is red is ejected (SemanticConflict, with the test
   output's tail) and the green prefix before it advances the base. Entries after the
   culprit stay queued and are rebuilt on the new tip next round.

An entry whose result has a pull request (``Entry.pull_request``, with ``pull_requests``
given) is a batch of its own and lands through the forge's merge (``base.ForgeMerge``): the
forge merges one pull request at a time, so the base must be exactly its tested parent. A
refused merge queues the entry again (it is rebuilt and tested again), up to
MAX_MERGE_REFUSALS, then it is ejected MergeRefused.

Only tested commits ever become the base tip, so the base never goes red; with batches of
more than one entry the commits inside a batch are carried without a run of their own
(``max_batch: 1`` tests every one). The bisection assumes the tip it starts from is green,
which holds while the branch moves only through the queue.

Crash safety: before each advance the record says what is about to happen (``pending``) and
is saved; the advance is a compare-and-swap; ``recover()`` (run before every round, so by
whoever drives the queue next) reads the tip and finishes or forgets the advance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reactor.infra.git import git, git_ok
from reactor.infra.worktrees import repository_key
from reactor.mergequeue.base import BaseBranch, PullRequestMerge
from reactor.mergequeue.candidates import (StaleBase, TextualConflict, carried_since, check_result,
                                           conflicted_replay, replay)
from reactor.mergequeue.state import Entry, EntryState, Pending, QueueConfig, QueueState, Reason, Store
from reactor.mergequeue.tests import ConfinedTests, TestRun

log = logging.getLogger(__name__)
KEEP_FINISHED = 100  # finished entries kept in the record (a task's own status keeps its verdict)
MAX_MERGE_REFUSALS = 3  # forge merges refused (each followed by a new test) before the entry is ejected


@dataclass(frozen=True)
class QueueEvent:
    """What the queue did, for status, metrics and logs. Kinds: queued, testing, tested,
    advancing (the record says so; the swap is next), advanced, integrated, ejected."""

    kind: str
    entry_id: str = ""
    commit: str = ""
    detail: str = ""


@dataclass
class _Link:
    entry: Entry
    commit: str  # the candidate commit: the tip, the entries ahead in the chain, and this one


class MergeQueue:
    def __init__(self, store: Store, base: BaseBranch, tests: ConfinedTests, config: QueueConfig | None = None,
                 on_event: Callable[[QueueEvent], None] | None = None, repo: Path | None = None,
                 pull_requests: PullRequestMerge | None = None):
        """``config`` makes a new queue when the store holds none; a stored queue keeps its
        own (the test command is locked with the queue). ``repo``: where this driver finds
        the objects, when not where the record says (another replica's own mirror).
        ``pull_requests``: how an entry with a pull request lands (the forge's merge); None:
        by pushes only."""
        self.store, self.base, self.tests, self.on_event = store, base, tests, on_event
        self.pull_requests = pull_requests
        state = store.load()
        if state is None:
            if config is None:
                raise ValueError("no queue stored and no config to make one")
            state = QueueState(config)
            store.save(state)
        self.state = state
        if repo is not None:
            state.config.repo = str(repo)
        self.repo = Path(state.config.repo)
        self.name = f"{repository_key(self.repo)}-{state.config.base_branch}"
        self._lock = asyncio.Lock()

    @property
    def config(self) -> QueueConfig:
        return self.state.config

    # -- entries --

    def enqueue(self, entry_id: str, commit: str, base: str, pull_request: int = 0) -> Entry:
        """A green result enters the queue (idempotent: the same id again changes nothing,
        unless its earlier result was ejected, or it is still waiting with another commit).
        Raises ValueError when the result is not one commit on the base commit it names.
        ``pull_request``: its pull request's number, merged through the forge."""
        existing = self.state.get(entry_id)
        if existing is not None and (existing.state in (EntryState.INTEGRATED, EntryState.INTEGRATING)
                                     or existing.commit == commit):
            return existing
        check_result(self.repo, commit, base)
        entry = Entry(entry_id, commit, base, pull_request=pull_request)
        if existing is not None and existing.state is EntryState.QUEUED:
            existing.commit, existing.base, existing.pull_request = commit, base, pull_request
            entry = existing
        else:
            if existing is not None:
                self.state.entries.remove(existing)
            self.state.entries.append(entry)
        self._save()
        self._emit("queued", entry.id, commit)
        return entry

    def enqueue_result(self, entry_id: str, commit: str, pull_request: int = 0) -> Entry:
        """``enqueue`` of a result that names no base: its only parent is the commit it was
        tested on. Blocking (git). Raises ValueError for a merge or a root commit."""
        parents = git(self.repo, "rev-list", "--parents", "-n", "1", commit).split()[1:]
        if len(parents) != 1:
            raise ValueError(f"result {commit[:12]} is not a single commit on a base commit")
        return self.enqueue(entry_id, commit, parents[0], pull_request)

    def withdraw(self, entry_id: str) -> None:
        """Its task was deleted: a queued entry leaves (an integrating one is already tested)."""
        entry = self.state.get(entry_id)
        if entry is not None and entry.state is EntryState.QUEUED:
            self._eject(entry, Reason.WITHDRAWN, "withdrawn")
            self._save()

    # -- driving --

    async def drain(self) -> None:
        """Rounds until nothing is queued."""
        while await self.run_round():
            pass

    async def run_round(self) -> bool:
        """One round (see the module's doc). False when there was nothing to do."""
        async with self._lock:
            await asyncio.to_thread(self.recover)
            queued = self.state.queued()
            if not queued:
                return False
            tip = await asyncio.to_thread(self.base.tip)
            window = queued[: self.config.max_batch * self.config.max_parallel]
            chain = await asyncio.to_thread(self._build, tip, window)
            if not chain:
                return True  # every entry of the window was ejected or found already carried
            ends = self._batch_ends(chain)
            runs = await self._test([chain[end - 1].commit for end in ends])
            green, red, red_run = 0, 0, None
            for end, run in zip(ends, runs):
                if not run.passed:
                    red, red_run = end, run
                    break
                green = end
            if green and not await self._advance_green(chain, [e for e in ends if e <= green], tip):
                return True  # the branch moved under us (or a forge refused): rebuild on the new tip
            if red_run is None:
                return True
            lo, hi, hi_run = green, red, red_run
            while hi - lo > 1:
                points = _split(lo, hi, self.config.max_parallel)
                for point, run in zip(points, await self._test([chain[p - 1].commit for p in points])):
                    if not run.passed:
                        hi, hi_run = point, run
                        break
                    lo = point
            culprit = chain[hi - 1].entry
            log.info("merge queue %s: %s breaks the tests on top of the %d entries ahead: ejected",
                     self.name, culprit.id, hi - 1)
            self._eject(culprit, Reason.SEMANTIC_CONFLICT, hi_run.output_tail)
            await asyncio.to_thread(self._save)
            if lo > green:
                await self._advance(chain, green, lo, chain[green - 1].commit if green else tip)
            return True

    def recover(self) -> None:
        """Finish or forget an advance a previous driver began (it died, or lost its Lease)."""
        pending = self.state.pending
        if pending is None:
            return
        tip = self.base.tip()
        # Tested on exactly this tip: the swap is made now (a pull request's merge is not
        # repeated blindly: its entry is queued again and tested again).
        if tip == pending.old_tip and not pending.pull_request and self.base.advance(pending.old_tip, pending.new_tip):
            tip = pending.new_tip
        done = tip == pending.new_tip or git_ok(self.repo, "merge-base", "--is-ancestor", pending.new_tip, tip)
        log.info("merge queue %s: resumed an advance to %s: %s", self.name, pending.new_tip[:12],
                 "it was made" if done else "the branch moved elsewhere, entries queued again")
        self._settle(pending, done)

    # -- internals --

    def _build(self, tip: str, window: list[Entry]) -> list[_Link]:
        chain: list[_Link] = []
        onto = tip
        for entry in window:
            already = carried_since(self.repo, entry.base, tip).get(entry.id)
            if already:  # integrated by a driver whose record of it was lost: never twice
                entry.state, entry.integrated_as, entry.integrated_at = EntryState.INTEGRATED, already, time.time()
                entry.finished_at = entry.integrated_at
                self.state.stats.integrated += 1
                self._emit("integrated", entry.id, already)
                continue
            try:
                onto = replay(self.repo, entry.id, entry.commit, entry.base, onto).commit
            except StaleBase as exc:
                self._eject(entry, Reason.STALE_BASE, str(exc))
                continue
            except TextualConflict as conflict:
                if onto != tip:
                    try:
                        replay(self.repo, entry.id, entry.commit, entry.base, tip)
                        continue  # only against an entry ahead, which may yet be ejected: next round
                    except TextualConflict as with_tip:
                        conflict = with_tip
                entry.conflict_commit = conflicted_replay(self.repo, entry.id, conflict) if conflict.tree else ""
                entry.conflict_paths, entry.conflict_onto = list(conflict.paths), conflict.onto
                self._eject(entry, Reason.TEXTUAL_CONFLICT,
                            f"conflicts with base {tip} in: {', '.join(conflict.paths)}")
                continue
            chain.append(_Link(entry, onto))
        self._save()
        return chain

    async def _test(self, commits: list[str]) -> list[TestRun]:
        limit = asyncio.Semaphore(self.config.max_parallel)

        async def one(commit: str) -> TestRun:
            async with limit:
                self.state.runs += 1
                self.state.stats.test_runs += 1
                name = f"{self.name}-{self.state.runs}"
                self._emit("testing", commit=commit)
                run = await self.tests.run(self.repo, commit, self.config.test_command, name,
                                           timeout=self.config.test_timeout)
                self._emit("tested", commit=commit, detail="passed" if run.passed else f"exit {run.exit_code}")
                return run

        runs = await asyncio.gather(*(one(c) for c in commits))
        await asyncio.to_thread(self._save)
        return list(runs)

    def _lands_by_forge(self, entry: Entry) -> bool:
        return bool(entry.pull_request) and self.pull_requests is not None

    def _batch_ends(self, chain: list[_Link]) -> list[int]:
        """Where the chain's batches end (1-based): every ``max_batch`` entries, and around
        an entry that lands through its pull request (alone in its batch: the forge merges
        one pull request onto a tested base at a time)."""
        ends, size = [], 0
        for index, link in enumerate(chain, start=1):
            alone = self._lands_by_forge(link.entry)
            if alone and size:
                ends.append(index - 1)
                size = 0
            size += 1
            if alone or size == self.config.max_batch or index == len(chain):
                ends.append(index)
                size = 0
        return ends

    async def _advance_green(self, chain: list[_Link], ends: list[int], tip: str) -> bool:
        """Advance through the leading green batches (``ends``): pushes jump over batches of
        plain results at once; an entry with a pull request lands by the forge's merge."""
        start, old = 0, tip
        for index, end in enumerate(ends):
            last = index + 1 == len(ends)
            if not self._lands_by_forge(chain[end - 1].entry) and not last \
                    and not self._lands_by_forge(chain[ends[index + 1] - 1].entry):
                continue  # the next batch is pushed along with this one
            if not await self._advance(chain, start, end, old):
                return False
            start, old = end, chain[end - 1].commit
        return True

    async def _advance(self, chain: list[_Link], start: int, end: int, old: str) -> bool:
        """Move the base from ``old`` to chain[end-1], carrying chain[start:end]."""
        entry = chain[end - 1].entry
        by_forge = self._lands_by_forge(entry) and end - start == 1
        pending = Pending(old, chain[end - 1].commit, {link.entry.id: link.commit for link in chain[start:end]},
                          pull_request=entry.pull_request if by_forge else 0)
        for link in chain[start:end]:
            link.entry.state = EntryState.INTEGRATING
        self.state.pending = pending
        await asyncio.to_thread(self._save)  # the record names the advance before it is made
        self._emit("advancing", commit=pending.new_tip)
        if by_forge:
            assert self.pull_requests is not None
            refused = await self.pull_requests.merge(entry.id, entry.pull_request, entry.commit, old, pending.new_tip)
            made = refused is None
            if refused is not None:
                entry.merge_refusals += 1
                log.warning("merge queue %s: %s: %s", self.name, entry.id, refused)
        else:
            made = await asyncio.to_thread(self.base.advance, old, pending.new_tip)
        self._emit("advanced" if made else "advance-refused", commit=pending.new_tip)
        await asyncio.to_thread(self._settle, pending, made)
        if by_forge and not made and entry.merge_refusals >= MAX_MERGE_REFUSALS:
            self._eject(entry, Reason.MERGE_REFUSED, refused or "")
            await asyncio.to_thread(self._save)
        return made

    def _settle(self, pending: Pending, made: bool) -> None:
        now = time.time()
        for entry_id, commit in pending.carried.items():
            entry = self.state.get(entry_id)
            if entry is None or entry.state is not EntryState.INTEGRATING:
                continue
            if made:
                entry.state, entry.integrated_as, entry.integrated_at, entry.finished_at = \
                    EntryState.INTEGRATED, commit, now, now
                self.state.stats.integrated += 1
            else:
                entry.state = EntryState.QUEUED
        if made:
            stats = self.state.stats
            stats.last_integration, stats.last_integration_at, stats.base_green = pending.new_tip, now, True
        self.state.pending = None
        self._save()
        if made:
            for entry_id in pending.carried:
                self._emit("integrated", entry_id, pending.carried[entry_id])

    def _eject(self, entry: Entry, reason: Reason, detail: str) -> None:
        entry.state, entry.reason, entry.detail, entry.finished_at = EntryState.EJECTED, reason.value, detail, time.time()
        self.state.stats.ejected += 1
        self._emit("ejected", entry.id, entry.commit, reason.value)

    def _save(self) -> None:
        """Blocking (a store may be the API server): called in a thread from the event loop."""
        self.state.prune(KEEP_FINISHED)
        self.store.save(self.state)

    def _emit(self, kind: str, entry_id: str = "", commit: str = "", detail: str = "") -> None:
        if self.on_event is not None:
            self.on_event(QueueEvent(kind, entry_id, commit, detail))


def _split(lo: int, hi: int, parts: int) -> list[int]:
    """Up to ``parts`` points strictly between lo and hi, evenly spread (one: the middle)."""
    span = hi - lo
    count = min(parts, span - 1)
    return sorted({lo + (span * i) // (count + 1) for i in range(1, count + 1)} - {lo, hi})
