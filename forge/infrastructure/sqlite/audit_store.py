"""Audit trail in the embedded SQLite file.

Triggers in the schema reject every UPDATE and DELETE on the table, so the trail stays
append-only whatever code runs against the file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
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
from forge.infrastructure.sqlite.database import SqliteDatabase
from forge.models.events import Event, parse_event


def audit_row(event: Event[Any], recorded_at: str) -> tuple[Any, ...]:
    """Return the audit_trail row of an event (shared with other SQL stores)."""
    return (
        str(event.id),
        event.type.value,
        event.timestamp.isoformat(),
        to_microseconds(event.timestamp),
        str(event.actor_id) if event.actor_id else None,
        event.actor_type,
        event.resource_type,
        str(event.resource_id) if event.resource_id else None,
        str(event.correlation_id) if event.correlation_id else None,
        str(event.causation_id) if event.causation_id else None,
        event.to_json().decode(),
        recorded_at,
    )


class SqliteAuditStore:
    """`AuditStore` on the `audit_trail` table."""

    def __init__(self, database: SqliteDatabase) -> None:
        self._database = database

    async def record(self, events: Sequence[Event[Any]]) -> int:
        if not events:
            return 0
        recorded_at = datetime.now(UTC).isoformat()
        rows = [audit_row(event, recorded_at) for event in events]

        def insert(connection: sqlite3.Connection) -> int:
            before = connection.total_changes
            connection.executemany(
                "INSERT INTO audit_trail (event_id, event_type, occurred_at, occurred_at_us, "
                "actor_id, actor_type, resource_type, resource_id, correlation_id, causation_id, "
                "event_json, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (event_id) DO NOTHING",
                rows,
            )
            new = connection.total_changes - before
            if new < len(rows):
                _reject_changed_duplicates(connection, rows)
            return new

        return await self._database.write(insert)

    async def query(self, query: AuditQuery) -> AuditPage:
        conditions: list[str] = []
        parameters: list[Any] = []
        for column, value in (
            ("resource_id", query.resource_id),
            ("actor_id", query.actor_id),
            ("correlation_id", query.correlation_id),
        ):
            if value is not None:
                conditions.append(f"{column} = ?")
                parameters.append(str(value))
        if query.event_type is not None:
            conditions.append("event_type = ?")
            parameters.append(query.event_type.value)
        if query.since is not None:
            conditions.append("occurred_at_us >= ?")
            parameters.append(to_microseconds(query.since))
        if query.until is not None:
            conditions.append("occurred_at_us <= ?")
            parameters.append(to_microseconds(query.until))
        if query.cursor is not None:
            occurred_us, seq = decode_cursor(query.cursor)
            conditions.append("(occurred_at_us < ? OR (occurred_at_us = ? AND seq < ?))")
            parameters.extend([occurred_us, occurred_us, seq])
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        sql = (
            "SELECT seq, occurred_at_us, event_json, recorded_at FROM audit_trail "
            f"{where} ORDER BY occurred_at_us DESC, seq DESC LIMIT ?"
        )

        def select(connection: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return connection.execute(sql, (*parameters, query.limit + 1)).fetchall()

        rows = await self._database.read(select)
        has_more = len(rows) > query.limit
        rows = rows[: query.limit]
        entries = [AuditEntry(parse_event(row[2]), datetime.fromisoformat(row[3])) for row in rows]
        next_cursor = encode_cursor(rows[-1][1], rows[-1][0]) if has_more and rows else None
        return AuditPage(entries, next_cursor)

    async def events_for_resource(
        self, resource_id: UUID, *, until: datetime | None = None
    ) -> list[Event[Any]]:
        sql = "SELECT event_json FROM audit_trail WHERE resource_id = ?"
        parameters: list[Any] = [str(resource_id)]
        if until is not None:
            sql += " AND occurred_at_us <= ?"
            parameters.append(to_microseconds(until))
        sql += " ORDER BY occurred_at_us, seq"

        def select(connection: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return connection.execute(sql, parameters).fetchall()

        return [parse_event(row[0]) for row in await self._database.read(select)]

    async def count(self) -> int:
        def select(connection: sqlite3.Connection) -> int:
            return int(connection.execute("SELECT COUNT(*) FROM audit_trail").fetchone()[0])

        return await self._database.read(select)


def _reject_changed_duplicates(
    connection: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]
) -> None:
    ids = [row[0] for row in rows]
    stored: dict[str, str] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        placeholders = ",".join("?" * len(chunk))
        stored.update(
            connection.execute(
                f"SELECT event_id, event_json FROM audit_trail WHERE event_id IN ({placeholders})",
                chunk,
            ).fetchall()
        )
    changed = sorted({row[0] for row in rows if stored.get(row[0], row[10]) != row[10]})
    if changed:
        # Raising rolls back the whole batch; the consumer then records its events one by
        # one, so only the conflicting event is parked.
        raise EventRejectedError(
            f"Event id {changed[0]} is already in the audit trail with different content; "
            "an event id must never be reused. The new record is parked, the stored one kept."
        )
