"""After `make setup`, activating the virtualenv is all `reactor run` needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reactor import OPENCODE_VERSION

VENV = Path(sys.prefix)


@pytest.mark.skipif(not (VENV / "bin" / "activate").exists(), reason="not running from a virtualenv")
def test_activate_puts_reactor_and_the_pinned_opencode_on_path():
    out = subprocess.run(
        ["bash", "-c", f"source {VENV}/bin/activate && command -v reactor && command -v opencode && opencode --version"],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}, timeout=60)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n(run `make setup`)"
    reactor, opencode, version = out.stdout.split()
    assert Path(reactor).parent == Path(opencode).parent == VENV / "bin"
    assert version == OPENCODE_VERSION
