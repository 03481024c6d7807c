"""spec.test.protect / --protect patterns: .gitignore semantics, as users know them."""

from __future__ import annotations

import pytest

from reactor.errors import ConfigurationError
from reactor.workflow.tcr import _protected_paths


@pytest.mark.parametrize(("patterns", "path", "protected"), [
    (["tests/"], "tests/test_calc.py", True),
    (["tests/"], "src/tests/helper.py", True),  # no leading slash: at any depth
    (["/tests/"], "src/tests/helper.py", False),
    (["tests/"], "tests_util.py", False),
    (["test_*.py"], "test_calc.py", True),
    (["test_*.py"], "pkg/test_calc.py", True),
    (["test_*.py"], "calc.py", False),
    (["conftest.py", "pytest.ini"], "pytest.ini", True),
    (["tests/**/*.snap"], "tests/a/b/c.snap", True),
    (["tests/", "!tests/fixtures/"], "tests/fixtures/data.json", False),
    ([], "anything.py", False),
])
def test_patterns(patterns, path, protected):
    assert _protected_paths(patterns).match_file(path) is protected


@pytest.mark.parametrize("pattern", ["!", "\\"])
def test_a_bad_pattern_is_bad_input(pattern):
    with pytest.raises(ConfigurationError, match="protect"):
        _protected_paths([pattern])
