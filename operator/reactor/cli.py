"""`reactor`: run tasks from the command line, clean up after crashes, run the operator,
manage a local dev cluster."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from reactor import __version__
from reactor.durations import parse_duration
from reactor.errors import ConfigurationError, ReactorError
from reactor.infra.ports import DEFAULT_PORT_RANGE, PortRange

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("reactor")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except ConfigurationError as exc:
        print(f"reactor: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ReactorError as exc:
        print(f"reactor: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reactor", description="Run AI coding agents in isolated cells with Test-Commit-Revert.")
    parser.add_argument("--version", action="version", version=f"reactor {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run one task, or several with --parallel, without Kubernetes")
    run.add_argument("--task", required=True, help="task id (comma-separated with --parallel)")
    run.add_argument("--desc", default=None, help="description, used in the commit message (comma-separated with --parallel)")
    run.add_argument("--prompt", required=True, help="what the agent should do (comma-separated with --parallel)")
    run.add_argument("--parallel", action="store_true", help="run the comma-separated tasks at the same time")
    _add_engine_flags(run)
    run.add_argument("--repo", type=Path, default=Path.cwd(), help="git repository (default: current directory)")
    run.add_argument("--branch", default="main", help="base branch (default: main); never modified")
    run.add_argument("--test-cmd", default=None, help="test command (default: detected: make test, go test, npm test, pytest)")
    run.add_argument("--test-timeout", default="10m", help="time limit of the test command (default: 10m)")
    run.add_argument("--model", default=None, help="provider/model, e.g. anthropic/claude-sonnet-4-5")
    run.add_argument("--opencode-config", type=Path, default=None, help="JSON file merged into the OpenCode server config")
    run.add_argument("--timeout", default="30m", help="whole-task time box (default: 30m)")
    run.add_argument("--json", action="store_true", help="print one JSON result per task on stdout")
    run.set_defaults(func=cmd_run)

    cleanup = sub.add_parser("cleanup", help="kill servers and remove worktrees left by a crashed run")
    cleanup.add_argument("--repo", type=Path, default=None, help="also remove this repository's leftover worktrees and branches")
    cleanup.add_argument("--work-dir", type=Path, default=None, help="work dir of the crashed run (default: $REACTOR_WORK_DIR or ~/.local/state/reactor)")
    cleanup.set_defaults(func=cmd_cleanup)

    _add_optional_subcommands(sub)
    return parser


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-agents", type=int, default=50, help="cells alive at once (default: 50)")
    parser.add_argument("--port-range", default="%d-%d" % DEFAULT_PORT_RANGE, help="server ports, START-END with END excluded (default: 8000-9000)")
    parser.add_argument("--work-dir", type=Path, default=None, help="worktrees and cell state (default: $REACTOR_WORK_DIR or ~/.local/state/reactor)")
    parser.add_argument("--opencode-bin", default=None, help="opencode binary (default: $REACTOR_OPENCODE_BIN, then PATH)")
    parser.add_argument("--allow-unconfined", action="store_true",
                        help="run cells even where the kernel cannot confine them (Landlock); every task can then "
                             "read and write all the operator can. Also turns confinement off where it works.")
    parser.add_argument("--protected-path", action="append", default=[], metavar="PATH",
                        help="a path no cell may read, in addition to the defaults (service-account token, "
                             "kubeconfig, $HOME, credential files; see docs/security.md). Repeatable.")
    parser.add_argument("--readable-path", action="append", default=[], metavar="PATH",
                        help="a toolchain directory under a protected path (e.g. $HOME) that cells may read. Repeatable.")


def _add_optional_subcommands(sub: argparse._SubParsersAction) -> None:
    """Subcommands whose modules carry heavier imports (kopf, the control plane)."""
    from reactor.devcluster import cli as devcluster_cli
    from reactor.kube import cli as operator_cli

    operator_cli.add_subparser(sub)
    devcluster_cli.add_subparser(sub)


def engine_settings_from(args: argparse.Namespace, **overrides):
    from reactor.workflow.engine import EngineSettings, default_work_dir

    from reactor.infra.confinement import ConfinementSettings

    if args.max_agents < 1:
        raise ConfigurationError("--max-agents must be at least 1")
    confinement = ConfinementSettings(required=not args.allow_unconfined, enabled=not args.allow_unconfined)
    confinement.protected_paths += args.protected_path
    confinement.readable_paths += args.readable_path
    return EngineSettings(
        work_dir=(args.work_dir or default_work_dir()).expanduser().resolve(),
        port_range=PortRange.parse(args.port_range),
        opencode_bin=args.opencode_bin,
        max_agents=args.max_agents,
        confinement=confinement,
        **overrides,
    )


def tasks_from(args: argparse.Namespace):
    from reactor.workflow.types import TaskSpec

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
    if args.model is not None and "/" not in args.model:
        raise ConfigurationError(f"--model {args.model!r} must be provider/model, e.g. anthropic/claude-sonnet-4-5")
    return [
        TaskSpec(
            task_id=task_id, description=desc, prompt=prompt, repo=args.repo.expanduser().resolve(),
            base_branch=args.branch, test_command=args.test_cmd, test_timeout=parse_duration(args.test_timeout),
            model=args.model, opencode_config=config, timeout=parse_duration(args.timeout),
        )
        for task_id, desc, prompt in zip(ids, descs, prompts, strict=True)
    ]


def _split(value: str, parallel: bool) -> list[str]:
    if not parallel:
        return [value.strip()]
    return [item.strip() for item in value.split(",")]


def cmd_run(args: argparse.Namespace) -> int:
    from reactor.workflow.engine import Engine
    from reactor.workflow.tcr import run_task

    specs = tasks_from(args)
    engine = Engine(engine_settings_from(args))
    if len(specs) > 1 and not args.parallel:
        raise ConfigurationError("several tasks need --parallel")

    async def report(event) -> None:
        where = f" (port {event.cell.port})" if event.phase.value == "Executing" and event.cell.port else ""
        print(f"[{event.task_id}] {event.phase.value}{where}{': ' + event.message if event.message else ''}",
              file=sys.stderr, flush=True)

    async def run_all():
        return await asyncio.gather(*(run_task(spec, engine, report) for spec in specs))

    print(f"Reactor {__version__}: {len(specs)} task(s) on {specs[0].repo} (base {specs[0].base_branch}), "
          f"max agents {engine.settings.max_agents}, ports {engine.settings.port_range}; "
          f"{engine.confinement.status.message}", file=sys.stderr)
    results = asyncio.run(run_all())
    for result in results:
        if args.json:
            print(result.model_dump_json(), flush=True)
        else:
            print(_summary(result), flush=True)
    return EXIT_OK if all(r.succeeded for r in results) else EXIT_FAILED


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


def cmd_cleanup(args: argparse.Namespace) -> int:
    from reactor.infra.cleanup import cleanup_leftovers
    from reactor.workflow.engine import default_work_dir

    work_dir = (args.work_dir or default_work_dir()).expanduser().resolve()
    report = cleanup_leftovers(work_dir, args.repo)
    for line in report:
        print(line)
    if not report:
        print("nothing to clean up")
    return EXIT_OK


def _configure_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
