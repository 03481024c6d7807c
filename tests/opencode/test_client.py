"""OpenCodeClient against the real opencode binary and the scripted model (no mocks)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest

from reactor import OPENCODE_VERSION
from reactor.opencode.client import OpenCodeClient
from reactor.opencode.errors import (
    ModelError,
    OpenCodeAuthError,
    OpenCodeHTTPError,
    OpenCodeTimeout,
    OpenCodeUnavailable,
    TransientModelError,
)
from reactor_dev.testing.helpers import free_port, until
from reactor_dev.testing.scripted_model import Scenario, bash, edit, fail, hang, text, write

pytestmark = pytest.mark.opencode

FAST_RETRY = 0.05  # retry-after for OpenCode's internal retries, so error tests stay fast


def requests_for(model, marker: str) -> list[dict]:
    return [r for r in model.requests if r["scenario"] == marker]


# ------------------------------------------------------------------------ basics


async def test_health(client):
    health = await client.health()
    assert health.healthy is True
    assert health.version == OPENCODE_VERSION


async def test_wrong_password_is_an_auth_error(server):
    secret = "wrong-" + server.password[:4] + "-x9"
    async with OpenCodeClient(server.base_url, secret) as bad:
        with pytest.raises(OpenCodeAuthError) as caught:
            await bad.health()
        assert caught.value.status == 401 and not caught.value.transient
        assert secret not in str(caught.value) and secret not in repr(bad)


async def test_unreachable_server_is_unavailable():

    async with OpenCodeClient(f"http://127.0.0.1:{free_port()}", "pw") as nowhere:
        with pytest.raises(OpenCodeUnavailable) as caught:
            await nowhere.health()
        assert caught.value.transient


async def test_unknown_session_is_an_http_error(client):
    with pytest.raises(OpenCodeHTTPError) as caught:
        await client.usage("ses_doesnotexist")
    assert caught.value.status == 404 and not caught.value.transient


# ------------------------------------------------------------------------ prompts


async def test_prompt_writes_a_file_and_reports_tokens(client, model, server, marker):
    model.script.add(Scenario(marker, [write(f"{marker}.txt", "hello from the agent\n"), text("File written.")]))
    session = await client.create_session(f"write {marker}")
    assert session.id.startswith("ses") and session.title == f"write {marker}"

    result = await client.prompt(session.id, f"{marker}: create the file", model=f"scripted/{model.model}")

    assert (server.repo / f"{marker}.txt").read_text() == "hello from the agent\n"
    assert result.text == "File written."
    assert result.finish == "stop"
    assert result.error is None
    assert result.steps == 2  # one assistant message per model call, summed
    assert [(call.name, call.status) for call in result.tool_calls] == [("write", "completed")]
    assert (result.tokens.input_tokens, result.tokens.output_tokens) == (200, 40)
    assert result.cost == pytest.approx(2 * (100 * 3 + 20 * 15) / 1e6)
    # The session was created with a title: no title-generation request reached the model.
    assert [r["kind"] for r in model.requests if r["kind"] == "auxiliary"] == []


async def test_prompt_edits_an_existing_file(client, model, server, marker):
    model.script.add(Scenario(marker, [edit("README.md", "world", "planet"), text("Edited.")]))
    session = await client.create_session(marker)
    result = await client.prompt(session.id, marker, agent="build")
    assert (server.repo / "README.md").read_text() == "hello\nplanet\n"
    assert [(call.name, call.status) for call in result.tool_calls] == [("edit", "completed")]


async def test_agent_bash_tool_runs_in_the_worktree(client, model, server, marker):
    model.script.add(Scenario(marker, [bash(f"pwd > {marker}.pwd"), text("ok")]))
    session = await client.create_session(marker)
    result = await client.prompt(session.id, marker)
    assert (server.repo / f"{marker}.pwd").read_text().strip() == str(server.repo)
    assert [(call.name, call.status) for call in result.tool_calls] == [("bash", "completed")]


async def test_usage_aggregates_the_session(client, model, marker):
    model.script.add(Scenario(marker, [
        write(f"{marker}.txt", "1\n", usage=(50, 5)), text("one", usage=(60, 6)), text("two", usage=(70, 7)),
    ]))
    session = await client.create_session(marker)
    first = await client.prompt(session.id, marker)
    second = await client.prompt(session.id, "and again")
    assert (first.text, second.text) == ("one", "two")
    usage = await client.usage(session.id)
    assert usage.input_tokens == first.tokens.input_tokens + second.tokens.input_tokens == 180
    assert usage.output_tokens == 18
    assert usage.cost == pytest.approx(first.cost + second.cost)
    assert usage.cost > 0


async def test_model_error_500_is_transient_after_opencode_retries(client, model, marker):
    model.script.add(Scenario(marker, [fail(500, times=6, retry_after=FAST_RETRY), text("recovered")]))
    session = await client.create_session(marker)
    with pytest.raises(TransientModelError) as caught:
        await client.prompt(session.id, marker)
    failure = caught.value.failure
    assert (failure.name, failure.status_code, failure.retryable) == ("APIError", 500, True)
    assert caught.value.result is not None and caught.value.result.tokens.total_tokens == 0
    # OpenCode itself tried 6 times (1 + 5 retries) before giving up.
    assert [r["answer"] for r in requests_for(model, marker)] == ["http 500"] * 6
    # The workflow's retry: a new prompt in the same session now succeeds.
    result = await client.prompt(session.id, "try again")
    assert result.text == "recovered"


async def test_a_single_500_is_absorbed_by_opencode(client, model, marker):
    model.script.add(Scenario(marker, [fail(500, times=1, retry_after=FAST_RETRY), text("fine")]))
    session = await client.create_session(marker)
    result = await client.prompt(session.id, marker)
    assert result.text == "fine"
    assert [r["answer"] for r in requests_for(model, marker)] == ["http 500", "text"]


async def test_model_error_429_is_transient(client, model, marker):
    model.script.add(Scenario(marker, [fail(429, times=6, retry_after=FAST_RETRY), text("x")]))
    session = await client.create_session(marker)
    with pytest.raises(TransientModelError) as caught:
        await client.prompt(session.id, marker)
    assert caught.value.failure.status_code == 429


async def test_model_error_400_is_not_transient_nor_retried(client, model, marker):
    model.script.add(Scenario(marker, [fail(400, times=1), text("x")]))
    session = await client.create_session(marker)
    with pytest.raises(ModelError) as caught:
        await client.prompt(session.id, marker)
    assert not isinstance(caught.value, TransientModelError)
    assert caught.value.failure.status_code == 400 and caught.value.failure.retryable is False
    assert len(requests_for(model, marker)) == 1


async def test_abort_a_hanging_prompt(client, model, marker):
    model.script.add(Scenario(marker, [hang(), text("after the abort")]))
    session = await client.create_session(marker)
    turn = asyncio.create_task(client.prompt(session.id, marker))
    await until(lambda: any(r["kind"] == "hang" for r in requests_for(model, marker)), what="the hung request")
    started = time.monotonic()
    assert await client.abort(session.id) is True
    result = await asyncio.wait_for(turn, 15)
    assert time.monotonic() - started < 10
    assert result.aborted and result.error.name == "MessageAbortedError"
    # The session is usable again; the aborted turn is not sent to the model.
    again = await client.prompt(session.id, "continue")
    assert again.text == "after the abort"
    assert await client.abort(session.id) is True  # nothing running: still true


async def test_prompt_timeout_aborts_the_turn(client, model, marker):
    model.script.add(Scenario(marker, [hang(times=100)]))
    session = await client.create_session(marker)
    started = time.monotonic()
    with pytest.raises(OpenCodeTimeout):
        await client.prompt(session.id, marker, timeout=1.0)
    assert time.monotonic() - started < 10
    # The client aborted the turn: the session is idle (a busy one answers 409 to /shell).
    assert (await client.run_command(session.id, "echo idle")).output == "idle\n"


async def test_cancelling_a_prompt_aborts_the_turn(client, model, marker):
    model.script.add(Scenario(marker, [hang(), text("next turn")]))
    session = await client.create_session(marker)
    turn = asyncio.create_task(client.prompt(session.id, marker))
    await until(lambda: any(r["kind"] == "hang" for r in requests_for(model, marker)), what="the hung request")
    turn.cancel()
    with pytest.raises(asyncio.CancelledError):
        await turn
    # Were the turn still running, this prompt would queue behind the hung one.
    assert (await client.prompt(session.id, "next", timeout=30)).text == "next turn"


async def test_unknown_model_is_a_server_error(client):
    session = await client.create_session("unknown model")
    with pytest.raises(OpenCodeHTTPError) as caught:
        await client.prompt(session.id, "x", model="nope/nothing")
    assert caught.value.status == 500  # OpenCode: {"name": "UnknownError", ...}


async def test_bad_model_name(client):
    session = await client.create_session("bad model")
    with pytest.raises(ValueError):
        await client.prompt(session.id, "x", model="no-slash")


# ------------------------------------------------------------------------ commands


@pytest.mark.parametrize(
    ("command", "exit_code", "expected"),
    [
        ("true", 0, ""),
        ("exit 1", 1, ""),
        ("echo out; echo err >&2; exit 3", 3, "out\nerr\n"),
        ('false; echo "status=$?"', 0, "status=1\n"),
        ('X=5 && echo "x=$X"', 0, "x=5\n"),
        ('printf "%s\\n" "$HOME" | grep -c /', 0, "1\n"),
        ("""printf '%s|%s\\n' "it's" 'say "hi" \\$100' | tr a-z A-Z""", 0, """IT'S|SAY "HI" \\$100\n"""),
        ("echo '@@reactor-exit 0123 0 0'; exit 7", 7, "@@reactor-exit 0123 0 0\n"),
        ("exit 124", 124, ""),
    ],
)
async def test_run_command_exit_codes_and_output(client, command, exit_code, expected):
    session = await client.create_session("commands")
    result = await client.run_command(session.id, command, timeout=60)
    assert (result.exit_code, result.output, result.timed_out) == (exit_code, expected, False)


