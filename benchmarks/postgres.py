"""PostgreSQL audit benchmark: the audit recorder against a plain batched INSERT.

Forge runs as shipped with PostgreSQL: `AuditRecorder` on `PostgresAuditStore`, with the
protector that erases the key of each anonymized user. The anchor inserts the same rows with
asyncpg's `executemany`, one transaction per batch, into an identical table (same indexes and
triggers). Each side gets a fresh PostgreSQL schema in every run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
import uuid
from collections.abc import Sequence
from typing import Any

from benchmarks.harness import Row, Summary, freeze_fixtures, ratio_at_least
from benchmarks.scale import Scale
from benchmarks.services import Server, postgres_server, provisioned
from forge.models.events import Event

GROUP = "postgres"
NAME = "audit recorder, PostgreSQL"
TARGETS = [ratio_at_least(0.5)]

_ANCHOR_INSERT = (
    "INSERT INTO audit_trail (event_id, event_type, occurred_at, actor_id, actor_type, "
    "resource_type, resource_id, correlation_id, causation_id, event_json) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
)


def audit_rows(events: Sequence[Event[Any]]) -> list[tuple[Any, ...]]:
    """Return the audit_trail rows PostgresAuditStore writes for `events`."""
    return [
        (
            event.id,
            event.type.value,
            event.timestamp,
            event.actor_id,
            event.actor_type,
            event.resource_type,
            event.resource_id,
            event.correlation_id,
            event.causation_id,
            event.model_dump_json(),
        )
        for event in events
    ]


async def forge_record(dsn: str, schema: str, events: Sequence[Event[Any]], batch: int) -> float:
    from forge.core.audit.recorder import AuditRecorder
    from forge.core.privacy import PersonalDataProtector
    from forge.infrastructure.postgres.audit_store import PostgresAuditStore
    from forge.infrastructure.postgres.database import PostgresDatabase
    from forge.infrastructure.postgres.subject_keys import PostgresSubjectKeyStore

    async with PostgresDatabase(dsn, schema=schema) as database:
        recorder = AuditRecorder(
            PostgresAuditStore(database), PersonalDataProtector(PostgresSubjectKeyStore(database))
        )
        started = time.perf_counter()
        for start in range(0, len(events), batch):
            await recorder.record(events[start : start + batch])
        seconds = time.perf_counter() - started
        await database.execute(f"DROP SCHEMA {schema} CASCADE")
    if recorder.recorded != len(events):
        raise RuntimeError(f"the recorder stored {recorder.recorded} of {len(events)} events")
    return seconds


async def anchor_insert(
    dsn: str, schema: str, rows: Sequence[tuple[Any, ...]], batch: int
) -> float:
    from forge.infrastructure.postgres.database import PostgresDatabase

    # Opening a PostgresDatabase creates the schema with Forge's tables; the insert itself
    # uses a plain asyncpg connection.
    async with PostgresDatabase(dsn, schema=schema) as database:
        async with database.connection() as connection:
            started = time.perf_counter()
            for start in range(0, len(rows), batch):
                async with connection.transaction():
                    await connection.executemany(_ANCHOR_INSERT, rows[start : start + batch])
            seconds = time.perf_counter() - started
        await database.execute(f"DROP SCHEMA {schema} CASCADE")
    return seconds


def run(scale: Scale, events: Sequence[Event[Any]], *, provision: bool) -> list[Row]:
    if importlib.util.find_spec("forge.infrastructure.postgres.audit_store") is None:
        return [
            Row(
                NAME,
                GROUP,
                "events/s",
                targets=TARGETS,
                status="SKIP",
                note="forge.infrastructure.postgres.audit_store does not exist yet",
            )
        ]
    try:
        with provisioned(postgres_server(), start=provision) as server:
            return [_measure(scale, events, server)]
    except Exception as error:  # reported in the table; the other benchmarks still run
        note = f"{type(error).__name__}: {error}"
        return [Row(NAME, GROUP, "events/s", targets=TARGETS, status="ERROR", note=note)]


def _measure(scale: Scale, events: Sequence[Event[Any]], server: Server) -> Row:
    rows = audit_rows(events)
    freeze_fixtures()
    count = len(events)
    forge: list[float] = []
    anchor: list[float] = []
    for _ in range(scale.runs):
        suffix = uuid.uuid4().hex[:8]
        anchor.append(
            count
            / asyncio.run(
                anchor_insert(server.endpoint, f"bench_anchor_{suffix}", rows, scale.batch_size)
            )
        )
        forge.append(
            count
            / asyncio.run(
                forge_record(server.endpoint, f"bench_forge_{suffix}", events, scale.batch_size)
            )
        )
    return Row(
        NAME,
        GROUP,
        "events/s",
        Summary.of(forge),
        Summary.of(anchor),
        "batched INSERT",
        TARGETS,
        details={"events": count, "batch_size": scale.batch_size},
        note=(
            f"AuditRecorder.record into PostgresAuditStore, {count:,} events, "
            f"batches of {scale.batch_size}"
        ),
    )
