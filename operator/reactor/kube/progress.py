"""Publishes a task's live progress to ``status.progress``: rate-limited merge patches
(at most one per ``interval`` seconds, none when nothing changed), so a busy agent costs
the API server a bounded number of writes however many events its cell streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from reactor.observe.progress import ProgressTracker

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 2.0

Patch = Callable[[dict[str, Any]], Awaitable[object]]


class ProgressPublisher:
    def __init__(self, tracker: ProgressTracker, patch: Patch, interval: float = DEFAULT_INTERVAL) -> None:
        self.tracker, self.patch, self.interval = tracker, patch, interval
        self.sent_version = -1
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="progress-publisher")

    def poke(self) -> None:
        """Something changed (called for every event; cheap)."""
        if self.tracker.version != self.sent_version:
            self._wake.set()

    def taken(self) -> dict[str, Any]:
        """The snapshot to put into a status write made anyway (a phase change): that write
        carries the progress, and the next rate-limited one is saved."""
        self.sent_version = self.tracker.version
        return self.tracker.snapshot()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.tracker.version == self.sent_version:
                continue
            try:
                await self.patch({"progress": self.taken()})
            except Exception as exc:  # noqa: BLE001 - IG: progress is informative, the task goes on
                log.warning("progress update failed: %s", exc)
            await asyncio.sleep(self.interval)
