"""Which command tests a repository, when the task does not say."""

from __future__ import annotations

import json
import re
from pathlib import Path

from reactor.errors import ConfigurationError


def detect_test_command(repo: Path) -> str:
    """The repository's own declared entry point first (a Makefile `test` target), then the
    conventional runner of its language: go test, npm test, pytest."""
    repo = Path(repo)
    makefile = repo / "Makefile"
    if makefile.is_file() and re.search(r"^test\s*:", makefile.read_text(errors="replace"), re.MULTILINE):
        return "make test"
    if (repo / "go.mod").is_file():
        return "go test ./..."
    package_json = repo / "package.json"
    if package_json.is_file():
        try:
            if json.loads(package_json.read_text()).get("scripts", {}).get("test"):
                return "npm test"
        except ValueError:
            pass
    python_markers = ("pytest.ini", "pyproject.toml", "setup.cfg", "tox.ini", "conftest.py")
    if any((repo / marker).is_file() for marker in python_markers) or any(repo.glob("test_*.py")) \
            or any(repo.glob("tests/test_*.py")):
        return "python3 -m pytest -q"
    raise ConfigurationError(
        f"cannot tell how to test {repo}: no Makefile test target, go.mod, package.json test script or "
        "pytest files; pass --test-cmd"
    )
