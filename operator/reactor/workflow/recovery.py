"""The design's recovery strategies as policies (docs/architecture.md names each).

| Code       | Strategy                | Attempts                  | Backoff     |
|------------|-------------------------|---------------------------|-------------|
| R3         | retry                   | 3 in all                  | exponential |
| BOOT_RETRY | kill and restart server | 2 restarts after the first | linear      |
| RB         | rollback and halt       | -                         | -           |
| IG         | ignore and warn         | -                         | -           |

RB is the workflow's revert path (reset --hard + clean, no commit); IG is `ignore_and_warn`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential

from reactor.opencode.errors import OpenCodeHTTPError, TransientModelError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RecoveryPolicy:
    r3_attempts: int = 3
    r3_initial_delay: float = 0.5  # seconds; doubles each attempt
    boot_restarts: int = 2
    boot_delay: float = 0.5  # seconds; times the restart number (linear)


def is_transient(exc: BaseException) -> bool:
    """Errors worth the same call again: the model overloaded or failing, a 5xx/429 from the server."""
    if isinstance(exc, TransientModelError):
        return True
    return isinstance(exc, OpenCodeHTTPError) and exc.transient


async def retry_transient(
    what: str,
    call: Callable[[], Awaitable[T]],
    policy: RecoveryPolicy,
    before_retry: Callable[[], Awaitable[None]] | None = None,
) -> T:
    """R3: run ``call``; on a transient error wait (exponential) and run it again, up to
    ``policy.r3_attempts`` times in all. ``before_retry`` restores a clean state between tries."""

    def warn(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("R3: %s failed (attempt %d/%d): %s; retrying", what, state.attempt_number, policy.r3_attempts, error)

    async for attempt in AsyncRetrying(
        stop=stop_after_attempt(policy.r3_attempts),
        wait=wait_exponential(multiplier=policy.r3_initial_delay, max=30),
        retry=retry_if_exception(is_transient),
        before_sleep=warn,
        reraise=True,
    ):
        with attempt:
            if attempt.retry_state.attempt_number > 1 and before_retry is not None:
                await before_retry()
            return await call()
    raise AssertionError("unreachable: tenacity reraises the last error")


async def ignore_and_warn(what: str, call: Callable[[], Awaitable[T]], default: T) -> T:
    """IG: a non-critical step failed; log a warning and go on with ``default``."""
    try:
        return await call()
    except Exception as exc:  # noqa: BLE001 - that is the point of IG
        log.warning("IG: %s failed, going on without it: %s", what, exc)
        return default
