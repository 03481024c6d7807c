"""Retry classification and the R3 / IG policies."""

from __future__ import annotations

import pytest

from reactor.opencode.errors import (
    ModelError,
    OpenCodeAuthError,
    OpenCodeHTTPError,
    OpenCodeTimeout,
    OpenCodeUnavailable,
    TransientModelError,
)
from reactor.opencode.models import AgentFailure
from reactor.workflow.recovery import RecoveryPolicy, ignore_and_warn, is_transient, retry_transient
from reactor.workflow.watch import AgentStalled

FAST = RecoveryPolicy(r3_initial_delay=0.001)
FAILURE = AgentFailure(name="APIError", message="boom")


@pytest.mark.parametrize(("error", "transient"), [
    (TransientModelError("overloaded", failure=FAILURE), True),
    (OpenCodeHTTPError(503, "unavailable"), True),
    (OpenCodeHTTPError(429, "slow down"), True),
    (OpenCodeHTTPError(400, "bad request"), False),
    (OpenCodeAuthError(), False),
    (ModelError("bad model", failure=FAILURE), False),
    # The server going away is BOOT_RETRY's business (restart it), not R3's.
    (OpenCodeUnavailable("gone"), False),
    (OpenCodeTimeout("slow"), False),
    (AgentStalled("no progress"), False),
    (ValueError("a bug"), False),
])
def test_only_errors_worth_the_same_call_again_are_transient(error, transient):
    assert is_transient(error) is transient


async def test_r3_makes_three_attempts_in_all_then_raises_the_last_error():
    calls, cleanups = [], []

    async def call():
        calls.append(1)
        raise OpenCodeHTTPError(503, f"attempt {len(calls)}")

    async def before_retry():
        cleanups.append(1)

    with pytest.raises(OpenCodeHTTPError, match="attempt 3"):
        await retry_transient("x", call, FAST, before_retry)
    assert len(calls) == 3 and len(cleanups) == 2


async def test_r3_does_not_retry_a_permanent_error():
    calls = []

    async def call():
        calls.append(1)
        raise OpenCodeHTTPError(400, "bad")

    with pytest.raises(OpenCodeHTTPError):
        await retry_transient("x", call, FAST)
    assert len(calls) == 1


async def test_r3_returns_the_first_success():
    calls = []

    async def call():
        calls.append(1)
        if len(calls) < 2:
            raise OpenCodeHTTPError(500, "once")
        return "ok"

    assert await retry_transient("x", call, FAST) == "ok" and len(calls) == 2


async def test_ig_logs_and_returns_the_default(caplog):
    async def call():
        raise RuntimeError("status write forbidden")

    assert await ignore_and_warn("report phase", call, "default") == "default"
    assert "IG: report phase failed" in caplog.text and "status write forbidden" in caplog.text
