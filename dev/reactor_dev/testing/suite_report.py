"""pytest plugin (registered in tests/conftest.py): what a run of the suite says at its end.

- **The slowest modules**: setup, call and teardown of every test summed per module (a
  module's shared fixture, e.g. the operator and tasks of tests/faults, is paid by its first
  test), so a growing suite shows where its minutes go.
- **What did not run, and why**: tests declare what they need with ``@pytest.mark.needs(...)``
  (``root``, ``landlock``, ``prometheus``, ``chromium``); on a machine without it they are
  skipped, and the summary names each group (directory) with the reason and the way to get it.
- **Where the environment variable CI is set, nothing may be skipped**: a skip (of any kind)
  is reported as a failure, so CI cannot pass without running every test.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

SLOWEST = 15  # modules listed at the end of a run


# What a test may need from the machine: (is it there?, what to say when it is not).
def _root() -> tuple[bool, str]:
    return os.geteuid() == 0, "needs root (a dev node: containerd, kubelet, network namespaces; run `sudo make test`)"


def _landlock() -> tuple[bool, str]:
    from reactor.infra.confinement import kernel_support

    support = kernel_support()
    # The attack tests expect ports (ABI 4) and signals (ABI 6) blocked too.
    return support.scoping and support.network, f"needs Landlock ABI >= 6 (Linux >= 6.12): {support.describe()}"


def _program(name: str, package: str) -> tuple[bool, str]:
    return (shutil.which(name) is not None or Path(f"/usr/bin/{name}").exists(),
            f"needs Debian's {package} (`sudo make observe-tools`, or `apt-get install {package}`)")


NEEDS = {
    "root": _root,
    "landlock": _landlock,
    "prometheus": functools.partial(_program, "prometheus", "prometheus"),
    "chromium": functools.partial(_program, "chromium", "chromium"),
}


@functools.cache
def _check(need: str) -> tuple[bool, str]:
    return NEEDS[need]()


def ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"needs(*what): skipped without it, unless CI is set ({', '.join(NEEDS)})")
    config.stash[_DURATIONS] = defaultdict(float)
    config.stash[_SKIPPED] = defaultdict(list)


@pytest.hookimpl(trylast=True)  # after conftests have added their marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for mark in item.iter_markers("needs"):
            for need in mark.args:
                if need not in NEEDS:
                    raise pytest.UsageError(f"{item.nodeid}: unknown need {need!r} (known: {', '.join(NEEDS)})")
                present, why = _check(need)
                if not present:
                    item.add_marker(pytest.mark.skip(reason=why))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and ci():
        report.outcome = "failed"
        report.longrepr = f"skipped, but CI is set and nothing may be skipped there: {_reason(report)}"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    config = _config
    if config is None:
        return
    config.stash[_DURATIONS][report.nodeid.split("::")[0]] += report.duration
    if report.skipped and not hasattr(report, "wasxfail"):
        group = str(Path(report.nodeid.split("::")[0]).parent)
        config.stash[_SKIPPED][(group, _reason(report))].append(report.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    durations = config.stash[_DURATIONS]
    if durations:
        terminalreporter.write_sep("=", f"slowest modules (of {len(durations)}: setup + tests + teardown)")
        for module, seconds in sorted(durations.items(), key=lambda kv: -kv[1])[:SLOWEST]:
            terminalreporter.write_line(f"{_minutes(seconds):>8}  {module}")
        terminalreporter.write_line(f"{_minutes(sum(durations.values())):>8}  in all")
    skipped = config.stash[_SKIPPED]
    if skipped:
        terminalreporter.write_sep("=", "not run on this machine (skipped; CI=1 makes each a failure)")
        for (group, reason), ids in sorted(skipped.items()):
            terminalreporter.write_line(f"{group}: {len(ids)} test{'s' if len(ids) != 1 else ''}: {reason}")


_DURATIONS = pytest.StashKey[defaultdict]()
_SKIPPED = pytest.StashKey[defaultdict]()
_config: pytest.Config | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    global _config
    _config = session.config


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"
