// Reactor fleet page: read-only, polls the operator's JSON API; no build step.
"use strict";
const PHASE_COLORS = {
  Pending: "#9e9e9e", Bootstrapping: "#1e88e5", Executing: "#8e24aa", Testing: "#fb8c00",
  Committing: "#00897b", Pushing: "#3949ab", Reverting: "#e53935", TearingDown: "#546e7a", Succeeded: "#2e7d32", Failed: "#b71c1c",
};
const POLL_MS = 2000;
let selected = null;          // [namespace, name]
let transcriptAbort = null;   // AbortController of the open transcript stream

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
const money = (v) => "$" + Number(v || 0).toFixed(4);
function age(iso, now) {
  const s = Math.max(0, (Date.parse(now) - Date.parse(iso)) / 1000);
  if (s < 90) return Math.round(s) + "s";
  if (s < 5400) return Math.round(s / 60) + "m";
  return Math.round(s / 3600) + "h";
}

// spec.dependsOn, each parent it still waits for marked: "add-api (waiting), add-db".
function dependencies(task) {
  const waiting = new Set(task.waiting_on || []);
  return (task.depends_on || []).map((name) => waiting.has(name) ? name + " (waiting)" : name).join(", ");
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

async function refresh() {
  try {
    const data = await getJSON("api/v1/tasks");
    renderSpend(data.spend);
    renderTasks(data.tasks, data.now);
    renderQueues(data.queues || []);
    document.getElementById("updated").textContent = "updated " + data.now;
    if (selected) await refreshDetail();
  } catch (error) {
    document.getElementById("updated").textContent = "cannot reach the operator: " + error.message;
  }
}

function renderSpend(spend) {
  const body = document.querySelector("#spend tbody");
  body.replaceChildren();
  for (const [ns, day] of Object.entries(spend)) {
    const row = el("tr");
    row.append(el("td", ns), el("td", money(day.cost)), el("td", day.tokens));
    body.append(row);
  }
}

function renderTasks(tasks, now) {
  const body = document.querySelector("#tasks tbody");
  body.replaceChildren();
  document.getElementById("no-tasks").hidden = tasks.length > 0;
  for (const task of tasks) {
    const row = el("tr");
    row.dataset.task = task.namespace + "/" + task.name;
    if (selected && selected[0] === task.namespace && selected[1] === task.name) row.className = "selected";
    const phase = el("td"); phase.append(el("span", task.phase, "phase phase-" + task.phase));
    row.append(el("td", task.namespace), el("td", task.name), phase, el("td", task.reason), el("td", dependencies(task)),
               el("td", money(task.cost)), el("td", task.activity), el("td", age(task.created, now)));
    row.addEventListener("click", () => { location.hash = "#/task/" + task.namespace + "/" + task.name; });
    body.append(row);
  }
}

// Each merge queue this operator drives: a line of figures, then its items in order (waiting
// and integrating first, by position; then the latest integrated or ejected), each a chip
// coloured by its state.
function renderQueues(queues) {
  document.getElementById("queues-section").hidden = queues.length === 0;
  const box = document.getElementById("queues");
  box.replaceChildren();
  for (const queue of queues) {
    const div = el("div", null, "queue");
    div.dataset.queue = queue.namespace + "/" + queue.name;
    const head = el("p");
    head.append(el("strong", queue.namespace + "/" + queue.name), " → " + queue.branch + " · depth " + queue.depth + " · base ",
                el("span", queue.base_green ? "green" : "red", queue.base_green ? "base-green" : "base-red"),
                " · last integration " + (queue.last_integration ? queue.last_integration.slice(0, 7) : "none") +
                " · " + queue.test_runs + " test runs, " + queue.integrated + " integrated, " + queue.ejected + " ejected");
    const items = el("ol", null, "queue-items");
    for (const item of queue.items) {
      const detail = item.state === "Queued" ? "#" + item.position : (item.reason || "");
      const li = el("li", null, "item item-" + item.state);
      li.dataset.task = item.task; li.dataset.state = item.state;
      li.append(el("span", item.task, "item-task"), el("span", item.state + (detail ? " " + detail : ""), "item-state"));
      li.title = item.task + ": " + item.state + (item.commit ? " " + item.commit.slice(0, 12) : "");
      li.addEventListener("click", () => { location.hash = "#/task/" + queue.namespace + "/" + item.task; });
      items.append(li);
    }
    div.append(head, items);
    box.append(div);
  }
}

async function refreshDetail() {
  const [ns, name] = selected;
  const data = await getJSON("api/v1/tasks/" + encodeURIComponent(ns) + "/" + encodeURIComponent(name));
  const task = data.task;
  document.getElementById("detail").hidden = false;
  document.getElementById("detail-title").textContent = task.namespace + "/" + task.name;
  const phase = document.getElementById("detail-phase");
  phase.textContent = task.phase; phase.className = "phase phase-" + task.phase;
  document.getElementById("detail-message").textContent = (task.reason ? task.reason + ": " : "") + task.message;
  document.getElementById("detail-spend").textContent =
    money(task.cost) + " · " + task.tokens + " tokens" + (task.model ? " · " + task.model : "");
  document.getElementById("detail-deps").hidden = !(task.depends_on || []).length;
  document.getElementById("detail-deps-list").textContent = dependencies(task);
  const files = document.getElementById("files");
  files.replaceChildren(...task.files.map((f) => el("li", f)));
  const pr = document.getElementById("detail-pr"), link = document.getElementById("detail-pr-link");
  pr.hidden = !task.pull_request;
  if (task.pull_request) {
    link.textContent = task.pull_request;
    if (/^https?:\/\//.test(task.pull_request)) link.href = task.pull_request; else link.removeAttribute("href");
    document.getElementById("detail-pr-state").textContent = task.pull_request_state ? "(" + task.pull_request_state + ")" : "";
  }
  drawTimeline(data.timeline, data.now, task.phase === "Succeeded" || task.phase === "Failed");
}

// The phases as bars along a time axis: each phase's width is its share of the task's time,
// at least a few pixels, laid end to end (a phase of a fraction of a second stays visible,
// not covered by the next one).
const MIN_BAR = 6;
function drawTimeline(timeline, now, finished) {
  const svg = document.getElementById("timeline");
  svg.replaceChildren();
  if (!timeline.length) return;
  const ns = "http://www.w3.org/2000/svg";
  const width = svg.clientWidth || 800, barY = 6, barH = 30;
  const start = Date.parse(timeline[0].at);
  const end = finished ? Date.parse(timeline[timeline.length - 1].at) : Date.parse(now);
  const span = Math.max(1000, end - start);
  const widths = timeline.map((entry, i) => {
    if (i + 1 === timeline.length && finished) return 10;
    const to = i + 1 < timeline.length ? Date.parse(timeline[i + 1].at) : end;
    return Math.max(MIN_BAR, ((to - Date.parse(entry.at)) / span) * (width - 10));
  });
  const scale = Math.min(1, (width - 10) / widths.reduce((sum, w) => sum + w, 0));
  let x = 5;
  timeline.forEach((entry, i) => {
    const w = widths[i] * scale;
    const rect = document.createElementNS(ns, "rect");
    rect.setAttribute("x", x); rect.setAttribute("y", barY);
    rect.setAttribute("width", w); rect.setAttribute("height", barH);
    rect.setAttribute("fill", PHASE_COLORS[entry.phase] || "#999");
    rect.setAttribute("data-phase", entry.phase);
    const title = document.createElementNS(ns, "title");
    title.textContent = entry.phase + " at " + entry.at;
    rect.append(title);
    svg.append(rect);
    if (w >= entry.phase.length * 6) {  // a label only where it fits; the bar's title names it anyway
      const label = document.createElementNS(ns, "text");
      label.setAttribute("x", x + 2); label.setAttribute("y", barY + barH + 14);
      label.setAttribute("font-size", "10"); label.textContent = entry.phase;
      svg.append(label);
    }
    x += w;
  });
}

// The transcript streams (follow=1) while the task runs; a finished one is read whole.
async function openTranscript(ns, name) {
  if (transcriptAbort) transcriptAbort.abort();
  transcriptAbort = new AbortController();
  const pre = document.getElementById("transcript");
  pre.textContent = "";
  const url = "api/v1/tasks/" + encodeURIComponent(ns) + "/" + encodeURIComponent(name) +
              "/transcript?follow=1&format=text";
  try {
    const response = await fetch(url, { signal: transcriptAbort.signal, cache: "no-store" });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pre.textContent += decoder.decode(value, { stream: true });
      pre.scrollTop = pre.scrollHeight;
    }
    pre.dataset.complete = "true";
  } catch (error) {
    if (error.name !== "AbortError") pre.textContent += "\n[transcript unavailable: " + error.message + "]";
  }
}

function route() {
  const match = location.hash.match(/^#\/task\/([^/]+)\/([^/]+)$/);
  if (!match) { selected = null; document.getElementById("detail").hidden = true; return; }
  selected = [decodeURIComponent(match[1]), decodeURIComponent(match[2])];
  document.getElementById("transcript").dataset.complete = "false";
  openTranscript(selected[0], selected[1]);
  refresh();
}

window.addEventListener("hashchange", route);
route();
refresh();
setInterval(refresh, POLL_MS);
