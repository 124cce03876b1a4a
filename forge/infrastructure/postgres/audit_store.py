"""Audit trail in PostgreSQL.

Triggers in the schema reject every UPDATE, DELETE and TRUNCATE on the table, so the trail stays
append-only whatever code runs against the database, unless the table's owner or a superuser
disables the triggers.

Recording is idempotent by event id: a redelivered event inserts nothing (ON CONFLICT DO
NOTHING), and two recorders storing the same event at once keep one row. The audit recorder
therefore has an effectively-once effect on this store without an inbox.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from forge.core.audit.store import (
    AuditEntry,
    AuditPage,
    AuditQuery,
    decode_cursor,
    encode_cursor,
    to_microseconds,
)
from forge.exceptions import EventRejectedError
from forge.infrastructure.postgres.database import PostgresDatabase, storable_text
from forge.models.events import Event, parse_event

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_INSERT = (
    "INSERT INTO audit_trail (event_id, event_type, occurred_at, actor_id, actor_type, "
    "resource_type, resource_id, correlation_id, causation_id, event_json) "
    "SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::uuid[], $5::text[], "
    "$6::text[], $7::uuid[], $8::uuid[], $9::uuid[], $10::text[]) "
    "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
)


def _from_microseconds(microseconds: int) -> datetime:
    return _EPOCH + timedelta(microseconds=microseconds)


class PostgresAuditStore:
    """`AuditStore` on the `audit_trail` table."""

    def __init__(self, database: PostgresDatabase) -> None:
        self._database = database

    async def record(self, events: Sequence[Event[Any]]) -> int:
        """Store the events not stored yet, in one transaction; return how many were new.

        Raises:
            EventRejectedError: an event has the id of a stored event but other content. Nothing
                of the batch is stored, so a caller can record its events one by one.
        """
        if not events:
            return 0
        documents = [event.to_json().decode() for event in events]
        columns: list[list[Any]] = [[] for _ in range(10)]
        for event, document in zip(events, documents, strict=True):
            values = (
                event.id,
                event.type.value,
                event.timestamp,
                event.actor_id,
                event.actor_type,
                storable_text(event.resource_type),
                event.resource_id,
                event.correlation_id,
                event.causation_id,
                document,
            )
            for column, value in zip(columns, values, strict=True):
                column.append(value)

        async with self._database.transaction() as connection:
            inserted = await connection.fetch(_INSERT, *columns)
            if len(inserted) < len(events):
                await _reject_changed_duplicates(connection, events, documents)
        return len(inserted)

    async def query(self, query: AuditQuery) -> AuditPage:
        """Return one page of matching entries, newest first, and the cursor of the next page.

        Raises:
            EventValidationError: `query.cursor` was not returned by an earlier query.
        """
        conditions: list[str] = []
        parameters: list[Any] = []

        def add(condition: str, *values: Any) -> None:
            placeholders = []
            for value in values:
                parameters.append(value)
                placeholders.append(f"${len(parameters)}")
            conditions.append(condition.format(*placeholders))

        for column, value in (
            ("resource_id", query.resource_id),
            ("actor_id", query.actor_id),
            ("correlation_id", query.correlation_id),
        ):
            if value is not None:
                add(f"{column} = {{}}", value)
        if query.event_type is not None:
            add("event_type = {}", query.event_type.value)
        if query.since is not None:
            add("occurred_at >= {}", query.since)
        if query.until is not None:
            add("occurred_at <= {}", query.until)
        if query.cursor is not None:
            occurred_us, seq = decode_cursor(query.cursor)
            add("(occurred_at, seq) < ({}, {})", _from_microseconds(occurred_us), seq)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        parameters.append(query.limit + 1)
        rows = await self._database.fetch(
            "SELECT seq, occurred_at, event_json, recorded_at FROM audit_trail "
            f"{where} ORDER BY occurred_at DESC, seq DESC LIMIT ${len(parameters)}",
            *parameters,
        )

        has_more = len(rows) > query.limit
        rows = rows[: query.limit]
        entries = [AuditEntry(parse_event(row["event_json"]), row["recorded_at"]) for row in rows]
        next_cursor = None
        if has_more and rows:
            last = rows[-1]
            next_cursor = encode_cursor(to_microseconds(last["occurred_at"]), last["seq"])
        return AuditPage(entries, next_cursor)

    async def events_for_resource(
        self, resource_id: UUID, *, until: datetime | None = None
    ) -> list[Event[Any]]:
        """Return the resource's events, oldest first, up to `until` inclusive if given."""
        sql = "SELECT event_json FROM audit_trail WHERE resource_id = $1"
        parameters: list[Any] = [resource_id]
        if until is not None:
            sql += " AND occurred_at <= $2"
            parameters.append(until)
        sql += " ORDER BY occurred_at, seq"
        rows = await self._database.fetch(sql, *parameters)
        return [parse_event(row["event_json"]) for row in rows]

    async def count(self) -> int:
        total: int = await self._database.fetchval("SELECT count(*) FROM audit_trail")
        return total


async def _reject_changed_duplicates(
    connection: Any, events: Sequence[Event[Any]], documents: Sequence[str]
) -> None:
    rows = await connection.fetch(
        "SELECT event_id, event_json FROM audit_trail WHERE event_id = ANY($1::uuid[])",
        [event.id for event in events],
    )
    stored = {str(row["event_id"]): row["event_json"] for row in rows}
    changed = sorted(
        {
            str(event.id)
            for event, document in zip(events, documents, strict=True)
            if stored.get(str(event.id), document) != document
        }
    )
    if changed:
        # Raising rolls back the whole batch; the consumer then records its events one by
        # one, so only the conflicting event is parked.
        raise EventRejectedError(
            f"Event id {changed[0]} is already in the audit trail with different content; "
            "an event id must never be reused. The new record is parked, the stored one kept."
        )
