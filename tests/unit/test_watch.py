"""What counts as an agent's progress (row 4), on events as OpenCode 1.18.33 sends them
(recorded from a real server: docs/faults.md)."""

from __future__ import annotations

import pytest

from reactor.workflow.watch import TurnWatch, is_progress


def part(kind: str, **fields) -> dict:
    return {"type": "message.part.updated", "properties": {"sessionID": "ses_1", "part": {"type": kind, **fields}}}


def step_finish(input_tokens: int, output_tokens: int) -> dict:
    return part("step-finish", tokens={"input": input_tokens, "output": output_tokens, "reasoning": 0,
                                       "cache": {"read": 0, "write": 0}}, reason="unknown")


# What OpenCode loops through when the model answers with empty streams (~every 0.3 s).
EMPTY_STEP = [{"type": "session.status", "properties": {"status": {"type": "busy"}}}, part("step-start"),
              {"type": "message.updated", "properties": {}}, step_finish(0, 0),
              {"type": "session.updated", "properties": {}}, {"type": "session.diff", "properties": {"diff": []}}]


def test_an_empty_step_is_not_progress():
    assert not any(is_progress(event) for event in EMPTY_STEP)
    assert not is_progress({"type": "server.heartbeat", "properties": {}})


def test_text_tools_edits_tokens_and_provider_retries_are_progress():
    assert is_progress({"type": "message.part.delta", "properties": {"field": "text", "delta": "Fixing"}})
    assert is_progress(part("text", text="done"))
    assert is_progress(part("tool", tool="edit", callID="c1", state={"status": "running"}))
    assert is_progress({"type": "file.edited", "properties": {"file": "calc.py"}})
    assert is_progress(step_finish(120, 30))
    assert is_progress({"type": "session.status", "properties": {"status": {"type": "retry", "attempt": 1}}})


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_stall_clock_runs_on_empty_steps_and_stands_still_while_a_tool_runs():
    clock = Clock()
    watch = TurnWatch(client=None, stall_timeout=60, clock=clock)
    clock.now += 30  # OpenCode loading its config: the turn has not started
    assert watch.stalled_for() == 0.0
    turn_started = clock.now
    for _ in range(100):
        for event in EMPTY_STEP:  # the turn starts with the first step's busy status
            watch.observe(event)
        clock.now += 0.3
    assert watch.stalled_for() == pytest.approx(clock.now - turn_started) == pytest.approx(30.0)

    watch.observe(part("tool", tool="bash", callID="c1", state={"status": "running"}))
    clock.now += 500  # a long build the agent started
    assert watch.stalled_for() == 0.0
    watch.observe(part("tool", tool="bash", callID="c1", state={"status": "completed"}))
    clock.now += 10
    assert watch.stalled_for() == pytest.approx(10.0)
