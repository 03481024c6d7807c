"""The fleet page draws the merge queues this operator drives: their figures, and their items
in order with their state (headless chromium on the real web server; the queue's record is
made by hand, as a driver would have saved it)."""

from __future__ import annotations

import httpx
import pytest

from reactor.kube.mergequeues import queue_view
from reactor.mergequeue import Entry, EntryState, QueueConfig, QueueState
from reactor.observe.observation import Observatory
from reactor.observe.web import WebServer


def record() -> QueueState:
    state = QueueState(QueueConfig(repo="/m", base_branch="main", test_command="make test"))
    state.entries = [
        Entry("done.u1", "1" * 40, "0" * 40, state=EntryState.INTEGRATED, integrated_as="a" * 40, finished_at=10.0),
        Entry("broke.u2", "2" * 40, "0" * 40, state=EntryState.EJECTED, reason="SemanticConflict", finished_at=20.0),
        Entry("second.u3", "3" * 40, "0" * 40),
        Entry("landing.u4", "4" * 40, "0" * 40, state=EntryState.INTEGRATING),
        Entry("third.u5", "5" * 40, "0" * 40),
    ]
    state.stats.test_runs, state.stats.integrated, state.stats.ejected = 4, 1, 1
    state.stats.last_integration, state.stats.last_integration_at = "a" * 40, 10.0
    return state


@pytest.mark.needs("chromium")
async def test_the_fleet_page_draws_each_queue_with_its_items_in_order(tmp_path):
    from playwright.async_api import async_playwright

    observatory = Observatory(tmp_path / "transcripts")
    observatory.queues.update(queue_view("team", "main", record()))
    server = WebServer(observatory, "127.0.0.1", 0)
    await server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient() as client:
            queues = (await client.get(f"{url}/api/v1/tasks")).json()["queues"]
        assert [(q["namespace"], q["name"], q["depth"]) for q in queues] == [("team", "main", 2)]
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            try:
                page = await browser.new_page()
                await page.goto(url + "/")
                await page.wait_for_selector('.queue[data-queue="team/main"] li')
                items = [(await li.get_attribute("data-task"), await li.get_attribute("data-state"),
                          await li.inner_text()) for li in await page.query_selector_all(".queue li")]
                head = await page.inner_text('.queue[data-queue="team/main"] p')
                colour = await page.eval_on_selector('li[data-task="broke"]', "e => getComputedStyle(e).backgroundColor")
            finally:
                await browser.close()
    finally:
        await server.stop()
    # Being integrated, then waiting by position, then the latest finished first.
    assert [(task, state) for task, state, _ in items] == [
        ("landing", "Integrating"), ("second", "Queued"), ("third", "Queued"), ("broke", "Ejected"),
        ("done", "Integrated")]
    assert "#1" in items[1][2] and "#2" in items[2][2] and "SemanticConflict" in items[3][2]
    assert "depth 2" in head and "base green" in head and "last integration aaaaaaa" in head
    assert colour == "rgb(183, 28, 28)", "an ejected item is drawn red"
