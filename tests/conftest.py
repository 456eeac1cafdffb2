from __future__ import annotations

from collections import defaultdict
from collections.abc import Generator

import pytest

pytest_plugins = ["latentmas.testing.fixtures"]

_seconds_by_marker: defaultdict[str, float] = defaultdict(float)
_tests_by_marker: defaultdict[str, set[str]] = defaultdict(set)
_MARKERS = ("harness", "data", "training", "serving", "reasoning", "operator", "e2e", "realmodel", "arch", "gpu")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    """Adds each phase's wall time (setup, including module fixtures, call, teardown) to the test's markers."""
    yield
    markers = [m for m in _MARKERS if item.get_closest_marker(m)] or ["unmarked"]
    for marker in markers:
        _seconds_by_marker[marker] += call.duration
        _tests_by_marker[marker].add(item.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Per-marker wall time, so a suite that outgrows the test budget shows where (a test with two
    markers counts under both)."""
    if not _seconds_by_marker:
        return
    terminalreporter.section("wall time per marker")
    for marker, seconds in sorted(_seconds_by_marker.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{marker:<10} {seconds:8.1f} s  {len(_tests_by_marker[marker]):4d} tests")
