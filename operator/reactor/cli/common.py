"""What several commands share: exit codes and the engine's flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from reactor.durations import parse_duration
from reactor.errors import ConfigurationError
from reactor.infra.ports import DEFAULT_PORT_RANGE, PortRange

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-agents", type=int, default=50, help="cells alive at once (default: 50)")
    parser.add_argument("--port-range", default="%d-%d" % DEFAULT_PORT_RANGE, help="server ports, START-END with END excluded (default: 8000-9000)")
    parser.add_argument("--work-dir", type=Path, default=None, help="worktrees and cell state (default: $REACTOR_WORK_DIR or ~/.local/state/reactor)")
    parser.add_argument("--opencode-bin", default=None, help="opencode binary (default: $REACTOR_OPENCODE_BIN, then PATH)")
    parser.add_argument("--allow-unconfined", action="store_true",
                        help="run cells even where the kernel cannot confine them (Landlock); every task can then "
                             "read and write all the operator can. Also turns confinement off where it works.")
    parser.add_argument("--protected-path", action="append", default=[], metavar="PATH",
                        help="a path no cell may read even inside an allowed tree, in addition to the defaults "
                             "(service-account token, kubeconfig, credential files, the OS's secrets; see "
                             "docs/security.md). Repeatable.")
    parser.add_argument("--readable-path", action="append", default=[], metavar="PATH",
                        help="a directory cells may read besides the allowlist (the OS, the toolchains on PATH, "
                             "opencode, Reactor, their own cell), minus the protected paths. Repeatable.")
    parser.add_argument("--health-timeout", default=None,
                        help="how long a starting opencode server may take to become healthy "
                             "(default: $REACTOR_HEALTH_TIMEOUT, else 30s)")
    parser.add_argument("--stall-timeout", default="5m",
                        help="end an agent's turn after this long without progress: no new message part, tool call "
                             "or token (default: 5m)")
    parser.add_argument("--memory-limit", default=None,
                        help="admit a cell only while this much memory (e.g. 6Gi) minus what is in use covers a "
                             "cell's peak (default: the container's cgroup limit; none: --max-agents alone)")
    parser.add_argument("--cell-memory", default="600Mi",
                        help="a cell's peak memory until a larger one is measured (default: 600Mi)")


def work_dir_from(args: argparse.Namespace) -> Path:
    from reactor.workflow.engine import default_work_dir

    return (args.work_dir or default_work_dir()).expanduser().resolve()


def claim_private_dirs(args: argparse.Namespace) -> None:
    """This process's temp dir and git HOME become private dirs under the work dir, before
    anything writes a temp file (the kubernetes client puts a kubeconfig's client key there)."""
    from reactor.infra.private import claim_process_dirs

    claim_process_dirs(work_dir_from(args))


def engine_settings_from(args: argparse.Namespace, **overrides):
    from reactor.workflow.engine import EngineSettings

    from reactor.infra.confinement import ConfinementSettings
    from reactor.infra.memory import parse_quantity

    if args.max_agents < 1:
        raise ConfigurationError("--max-agents must be at least 1")
    confinement = ConfinementSettings(required=not args.allow_unconfined, enabled=not args.allow_unconfined)
    confinement.protected_paths += args.protected_path
    confinement.readable_paths += args.readable_path
    confinement.protected_ports += _own_ports(args)
    try:
        memory_limit = parse_quantity(args.memory_limit) if args.memory_limit else None
        cell_memory = parse_quantity(args.cell_memory)
    except ValueError as exc:
        raise ConfigurationError(f"--memory-limit/--cell-memory: {exc}") from None
    return EngineSettings(
        memory_limit=memory_limit,
        cell_memory=cell_memory,
        work_dir=work_dir_from(args),
        port_range=PortRange.parse(args.port_range),
        opencode_bin=args.opencode_bin,
        max_agents=args.max_agents,
        confinement=confinement,
        stall_timeout=parse_duration(args.stall_timeout),
        **({"health_timeout": parse_duration(args.health_timeout)} if args.health_timeout else {}),
        **overrides,
    )


def _own_ports(args: argparse.Namespace) -> list[int]:
    """The TCP ports this process listens on (``--web``, ``--liveness``): no cell may connect
    to them (the page shows every task's transcript)."""
    from urllib.parse import urlsplit

    ports = []
    web = getattr(args, "web", None)
    if web and web != "none":
        from reactor.observe.web import parse_address

        ports.append(parse_address(web)[1])
    liveness = getattr(args, "liveness", None)
    if liveness and liveness != "none":
        ports.append(urlsplit(liveness).port or 80)
    return [port for port in ports if port]
