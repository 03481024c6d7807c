"""The observability parts that need no server: decoding OpenCode's events (as measured on
1.18.33), bounded and redacted transcripts, the spend ledger, the rate-limited publisher."""

from __future__ import annotations

import asyncio
import json


from reactor.opencode.events import EventDecoder, StepFinished, Streaming, TextDone, ToolUpdate
from reactor.observe.fleet import SpendLedger
from reactor.observe.progress import ProgressTracker
from reactor.redact import Redactor
from reactor.observe.transcript import TranscriptStore
from reactor.kube.progress import ProgressPublisher
from reactor.workflow.control import TaskControl


def part_event(part: dict) -> dict:
    return {"type": "message.part.updated", "properties": {"sessionID": "ses_1", "part": part, "time": 1}}


STEP_FINISH = {"id": "prt_9", "messageID": "msg_2", "sessionID": "ses_1", "type": "step-finish", "reason": "tool-calls",
               "tokens": {"total": 120, "input": 100, "output": 20, "reasoning": 0, "cache": {"write": 0, "read": 0}},
               "cost": 0.0006}


def test_a_step_is_counted_once_though_opencode_resends_its_part():
    decoder = EventDecoder()
    decoder.decode({"type": "message.updated", "properties": {"sessionID": "ses_1", "info": {
        "id": "msg_2", "role": "assistant", "providerID": "scripted", "modelID": "m1"}}})
    first = decoder.decode(part_event(STEP_FINISH))
    assert isinstance(first, StepFinished) and first.tokens.total_tokens == 120 and first.cost == 0.0006
    assert first.model == "scripted/m1"
    assert decoder.decode(part_event(STEP_FINISH)) is None


def test_tool_states_and_texts_are_decoded_once_each():
    decoder = EventDecoder()
    tool = {"id": "prt_1", "messageID": "msg_2", "sessionID": "ses_1", "type": "tool", "tool": "bash", "callID": "c1",
            "state": {"status": "running", "input": {"command": "make"}, "time": {"start": 1}}}
    running = decoder.decode(part_event(tool))
    assert isinstance(running, ToolUpdate) and running.status == "running" and running.input == {"command": "make"}
    assert decoder.decode(part_event(tool)) is None  # re-sent with more output: same state
    tool["state"] = {"status": "completed", "input": {"command": "make"}, "output": "ok\n", "time": {"start": 1, "end": 2}}
    done = decoder.decode(part_event(tool))
    assert isinstance(done, ToolUpdate) and done.output == "ok\n"
    decoder.decode({"type": "message.updated", "properties": {"sessionID": "ses_1", "info": {"id": "msg_1", "role": "user"}}})
    prompt = decoder.decode(part_event({"id": "prt_0", "messageID": "msg_1", "sessionID": "ses_1", "type": "text",
                                        "text": "fix it"}))
    assert isinstance(prompt, TextDone) and prompt.role == "user"
    streaming = {"id": "prt_5", "messageID": "msg_2", "sessionID": "ses_1", "type": "text", "text": "Fix", "time": {"start": 1}}
    assert isinstance(decoder.decode(part_event(streaming)), Streaming)  # still streaming: activity, no text yet
    streaming["time"]["end"] = 2
    assert decoder.decode(part_event(streaming)).role == "assistant"


def test_transcripts_are_bounded_redacted_and_removed(tmp_path):
    store = TranscriptStore(tmp_path, max_bytes=2000)
    transcript = store.open("ns", "t1", Redactor(["hunter2-secret"]))
    decoder = EventDecoder()
    for i in range(50):
        transcript.on_event(decoder.decode(part_event({
            "id": f"prt_{i}", "messageID": "m", "sessionID": "s", "type": "tool", "tool": "bash", "callID": f"c{i}",
            "state": {"status": "completed", "input": {"command": "env"}, "output": "TOKEN=hunter2-secret\n" * 5}})))
    transcript.close("failed", "BudgetExceeded", "stopped")
    text = transcript.path.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert "hunter2-secret" not in text and "TOKEN=***" in text
    assert records[-2]["kind"] == "truncated" or records[-1]["kind"] == "end"
    assert [r["kind"] for r in records][-1] == "end" and any(r["kind"] == "truncated" for r in records)
    assert transcript.path.stat().st_size < 2000 + 400, "bounded: past the limit only the end is written"
    store.remove("ns", "t1")
    assert not transcript.path.exists()


async def test_a_follower_sees_records_written_later_and_stops_at_the_end(tmp_path):
    store = TranscriptStore(tmp_path)
    transcript = store.open("ns", "t2")
    transcript.note("first")
    seen = []

    async def follow():
        async for record in store.read("ns", "t2", follow=True):
            seen.append(record["kind"])

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0)  # the follower reads what is there and waits
    transcript.note("second")
    transcript.close("committed", "Committed", "ok")
    await asyncio.wait_for(follower, 5)
    assert seen == ["note", "note", "end"]


def test_the_spend_ledger_starts_again_each_day_and_tells_listeners():
    day = ["2026-11-27"]
    ledger = SpendLedger(clock=lambda: day[0])
    heard = []
    ledger.subscribe(lambda ns, cost, tokens: heard.append((ns, cost, tokens)))
    ledger.add("a", 0.5, 100)
    ledger.add("a", 0.25, 50)
    assert ledger.today("a").cost == 0.75 and ledger.today("a").tokens == 150
    day[0] = "2026-11-28"
    assert ledger.today("a").cost == 0 and heard == [("a", 0.5, 100), ("a", 0.25, 50)]


async def test_progress_changes_are_coalesced_into_one_write_per_interval():
    control = TaskControl()
    tracker = ProgressTracker(control)
    writes = []
    written = asyncio.Event()

    async def patch(status):
        writes.append(status["progress"]["toolCalls"])
        written.set()

    publisher = ProgressPublisher(tracker, patch, interval=3600)  # one write, then a long pause
    publisher.start()
    decoder = EventDecoder()
    for i in range(20):
        tracker.on_event(decoder.decode(part_event({
            "id": f"prt_{i}", "messageID": "m", "sessionID": "s", "type": "tool", "tool": "read", "callID": f"c{i}",
            "state": {"status": "running", "input": {"filePath": "/w/a.py"}}})))
        publisher.poke()
    await asyncio.wait_for(written.wait(), 5)
    await publisher.stop()
    assert writes == [20], "twenty changes, one write"
    assert publisher.taken()["toolCalls"] == 20 and tracker.activity == "read /w/a.py"


def test_every_progress_field_is_declared_in_the_crd():
    """The API server prunes undeclared status fields silently: each key written must be in the schema."""
    from pathlib import Path

    import yaml

    crd = yaml.safe_load((Path(__file__).resolve().parents[2] / "crds" / "agenttask.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    declared = set(schema["progress"]["properties"])
    written = set(ProgressTracker(TaskControl()).snapshot())
    assert written == declared, (written - declared, declared - written)
