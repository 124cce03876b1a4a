"""Benchmarks of the embedded (SQLite) backend: publish, consume and the audit recorder.

Each run builds a fresh SQLite file for Forge and another for its anchor, with the same schema
and pragmas (WAL and `synchronous=FULL`, Forge's defaults). It times the same events through
both, one right after the other, so that both see the same machine load.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from benchmarks.harness import Row, Summary, at_least, freeze_fixtures, ratio_at_least
from benchmarks.scale import Scale
from forge.config import ForgeSettings
from forge.core.audit.recorder import AuditRecorder
from forge.core.events.codec import encode_event
from forge.infrastructure.sqlite.audit_store import audit_row
from forge.infrastructure.sqlite.schema import migrate
from forge.models.events import Event, EventType
from forge.runtime import Runtime

GROUP = "embedded"
PUBLISH_FLOOR_EVENTS_PER_SECOND = 50_000
CONSUMER_GROUP = "bench-consumer"


def settings_for(data_dir: Path) -> ForgeSettings:
    """Return Forge's default settings with the SQLite file in `data_dir`."""
    return ForgeSettings(data_dir=data_dir)


def open_anchor_database(path: Path, settings: ForgeSettings) -> sqlite3.Connection:
    """Open a plain sqlite3 connection with Forge's schema and pragmas."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute(f"PRAGMA synchronous = {settings.sqlite_synchronous}")
    connection.execute("PRAGMA foreign_keys = ON")
    migrate(connection)
    return connection


async def _noop(event: Event[Any]) -> None:
    return None


# Forge -----------------------------------------------------------------------------------------


async def forge_publish(runtime: Runtime, events: Sequence[Event[Any]], batch_size: int) -> float:
    """Publish `events` with publish_many, `batch_size` per call; return the seconds."""
    started = time.perf_counter()
    for start in range(0, len(events), batch_size):
        await runtime.events.publish_many(events[start : start + batch_size])
    return time.perf_counter() - started


async def forge_publish_only(
    data_dir: Path, events: Sequence[Event[Any]], batch_size: int
) -> float:
    async with Runtime(settings_for(data_dir)) as runtime:
        return await forge_publish(runtime, events, batch_size)


async def forge_publish_and_consume(
    data_dir: Path, events: Sequence[Event[Any]], batch_size: int
) -> tuple[float, float]:
    """Publish `events` with EventService.publish_many, then drain them with a consumer.

    Returns (publish seconds, consume seconds).
    """
    async with Runtime(settings_for(data_dir)) as runtime:
        publish_seconds = await forge_publish(runtime, events, batch_size)

        consumer = runtime.consumer(CONSUMER_GROUP)
        for event_type in EventType:
            consumer.register_handler(event_type, _noop, name="noop")
        await consumer.start()
        try:
            started = time.perf_counter()
            handled = await consumer.drain(timeout=600)
            consume_seconds = time.perf_counter() - started
        finally:
            await consumer.stop()
    if handled != len(events):
        raise RuntimeError(f"the consumer handled {handled} of {len(events)} events")
    return publish_seconds, consume_seconds


async def forge_audit(
    data_dir: Path, events: Sequence[Event[Any]], batch_size: int
) -> tuple[float, float]:
    """Time the audit recorder: its batch handler alone, then as the `forge-audit` group.

    Returns (recorder seconds, seconds from the log through the consumer into the trail).
    """
    async with Runtime(settings_for(data_dir / "recorder")) as runtime:
        recorder = AuditRecorder(runtime.audit_store, runtime.protector)
        started = time.perf_counter()
        for start in range(0, len(events), batch_size):
            await recorder.record(events[start : start + batch_size])
        recorder_seconds = time.perf_counter() - started
    if recorder.recorded != len(events):
        raise RuntimeError(f"the recorder stored {recorder.recorded} of {len(events)} events")

    async with Runtime(settings_for(data_dir / "consumer")) as runtime:
        await forge_publish(runtime, events, batch_size)
        consumer, recorder = runtime.audit_consumer()
        await consumer.start()
        try:
            started = time.perf_counter()
            await consumer.drain(timeout=600)
            pipeline_seconds = time.perf_counter() - started
        finally:
            await consumer.stop()
    if recorder.recorded != len(events):
        raise RuntimeError(f"the audit consumer stored {recorder.recorded} of {len(events)}")
    return recorder_seconds, pipeline_seconds


# Anchors: plain sqlite3 ------------------------------------------------------------------------


def log_rows(events: Sequence[Event[Any]], max_bytes: int) -> list[tuple[Any, ...]]:
    """Return the event_log rows Forge writes for `events`, offsets numbered per topic."""
    appended_at = datetime.now(UTC).isoformat()
    next_offsets: dict[str, int] = {}
    rows = []
    for event in events:
        encoded = encode_event(event, max_bytes)
        offset = next_offsets.get(encoded.topic, 0)
        next_offsets[encoded.topic] = offset + 1
        rows.append(
            (
                encoded.topic,
                offset,
                encoded.key,
                encoded.value,
                orjson.dumps(encoded.headers).decode(),
                appended_at,
            )
        )
    return rows


def anchor_insert(
    connection: sqlite3.Connection, rows: Sequence[tuple[Any, ...]], batch: int
) -> float:
    """Insert the rows with executemany, one transaction per batch; return the seconds."""
    started = time.perf_counter()
    for start in range(0, len(rows), batch):
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            "INSERT INTO event_log (topic, log_offset, key, value, headers, appended_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows[start : start + batch],
        )
        connection.execute("COMMIT")
    return time.perf_counter() - started


def anchor_consume(connection: sqlite3.Connection, batch: int) -> tuple[float, int]:
    """Read the log in batches, decode each value's JSON and commit positions per batch.

    This is the least a consumer of this table can do; returns (seconds, records read).
    """
    started = time.perf_counter()
    cursor = 0
    count = 0
    committed_at = datetime.now(UTC).isoformat()
    while True:
        rows = connection.execute(
            "SELECT seq, topic, log_offset, key, value, headers, appended_at FROM event_log "
            "WHERE seq > ? ORDER BY seq LIMIT ?",
            (cursor, batch),
        ).fetchall()
        if not rows:
            break
        positions: dict[str, int] = {}
        for row in rows:
            orjson.loads(row[4])
            positions[row[1]] = row[2] + 1
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            "INSERT INTO consumer_positions (group_id, topic, next_offset, committed_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (group_id, topic) DO UPDATE SET "
            "next_offset = excluded.next_offset, committed_at = excluded.committed_at",
            [(CONSUMER_GROUP, topic, offset, committed_at) for topic, offset in positions.items()],
        )
        connection.execute("COMMIT")
        cursor = rows[-1][0]
        count += len(rows)
    return time.perf_counter() - started, count


def anchor_audit(
    connection: sqlite3.Connection, rows: Sequence[tuple[Any, ...]], batch: int
) -> float:
    """Insert audit rows with a plain batched INSERT, one transaction per batch."""
    started = time.perf_counter()
    for start in range(0, len(rows), batch):
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            "INSERT INTO audit_trail (event_id, event_type, occurred_at, occurred_at_us, "
            "actor_id, actor_type, resource_type, resource_id, correlation_id, causation_id, "
            "event_json, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows[start : start + batch],
        )
        connection.execute("COMMIT")
    return time.perf_counter() - started


# Rows ------------------------------------------------------------------------------------------


def run(scale: Scale, events: Sequence[Event[Any]]) -> list[Row]:
    """Run the embedded benchmarks `scale.runs` times; return the publish, consume, audit rows."""
    count = len(events)
    settings = settings_for(Path(tempfile.gettempdir()))
    rows_for_log = log_rows(events, settings.max_event_bytes)
    recorded_at = datetime.now(UTC).isoformat()
    rows_for_audit = [audit_row(event, recorded_at) for event in events]
    freeze_fixtures()

    figures: dict[str, list[float]] = {
        name: []
        for name in (
            "publish",
            "publish_anchor",
            "publish_small",
            "publish_small_anchor",
            "consume",
            "consume_anchor",
            "audit",
            "audit_anchor",
            "audit_pipeline",
        )
    }
    for _ in range(scale.runs):
        with tempfile.TemporaryDirectory(prefix="forge-bench-") as folder:
            root = Path(folder)
            connection = open_anchor_database(root / "anchor-log.sqlite3", settings)
            try:
                figures["publish_anchor"].append(
                    count / anchor_insert(connection, rows_for_log, scale.publish_batch_size)
                )
                seconds, read = anchor_consume(connection, scale.batch_size)
                if read != count:
                    raise RuntimeError(f"the anchor consumer read {read} of {count} rows")
                figures["consume_anchor"].append(count / seconds)
            finally:
                connection.close()

            publish_seconds, consume_seconds = asyncio.run(
                forge_publish_and_consume(root / "forge-log", events, scale.publish_batch_size)
            )
            figures["publish"].append(count / publish_seconds)
            figures["consume"].append(count / consume_seconds)

            connection = open_anchor_database(root / "anchor-log-small.sqlite3", settings)
            try:
                figures["publish_small_anchor"].append(
                    count / anchor_insert(connection, rows_for_log, scale.batch_size)
                )
            finally:
                connection.close()
            figures["publish_small"].append(
                count
                / asyncio.run(
                    forge_publish_only(root / "forge-log-small", events, scale.batch_size)
                )
            )

            connection = open_anchor_database(root / "anchor-audit.sqlite3", settings)
            try:
                figures["audit_anchor"].append(
                    count / anchor_audit(connection, rows_for_audit, scale.batch_size)
                )
            finally:
                connection.close()
            recorder_seconds, pipeline_seconds = asyncio.run(
                forge_audit(root / "forge-audit", events, scale.batch_size)
            )
            figures["audit"].append(count / recorder_seconds)
            figures["audit_pipeline"].append(count / pipeline_seconds)

    batch = f"{count:,} events, batches of {scale.batch_size}"
    return [
        Row(
            "embedded publish",
            GROUP,
            "events/s",
            Summary.of(figures["publish"]),
            Summary.of(figures["publish_anchor"]),
            "sqlite3 executemany",
            [at_least(PUBLISH_FLOOR_EVENTS_PER_SECOND, "events/s"), ratio_at_least(0.5)],
            details={"events": count, "batch_size": scale.publish_batch_size},
            note=(
                f"EventService.publish_many to the SQLite event log, {count:,} events, "
                f"{scale.publish_batch_size:,} per call"
            ),
        ),
        Row(
            f"embedded publish, {scale.batch_size} per call",
            GROUP,
            "events/s",
            Summary.of(figures["publish_small"]),
            Summary.of(figures["publish_small_anchor"]),
            "sqlite3 executemany",
            [],
            details={"events": count, "batch_size": scale.batch_size},
            note=f"the row above with {scale.batch_size} events per call and per executemany",
        ),
        Row(
            "embedded consume",
            GROUP,
            "events/s",
            Summary.of(figures["consume"]),
            Summary.of(figures["consume_anchor"]),
            "sqlite3 SELECT + orjson",
            [ratio_at_least(0.5)],
            details={"events": count, "batch_size": 500},
            note=f"SqliteEventConsumer.drain, no-op handler on all 22 types, {count:,} events",
        ),
        Row(
            "audit recorder, SQLite",
            GROUP,
            "events/s",
            Summary.of(figures["audit"]),
            Summary.of(figures["audit_anchor"]),
            "batched INSERT",
            [ratio_at_least(0.5)],
            details={"events": count, "batch_size": scale.batch_size},
            note=f"AuditRecorder.record into SqliteAuditStore, {batch}",
        ),
        Row(
            "audit recorder, SQLite, log to trail",
            GROUP,
            "events/s",
            Summary.of(figures["audit_pipeline"]),
            Summary.of(figures["audit_anchor"]),
            "batched INSERT",
            [],
            details={"events": count},
            note="consumer group forge-audit draining the log into the trail (no target)",
        ),
    ]
