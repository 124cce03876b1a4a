"""Memory benchmark: resident size of a worker consuming a million events from the SQLite log.

The log is filled first, in this process. Each run then starts a fresh worker process (see
`benchmarks.memory_worker`) in a new consumer group, so that its resident size holds only
what a worker holds: the interpreter, Forge, SQLite's page cache and the consumer.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.eventgen import rows_with_fresh_ids
from benchmarks.harness import Row, Summary, at_most
from benchmarks.scale import Scale
from forge.infrastructure.sqlite.event_log import append_records
from forge.infrastructure.sqlite.schema import migrate
from forge.models.events import Event

GROUP = "embedded"
MAX_GROWTH_PERCENT = 10.0
FILL_CHUNK = 20_000
WORKER_TIMEOUT_SECONDS = 900


def fill_log(path: Path, pool: Sequence[Event[Any]], count: int) -> None:
    """Append `count` events copied from `pool`, each with its own id, to a new event log."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        migrate(connection)
        rows = rows_with_fresh_ids(list(pool), count)
        remaining = count
        while remaining:
            chunk = [next(rows) for _ in range(min(FILL_CHUNK, remaining))]
            connection.execute("BEGIN IMMEDIATE")
            append_records(connection, chunk)
            connection.execute("COMMIT")
            remaining -= len(chunk)
    finally:
        connection.close()


def run_worker(data_dir: Path, events: int, baseline_after: int, group_id: str) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "benchmarks.memory_worker",
        "--data-dir",
        str(data_dir),
        "--events",
        str(events),
        "--baseline-after",
        str(baseline_after),
        "--group-id",
        group_id,
    ]
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        timeout=WORKER_TIMEOUT_SECONDS,
        cwd=Path(__file__).parent.parent,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"memory worker exited with {completed.returncode}: {completed.stderr.strip()[-2000:]}"
        )
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def run(scale: Scale, pool: Sequence[Event[Any]]) -> list[Row]:
    growths: list[float] = []
    reports: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="forge-bench-memory-") as folder:
        data_dir = Path(folder)
        fill_log(data_dir / "forge.sqlite3", pool, scale.memory_events)
        for run_index in range(scale.runs):
            report = run_worker(
                data_dir,
                scale.memory_events,
                scale.memory_baseline_after,
                f"bench-memory-{run_index}",
            )
            reports.append(report)
            growths.append(report["peak_growth_percent"])
    mib = 1024 * 1024
    baseline = sorted(report["baseline_rss_bytes"] for report in reports)[len(reports) // 2]
    peak = sorted(report["peak_rss_bytes"] for report in reports)[len(reports) // 2]
    rate = sorted(report["events_per_second"] for report in reports)[len(reports) // 2]
    return [
        Row(
            "worker memory growth",
            GROUP,
            "%",
            Summary.of(growths),
            targets=[at_most(MAX_GROWTH_PERCENT, "%")],
            details={"runs": reports},
            note=(
                f"SqliteEventConsumer, no-op handler, {scale.memory_events:,} events: resident "
                f"size {baseline / mib:.1f} MiB after {scale.memory_baseline_after:,} events, "
                f"peak {peak / mib:.1f} MiB after that (medians); {rate:,.0f} events/s"
            ),
        )
    ]
