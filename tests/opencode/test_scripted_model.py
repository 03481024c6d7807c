"""The scripted model alone, over real HTTP (fast: no OpenCode)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from reactor_dev.testing.scripted_model import (
    AUXILIARY_ANSWER,
    UNMATCHED_ANSWER,
    Scenario,
    Script,
    ScriptedModel,
    bash,
    edit,
    empty,
    fail,
    hang,
    text,
    write,
)

TOOLS = [{"type": "function", "function": {"name": "write", "parameters": {}}}]
SYSTEM = {"role": "system", "content": "...\n<env>\n  Working directory: /work/tree\n</env>\n"}


def chat(model: ScriptedModel, messages: list[dict], *, stream: bool = True, tools=TOOLS, timeout: float = 10):
    body = {"model": model.model, "messages": messages, "stream": stream}
    if tools:
        body["tools"] = tools
    return httpx.post(model.base_url + "/chat/completions", json=body, timeout=timeout)


def parse_sse(response: httpx.Response) -> tuple[list[dict], bool]:
    chunks, done = [], False
    for line in response.text.splitlines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
        else:
            chunks.append(json.loads(data))
    return chunks, done


def assistant_tool_turn() -> list[dict]:
    return [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                                                             "function": {"name": "write", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]


@pytest.fixture
def scripted():
    script = Script([
        Scenario("TASK-A", [write("src/a.py", "x = 1\n"), edit("/abs/b.py", "1", "2"), bash("make test"),
                            text("done", usage=(7, 3))]),
        Scenario("TASK-F", [fail(503, times=2, retry_after=0.01), text("recovered")]),
        Scenario("TASK-H", [hang(), text("after hang")]),
    ])
    with ScriptedModel(script) as model:
        yield model


def test_streams_a_tool_call_with_usage(scripted):
    response = chat(scripted, [SYSTEM, {"role": "user", "content": "Please do TASK-A"}])
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks, done = parse_sse(response)
    assert done
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "write"
    # Relative paths are resolved against the working directory in OpenCode's system prompt.
    assert json.loads(calls[0]["function"]["arguments"]) == {"filePath": "/work/tree/src/a.py", "content": "x = 1\n"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"] == {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}


def test_step_follows_the_number_of_assistant_turns(scripted):
    first = {"role": "user", "content": [{"type": "text", "text": "TASK-A"}]}  # content as parts
    history = [SYSTEM, first]
    names = []
    for _ in range(3):
        chunks, _ = parse_sse(chat(scripted, history))
        names.append(chunks[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"])
        history = history + assistant_tool_turn()
    assert names == ["write", "edit", "bash"]
    chunks, _ = parse_sse(chat(scripted, history))
    assert chunks[1]["choices"][0]["delta"]["content"] == "done"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["prompt_tokens"] == 7
    # Absolute paths stay as they are.
    chunks, _ = parse_sse(chat(scripted, [SYSTEM, first] + assistant_tool_turn()))
    arguments = chunks[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(arguments) == {"filePath": "/abs/b.py", "oldString": "1", "newString": "2"}


def test_user_shell_commands_are_not_model_turns(scripted):
    history = [
        SYSTEM,
        {"role": "user", "content": "TASK-A"},
        *assistant_tool_turn(),
        {"role": "user", "content": "The following tool was executed by the user"},
        *assistant_tool_turn(),
    ]
    chunks, _ = parse_sse(chat(scripted, history))
    assert chunks[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "edit"


def test_non_streaming_answer(scripted):
    response = chat(scripted, [{"role": "user", "content": "TASK-A"}], stream=False)
    body = response.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "write"
    # No working directory known: the path stays relative.
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])["filePath"] == "src/a.py"
    assert body["usage"]["completion_tokens"] == 20


def test_auxiliary_and_unmatched_requests_get_plain_text(scripted):
    title = chat(scripted, [{"role": "system", "content": "You are a title generator."},
                            {"role": "user", "content": "TASK-A"}], tools=None, stream=False)
    assert title.json()["choices"][0]["message"]["content"] == AUXILIARY_ANSWER
    other = chat(scripted, [{"role": "user", "content": "something else"}], stream=False)
    assert other.json()["choices"][0]["message"]["content"] == UNMATCHED_ANSWER
    assert [r["kind"] for r in scripted.requests] == ["auxiliary", "unmatched"]


def test_fail_n_times_then_continue(scripted):
    messages = [{"role": "user", "content": "TASK-F"}]
    first, second = chat(scripted, messages), chat(scripted, messages)
    assert (first.status_code, second.status_code) == (503, 503)
    assert first.headers["retry-after-ms"] == "10"
    assert "scripted failure" in first.json()["error"]["message"]
    chunks, _ = parse_sse(chat(scripted, messages))
    assert chunks[1]["choices"][0]["delta"]["content"] == "recovered"
    assert [r["kind"] for r in scripted.requests] == ["fail", "fail", "text"]


def test_hang_until_the_client_leaves_then_continue(scripted):
    messages = [{"role": "user", "content": "TASK-H"}]
    with pytest.raises(httpx.ReadTimeout):
        chat(scripted, messages, timeout=0.5)
    chunks, _ = parse_sse(chat(scripted, messages))
    assert chunks[1]["choices"][0]["delta"]["content"] == "after hang"


def test_stop_releases_a_hanging_request():
    model = ScriptedModel([Scenario("TASK-H", [hang()])]).start()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            chat(model, [{"role": "user", "content": "TASK-H"}], timeout=30)
        except BaseException as exc:  # noqa: BLE001 - any ending is fine, it must end
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 10
    while not model.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    model.stop()
    assert time.monotonic() - started < 3
    caller.join(10)
    assert not caller.is_alive()


def test_opencode_config(scripted):
    config = scripted.opencode_config()
    provider = config["provider"]["scripted"]
    assert provider["npm"] == "@ai-sdk/openai-compatible"
    assert provider["options"]["baseURL"] == scripted.base_url
    assert scripted.base_url.startswith("http://127.0.0.1:") and scripted.base_url.endswith("/v1")
    assert provider["models"][scripted.model]["tool_call"] is True
    assert config["model"] == f"scripted/{scripted.model}"
    assert config["permission"] == {"edit": "allow", "bash": "allow", "external_directory": "deny"}


def test_invalid_steps():
    with pytest.raises(ValueError):
        fail(times=0)
    with pytest.raises(ValueError):
        hang(times=0)
    with pytest.raises(ValueError):
        empty(times=0)
    with pytest.raises(ValueError):
        ScriptedModel(latency=-1)


def test_empty_stream_n_times_then_continue():
    with ScriptedModel([Scenario("TASK-E", [empty(times=2), text("finally")])]) as model:
        messages = [{"role": "user", "content": "TASK-E"}]
        for _ in range(2):
            response = chat(model, messages)
            assert response.status_code == 200 and parse_sse(response) == ([], True), "no chunk, only [DONE]"
        chunks, _ = parse_sse(chat(model, messages))
        assert chunks[1]["choices"][0]["delta"]["content"] == "finally"
        assert [r["kind"] for r in model.requests] == ["empty", "empty", "text"]


def test_peak_in_flight_counts_cells_with_a_request_open_at_once():
    """``together`` holds requests until that many cells have one open; the peak is counted
    as requests start and end, not sampled."""
    scenarios = [Scenario(f"CELL-{i}", [text(f"answer {i}", together=3)]) for i in range(3)]
    scenarios.append(Scenario("LATE", [text("late", delay=0.05)]))
    with ScriptedModel(scenarios) as model:
        answers: dict[int, int] = {}

        def call(i: int) -> None:
            answers[i] = chat(model, [{"role": "user", "content": f"CELL-{i}"}], timeout=30).status_code

        callers = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(30)
        assert answers == {0: 200, 1: 200, 2: 200}, [(r["kind"], r["scenario"], r["time"]) for r in model.requests]
        assert model.peak_in_flight == 3
        chat(model, [{"role": "user", "content": "LATE"}])  # alone: the peak stays
        assert model.peak_in_flight == 3


def test_latency_delays_every_answer_and_parallel_conversations_overlap():
    """A fixed answer latency, as a real model has: each answer waits ``latency`` seconds, and
    parallel conversations wait side by side (throughput is bound by the callers, not the server)."""
    latency = 0.4
    with ScriptedModel([Scenario(f"TASK-{i}", [text("ok")]) for i in range(4)], latency=latency) as model:
        callers = [threading.Thread(target=chat, args=(model, [SYSTEM, {"role": "user", "content": f"TASK-{i}"}]))
                   for i in range(4)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(10)
        requests = model.requests
    assert len(requests) == 4
    assert all(r["answered"] - r["time"] >= latency for r in requests)
    assert all(r["workdir"] == "/work/tree" for r in requests)
    # All four were waiting at once: the latest start precedes the earliest answer.
    assert max(r["time"] for r in requests) < min(r["answered"] for r in requests)
