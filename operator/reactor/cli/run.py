"""`reactor run`: one task, or several with --parallel, without Kubernetes."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from reactor import __version__
from reactor.cli.common import EXIT_FAILED, EXIT_OK, add_engine_flags, claim_private_dirs, engine_settings_from
from reactor.durations import parse_duration
from reactor.errors import ConfigurationError


def add_subparser(sub: Any) -> None:
    run = sub.add_parser("run", help="run one task, or several with --parallel, without Kubernetes")
    run.add_argument("--task", required=True, help="task id (comma-separated with --parallel)")
    run.add_argument("--desc", default=None, help="description, used in the commit message (comma-separated with --parallel)")
    run.add_argument("--prompt", required=True, help="what the agent should do (comma-separated with --parallel)")
    run.add_argument("--parallel", action="store_true", help="run the comma-separated tasks at the same time")
    add_engine_flags(run)
    run.add_argument("--repo", type=Path, default=Path.cwd(), help="git repository (default: current directory)")
    run.add_argument("--branch", default="main", help="base branch (default: main); never modified")
    run.add_argument("--test-cmd", default=None, help="test command (default: detected: make test, go test, npm test, pytest)")
    run.add_argument("--test-timeout", default="10m", help="time limit of the test command (default: 10m)")
    run.add_argument("--protect", action="append", default=[], metavar="PATTERN",
                     help="a path the agent must not change, .gitignore-style, e.g. 'tests/' (repeatable): "
                          "a change to one fails the task with TestsModified and nothing is committed")
    run.add_argument("--model", default=None, help="provider/model, e.g. anthropic/claude-sonnet-4-5")
    run.add_argument("--opencode-config", type=Path, default=None, help="JSON file merged into the OpenCode server config")
    run.add_argument("--timeout", default="30m", help="whole-task time box (default: 30m)")
    run.add_argument("--json", action="store_true", help="print one JSON result per task on stdout")
    run.add_argument("--max-cost", type=float, default=None, help="stop a task whose model cost passes this many dollars (reason BudgetExceeded)")
    run.add_argument("--max-tokens", type=int, default=None, help="stop a task whose tokens pass this number (reason BudgetExceeded)")
    run.add_argument("--web", default=None, metavar="HOST:PORT", help="serve the fleet page and /metrics while the tasks run")
    run.add_argument("--result", choices=("branch", "pr"), default="branch",
                     help="branch: the result stays a branch of --repo (default); pr: push it to --remote and open a "
                          "pull request there (Gitea, Forgejo or GitHub; token in $REACTOR_FORGE_TOKEN)")
    run.add_argument("--remote", default="origin", help="with --result pr: the remote on the forge (default: origin)")
    run.add_argument("--forge", choices=("gitea", "github"), default=None,
                     help="with --result pr: the forge's API (default: told from the remote's host)")
    run.add_argument("--draft", action="store_true", help="with --result pr: open it as a draft")
    run.set_defaults(func=cmd_run)


def tasks_from(args: argparse.Namespace):
    from reactor.workflow.types import Budget, TaskSpec

    ids = _split(args.task, args.parallel)
    prompts = _split(args.prompt, args.parallel)
    descs = _split(args.desc, args.parallel) if args.desc is not None else [""] * len(ids)
    if not (len(ids) == len(prompts) == len(descs)):
        raise ConfigurationError(
            f"--task, --desc and --prompt must list the same number of items ({len(ids)}, {len(descs)}, {len(prompts)})"
        )
    if len(set(ids)) != len(ids):
        raise ConfigurationError("task ids must be unique")
    if any(not p for p in prompts):
        raise ConfigurationError("--prompt must not be empty")
    config = {}
    if args.opencode_config is not None:
        try:
            config = json.loads(args.opencode_config.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"--opencode-config {args.opencode_config}: {exc}") from None
        if not isinstance(config, dict):
            raise ConfigurationError(f"--opencode-config {args.opencode_config}: must hold a JSON object")
    if args.max_cost is not None and args.max_cost < 0:
        raise ConfigurationError("--max-cost must not be negative")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ConfigurationError("--max-tokens must be at least 1")
    budget = Budget(max_cost=args.max_cost, max_tokens=args.max_tokens)
    if args.model is not None and "/" not in args.model:
        raise ConfigurationError(f"--model {args.model!r} must be provider/model, e.g. anthropic/claude-sonnet-4-5")
    return [
        TaskSpec(
            task_id=task_id, description=desc, prompt=prompt, repo=args.repo.expanduser().resolve(),
            base_branch=args.branch, test_command=args.test_cmd, test_timeout=parse_duration(args.test_timeout),
            model=args.model, opencode_config=config, timeout=parse_duration(args.timeout), protect=args.protect,
            budget=budget,
        )
        for task_id, desc, prompt in zip(ids, descs, prompts, strict=True)
    ]


def _split(value: str, parallel: bool) -> list[str]:
    if not parallel:
        return [value.strip()]
    return [item.strip() for item in value.split(",")]


def cmd_run(args: argparse.Namespace) -> int:
    from reactor.observe.local import run_observed
    from reactor.workflow.engine import Engine

    specs = tasks_from(args)
    claim_private_dirs(args)
    engine = Engine(engine_settings_from(args))
    if len(specs) > 1 and not args.parallel:
        raise ConfigurationError("several tasks need --parallel")
    forge = None
    if args.result == "pr":  # checked before any task runs: a remote on a forge, a token
        from reactor.cli.pull_request import remote_forge

        forge = remote_forge(specs[0].repo, args.remote, args.forge)

    async def report(event) -> None:
        where = f" (port {event.cell.port})" if event.phase.value == "Executing" and event.cell.port else ""
        from reactor.observe.transcript import printable  # the message may quote the cell

        print(printable(f"[{event.task_id}] {event.phase.value}{where}{': ' + event.message if event.message else ''}"),
              file=sys.stderr, flush=True)

    async def run_all():
        return await run_observed(specs, engine, report, web=args.web)

    print(f"Reactor {__version__}: {len(specs)} task(s) on {specs[0].repo} (base {specs[0].base_branch}), "
          f"max agents {engine.settings.max_agents}, ports {engine.settings.port_range}; "
          f"{engine.confinement.status.message}", file=sys.stderr)
    results = asyncio.run(run_all())
    pulls: dict[str, str] = {}
    failed_prs = False
    if forge is not None:
        from reactor.cli.pull_request import open_pull_request
        from reactor.errors import ReactorError

        for spec, result in zip(specs, results, strict=True):
            if not result.succeeded:
                continue
            try:
                published = open_pull_request(spec, result, args.remote, *forge, draft=args.draft)
            except ReactorError as exc:
                print(f"reactor: {exc}", file=sys.stderr)
                failed_prs = True
                continue
            pulls[spec.task_id] = published.pull_request.url
    for result in results:
        if args.json:
            data = json.loads(result.model_dump_json())
            if result.task_id in pulls:
                data["pull_request"] = pulls[result.task_id]
            print(json.dumps(data), flush=True)
        else:
            print(_summary(result) + (f"\n     pull request: {pulls[result.task_id]}" if result.task_id in pulls else ""),
                  flush=True)
    return EXIT_OK if all(r.succeeded for r in results) and not failed_prs else EXIT_FAILED


def _summary(result) -> str:
    mark = "OK  " if result.succeeded else "FAIL"
    lines = [f"{mark} {result.task_id}: {result.reason.value}: {result.message}"]
    if result.files_changed:
        lines.append(f"     files: {', '.join(result.files_changed)}")
    if result.test_exit_code is not None:
        lines.append(f"     tests: `{result.test_command}` exit {result.test_exit_code}")
    if result.usage.input_tokens or result.usage.output_tokens:
        lines.append(f"     usage: {result.usage.input_tokens} in / {result.usage.output_tokens} out tokens, ${result.usage.cost:.4f}")
    lines.append(f"     took {result.duration:.1f}s " + " ".join(f"{k}={v:.2f}s" for k, v in result.phase_durations.items()))
    return "\n".join(lines)