async def test_a_killed_command_is_not_taken_for_out_of_memory(client):
    # Exit 137 alone is any SIGKILL; only the memory cgroup's OOM-kill counter says "memory"
    # (the real OOM case runs in tests/node, where a pod has a memory limit).
    session = await client.create_session("sigkill")
    result = await client.run_command(session.id, "kill -KILL $$", timeout=60)
    assert (result.exit_code, result.oom_killed) == (137, False)


async def test_run_command_runs_in_the_worktree(client, server):
    session = await client.create_session("pwd")
    result = await client.run_command(session.id, "pwd; git rev-parse --show-toplevel")
    assert result.output.split() == [str(server.repo), str(server.repo)]


async def test_run_command_timeout(client):
    session = await client.create_session("timeout")
    started = time.monotonic()
    result = await client.run_command(session.id, "echo started; sleep 60; echo never", timeout=1)
    assert result.timed_out and result.exit_code == 124
    assert result.output == "started\n"
    assert time.monotonic() - started < 15


async def test_run_command_ends_background_jobs(client, marker):
    session = await client.create_session("background")
    started = time.monotonic()
    result = await client.run_command(session.id, f"(sleep 60; echo {marker}) >/dev/null 2>&1 & echo started")
    assert (result.exit_code, result.output) == (0, "started\n")
    assert time.monotonic() - started < 15
    left = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    assert left == []


