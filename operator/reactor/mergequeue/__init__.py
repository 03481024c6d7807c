"""A test-gated merge queue: green results integrate into their base branch one tested
candidate at a time, so the base never goes red ("the not rocket science rule").

No Kubernetes here: the queue's state is a small serialisable record (``state.py``) that a
front end stores where it likes (a file for `reactor`, the API server for the operator);
candidates are built by Reactor from objects alone (``candidates.py``); the repository's
test command runs confined, as a cell's does (``tests.py``); the base advances by a
compare-and-swap (``base.py``: a push, or a forge's merge of the result's pull request
guarded by the tested candidate as its head); ``queue.py`` drives batches, speculation and bisection.
"""

from reactor.mergequeue.base import BaseBranch, ForgeMerge, LocalBranch, PullRequestMerge, PushedBranch
from reactor.mergequeue.queue import MergeQueue, QueueEvent
from reactor.mergequeue.state import Entry, EntryState, FileStore, MemoryStore, QueueConfig, QueueState, Reason
from reactor.mergequeue.candidates import rebase_prompt
from reactor.mergequeue.tests import ConfinedTests, TestRun

__all__ = ["BaseBranch", "ConfinedTests", "Entry", "EntryState", "FileStore", "ForgeMerge", "LocalBranch",
           "MemoryStore", "MergeQueue", "PullRequestMerge", "PushedBranch", "QueueConfig", "QueueEvent", "QueueState", "Reason", "TestRun", "rebase_prompt"]
