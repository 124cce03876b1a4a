"""Pytest plugin: print how many Kafka and PostgreSQL tests ran, passed and were skipped.

CI output must show that the tests against the real servers ran; a skipped one would hide a
missing server. Loaded through `addopts` in pyproject.toml.
"""

from __future__ import annotations

from typing import Any

import pytest

_MARKED: dict[str, set[str]] = {"kafka": set(), "postgres": set()}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for marker in _MARKED:
            if item.get_closest_marker(marker) is not None:
                _MARKED[marker].add(item.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    outcomes = ("passed", "failed", "error", "skipped")
    terminalreporter.section("tests against real servers")
    for marker, nodeids in _MARKED.items():
        counts = {
            outcome: sum(
                1
                for report in terminalreporter.stats.get(outcome, [])
                if getattr(report, "nodeid", None) in nodeids
                and getattr(report, "when", "call") in ("call", "setup")
            )
            for outcome in outcomes
        }
        terminalreporter.write_line(
            f"{marker}: {len(nodeids)} collected, {counts['passed']} passed, "
            f"{counts['failed']} failed, {counts['error']} errors, {counts['skipped']} skipped"
        )
