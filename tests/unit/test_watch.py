"""What counts as an agent's progress (the stall watch), on events as OpenCode 1.18.33 sends them
(recorded from a real server: docs/faults.md), decoded as the cell's follower decodes them."""

from __future__ import annotations

import pytest

from reactor.opencode.events import EventDecoder
from reactor.workflow.watch import TurnWatch
from reactor.workflow.watch import is_progress as is_progress_event

_parts = iter(range(1_000_000))


def part(kind: str, **fields) -> dict:
    fields.setdefault("id", f"prt_{next(_parts)}")
    return {"type": "message.part.updated", "properties": {"sessionID": "ses_1", "part": {"type": kind, **fields}}}


def is_progress(raw: dict) -> bool:
    event = EventDecoder().decode(raw)
    return event is not None and is_progress_event(event)


class Watch:
    """A TurnWatch fed raw events through one decoder (one per stream, as in a cell)."""

    def __init__(self, watch: TurnWatch):
        self.watch, self.decoder = watch, EventDecoder()

    def observe(self, raw: dict) -> None:
        event = self.decoder.decode(raw)
        if event is not None:
            self.watch.observe(event)

    def stalled_for(self) -> float:
        return self.watch.stalled_for()


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
    assert is_progress(part("text", text="done", time={"start": 1, "end": 2}))
    assert is_progress(part("text", text="Fix"))  # still streaming
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
    watch = Watch(TurnWatch(client=None, stall_timeout=60, clock=clock))
    watch.observe(part("text", text="the prompt"))  # the user's message comes first
    watch.observe({"type": "session.status", "properties": {"status": {"type": "busy"}}})
    clock.now += 30  # OpenCode installing its provider package: no model step yet
    assert watch.stalled_for() == 0.0, "the agent has not begun"
    turn_started = clock.now
    for _ in range(100):
        for event in EMPTY_STEP:  # the agent begins with its first step (each step its own parts)
            watch.observe({**event, "properties": {**event["properties"], "part": {
                **event["properties"]["part"], "id": f"prt_{next(_parts)}"}}} if "part" in event["properties"] else event)
        clock.now += 0.3
    assert watch.stalled_for() == pytest.approx(clock.now - turn_started) == pytest.approx(30.0)

    watch.observe(part("tool", tool="bash", callID="c1", state={"status": "running"}))
    clock.now += 500  # a long build the agent started
    assert watch.stalled_for() == 0.0
    watch.observe(part("tool", tool="bash", callID="c1", state={"status": "completed"}))
    clock.now += 10
    assert watch.stalled_for() == pytest.approx(10.0)
