"""Fault tests: each breaks one part on purpose and counts events in and out.

The table of every fault (events acknowledged / in audit trail / duplicates / lost) is printed
at the end of the pytest run, so that CI output shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest


@dataclass
class FaultResult:
    fault: str
    acknowledged: int
    in_audit_trail: int
    duplicates: int
    lost: int
    failed_requests: int


RESULTS: list[FaultResult] = []


@pytest.fixture
def fault_results() -> list[FaultResult]:
    return RESULTS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    terminalreporter.section(
        "fault tests: events acknowledged / in audit trail / duplicates / lost"
    )
    header = (
        f"{'fault':<44} {'acknowledged':>12} {'in audit':>9} {'duplicates':>10} {'lost':>5} "
        f"{'refused':>8}"
    )
    terminalreporter.write_line(header)
    for result in RESULTS:
        terminalreporter.write_line(
            f"{result.fault:<44} {result.acknowledged:>12} {result.in_audit_trail:>9} "
            f"{result.duplicates:>10} {result.lost:>5} {result.failed_requests:>8}"
        )
    terminalreporter.write_line(
        "refused: requests answered with an error (or not at all) during the fault; the caller "
        "was told, so they do not count as acknowledged."
    )
