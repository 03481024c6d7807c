"""Engine settings for tests that run real cells in-process (workflow, security, observe)."""

from __future__ import annotations

from pathlib import Path

from reactor.workflow.engine import EngineSettings
from reactor.workflow.recovery import RecoveryPolicy
from reactor_dev.testing.workers import ports



def engine_settings(work_dir: Path, **overrides) -> EngineSettings:
    values = dict(
        work_dir=work_dir,
        # Away from the default range a developer's own run may use; this worker's own.
        port_range=ports(18000, 18500),
        # Two cores shared with other servers: a cold start can take several seconds.
        health_timeout=60.0,
        recovery=RecoveryPolicy(r3_initial_delay=0.2, boot_delay=0.2),
    )
    values.update(overrides)
    return EngineSettings(**values)