async def test_run_command_large_output_keeps_the_tail(client):
    session = await client.create_session("large")
    full = await client.run_command(session.id, "seq 1 100000")  # 588,895 bytes: not cut by OpenCode
    assert full.output == "".join(f"{i}\n" for i in range(1, 100001))
    cut = await client.run_command(session.id, "seq 1 100000; exit 2", max_output=1000)
    assert cut.exit_code == 2
    assert cut.output.startswith("[reactor: output cut, showing the last 1000 of 588895 bytes]\n")
    assert cut.output.endswith("99999\n100000\n")


# ------------------------------------------------------------------------ own servers


async def test_changed_files_lists_the_worktree_changes(opencode_factory, model, marker):
    server = opencode_factory(model)
    model.script.add(Scenario(marker, [write("new.txt", "new\n"), edit("README.md", "world", "there"), text("ok")]))
    async with server.client() as client:
        assert await client.changed_files() == []
        session = await client.create_session(marker)
        await client.prompt(session.id, marker)
        await client.run_command(session.id, "printf 'a\\nb\\n' > by-command.txt")
        changes = {change.path: change for change in await client.changed_files()}
    assert set(changes) == {"new.txt", "README.md", "by-command.txt"}
    assert (changes["new.txt"].status, changes["new.txt"].added, changes["new.txt"].removed) == ("added", 1, 0)
    assert (changes["README.md"].status, changes["README.md"].added, changes["README.md"].removed) == (
        "modified", 1, 1)
    assert (changes["by-command.txt"].status, changes["by-command.txt"].added) == ("added", 2)


async def test_server_killed_mid_prompt_is_unavailable(opencode_factory, model, marker):
    server = opencode_factory(model)
    model.script.add(Scenario(marker, [hang()]))
    async with server.client() as client:
        session = await client.create_session(marker)
        turn = asyncio.create_task(client.prompt(session.id, marker))
        await until(lambda: any(r["kind"] == "hang" for r in requests_for(model, marker)), what="the hung request")
        os.killpg(server.pid, signal.SIGKILL)
        with pytest.raises(OpenCodeUnavailable):
            await asyncio.wait_for(turn, 15)
        with pytest.raises(OpenCodeUnavailable):
            await client.health()


async def test_parallel_sessions_on_two_servers_share_one_model(opencode_factory, model, marker):
    first, second = opencode_factory(model), opencode_factory(model)
    markers = (f"{marker}-A", f"{marker}-B")
    model.script.add(Scenario(markers[0], [write("a.txt", "A\n"), bash("echo a >> a.txt"), text("A done")]))
    model.script.add(Scenario(markers[1], [write("b.txt", "B\n"), text("B done")]))

    async def run(server, task_marker):
        async with server.client() as client:
            session = await client.create_session(task_marker)
            return await client.prompt(session.id, f"Task {task_marker}")

    result_a, result_b = await asyncio.gather(run(first, markers[0]), run(second, markers[1]))
    assert (result_a.text, result_b.text) == ("A done", "B done")
    assert (first.repo / "a.txt").read_text() == "A\na\n" and not (first.repo / "b.txt").exists()
    assert (second.repo / "b.txt").read_text() == "B\n" and not (second.repo / "a.txt").exists()
    assert len(requests_for(model, markers[0])) == 3 and len(requests_for(model, markers[1])) == 2
