"""The pull request's title and body, written by the operator from what it saw (never by the
agent): the task, the prompt, the test command and the tail of its passing output, the TCR
attempts, files changed, tokens and cost, model.

Everything here but the layout comes from the tenant (prompt, test output, file names):
it goes into code blocks whose fence is longer than any backtick run inside, so it cannot
close the block and inject markup into the page."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PROMPT_CHARS = 4000
OUTPUT_CHARS = 2000
FILES_SHOWN = 50
MAX_BODY = 60000  # GitHub refuses bodies over 65536 characters


@dataclass
class Attempt:
    number: int
    outcome: str  # committed | reverted | failed
    note: str = ""


@dataclass
class PullRequestFacts:
    """What the body says; the operator builds it from the AgentTask (spec and status), so it
    can be written again after a restart."""

    task: str  # namespace/name, or the task id in `reactor run`
    title: str  # the commit message's subject: "Task <id>: <description>"
    commit: str
    branch: str
    base: str
    prompt: str
    description: str = ""
    test_command: str = ""
    test_exit_code: int | None = 0
    test_output_tail: str = ""
    attempts: list[Attempt] = field(default_factory=list)
    files_changed: list[str] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cost: float = 0.0
    model: str = ""
    confined: bool | None = None
    # A stacked PR (its task's parent has not integrated yet): ``base`` is the parent's result
    # branch, and the PR is retargeted to ``retarget_to`` once the parent integrates.
    stacked_on: str = ""
    retarget_to: str = ""


def fenced(text: str, info: str = "") -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text.rstrip()}\n{fence}"


def _cut(text: str, limit: int, keep_end: bool = False) -> str:
    if len(text) <= limit:
        return text
    return ("…" + text[-limit:]) if keep_end else (text[:limit] + "…")


def inline(text: str) -> str:
    """One line of tenant text in running prose: no markup, no line breaks."""
    return re.sub(r"[`*_<>\[\]|#\\]", " ", " ".join(text.split()))


def render_body(facts: PullRequestFacts) -> str:
    lines = [
        f"**{inline(facts.task)}** — {inline(facts.description) or 'no description'}",
        "",
        f"Opened by the Reactor operator: the locked test command passed on exactly `{facts.commit}` "
        f"(commit status `reactor/tcr`). This text is the operator's, not the agent's.",
        "",
        "### Prompt",
        fenced(_cut(facts.prompt, PROMPT_CHARS)),
        "",
        "### Tests",
        f"Command (exit {facts.test_exit_code if facts.test_exit_code is not None else '?'}):",
        fenced(facts.test_command or "(detected)", "sh"),
        "Tail of its output:",
        fenced(_cut(facts.test_output_tail, OUTPUT_CHARS, keep_end=True) or "(no output)"),
        "",
        "### TCR attempts",
    ]
    if facts.attempts:
        lines += [f"{a.number}. {a.outcome}" + (f" — {inline(a.note)}" if a.note else "") for a in facts.attempts]
    else:
        lines.append("1. committed")
    lines += ["", f"### Files changed ({len(facts.files_changed)})"]
    lines += [f"- `{inline(path)}`" for path in facts.files_changed[:FILES_SHOWN]]
    if len(facts.files_changed) > FILES_SHOWN:
        lines.append(f"- … and {len(facts.files_changed) - FILES_SHOWN} more")
    lines += [
        "",
        "### Spend",
        "| model | input tokens | output tokens | all tokens | cost |",
        "|---|---|---|---|---|",
        f"| {inline(facts.model) or 'OpenCode default'} | {facts.input_tokens} | {facts.output_tokens} | "
        f"{facts.total_tokens} | ${facts.cost:.4f} |",
        "",
        f"Branch `{inline(facts.branch)}` → `{inline(facts.base)}`, head `{facts.commit}`"
        + ("" if facts.confined is None else f"; the cell ran {'confined (Landlock)' if facts.confined else 'UNCONFINED'}")
        + ".",
    ]
    if facts.stacked_on:
        lines += ["", f"Stacked on the result of task `{inline(facts.stacked_on)}`: this pull request is retargeted "
                      f"to `{inline(facts.retarget_to)}` once that task's result integrates."]
    return _cut("\n".join(lines), MAX_BODY)


def status_description(facts: PullRequestFacts) -> str:
    """The commit status's one line (forges cut it at 140 characters)."""
    return _cut(f"tests passed: {' '.join(facts.test_command.split())}", 138)
