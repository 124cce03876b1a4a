"""The benchmark harness still runs: `benchmarks/run --smoke` on the embedded benchmarks.

These tests check that every expected row is measured and reported, not how fast anything is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent.parent
EMBEDDED_ROWS = {
    "embedded publish",
    "embedded publish, 500 per call",
    "embedded consume",
    "audit recorder, SQLite",
    "audit recorder, SQLite, log to trail",
    "replay, parse + fold",
    "worker memory growth",
}
SMOKE_TIMEOUT_SECONDS = 240


@pytest.fixture(scope="module")
def smoke_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    report_path = tmp_path_factory.mktemp("benchmarks") / "smoke.json"
    environment = {key: value for key, value in os.environ.items() if not key.startswith("FORGE_")}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--smoke",
            "--only",
            "embedded,replay,memory",
            "--json",
            str(report_path),
        ],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_SECONDS,
        check=False,
    )
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return completed, report


def test_smoke_run_exits_zero(smoke_run: tuple[subprocess.CompletedProcess[str], Any]) -> None:
    completed, _ = smoke_run
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_table_lists_every_embedded_row(
    smoke_run: tuple[subprocess.CompletedProcess[str], Any],
) -> None:
    completed, _ = smoke_run
    for name in EMBEDDED_ROWS:
        assert name in completed.stdout, f"{name!r} missing from the table:\n{completed.stdout}"


def test_report_has_every_embedded_row(smoke_run: tuple[Any, dict[str, Any]]) -> None:
    _, report = smoke_run
    assert report.get("mode") == "smoke"
    names = {row["name"] for row in report.get("rows", [])}
    assert names == EMBEDDED_ROWS


def test_every_row_measured(smoke_run: tuple[Any, dict[str, Any]]) -> None:
    _, report = smoke_run
    for row in report["rows"]:
        assert row["status"] in {"PASS", "MISS", "INFO"}, f"{row['name']}: {row['note']}"
        assert row["measured"] is not None, row["name"]
        if row["unit"] == "events/s":
            assert row["measured"]["median"] > 0, row["name"]


def test_memory_row_has_resident_sizes(smoke_run: tuple[Any, dict[str, Any]]) -> None:
    _, report = smoke_run
    row = next(row for row in report["rows"] if row["name"] == "worker memory growth")
    for worker in row["details"]["runs"]:
        assert worker["baseline_rss_bytes"] > 0
        assert worker["peak_rss_bytes"] > 0


def test_throughput_rows_have_anchor_ratio(smoke_run: tuple[Any, dict[str, Any]]) -> None:
    _, report = smoke_run
    rows = {row["name"]: row for row in report["rows"]}
    for name in (
        "embedded publish",
        "embedded publish, 500 per call",
        "embedded consume",
        "audit recorder, SQLite",
    ):
        assert rows[name]["anchor"]["median"] > 0, name
        assert rows[name]["ratio"] > 0, name
