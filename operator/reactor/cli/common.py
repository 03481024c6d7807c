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
    parser.add_argument("--health-timeout", default="30s",
                        help="how long a starting opencode server may take to become healthy (default: 30s)")
    parser.add_argument("--stall-timeout", default="5m",
                        help="end an agent's turn after this long without progress: no new message part, tool call "
                             "or token (default: 5m)")


def engine_settings_from(args: argparse.Namespace, **overrides):
    from reactor.workflow.engine import EngineSettings, default_work_dir

    if args.max_agents < 1:
        raise ConfigurationError("--max-agents must be at least 1")
    return EngineSettings(
        work_dir=(args.work_dir or default_work_dir()).expanduser().resolve(),
        port_range=PortRange.parse(args.port_range),
        opencode_bin=args.opencode_bin,
        max_agents=args.max_agents,
        stall_timeout=parse_duration(args.stall_timeout),
        health_timeout=parse_duration(args.health_timeout),
        **overrides,
    )
