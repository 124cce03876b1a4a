"""Dead-letter store in the embedded SQLite file."""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from forge.core.events.dead_letters import DeadLetter, DeadLetterStatus, storable_ids
from forge.infrastructure.sqlite.database import SqliteDatabase

_COLUMNS = (
    "id, group_id, topic, partition, log_offset, key, value, headers, event_id, event_type, "
    "reason, error_type, handler, attempts, status, parked_at, extra"
)


def _row_to_letter(row: tuple[Any, ...]) -> DeadLetter:
    (
        letter_id,
        group_id,
        topic,
        partition,
        offset,
        key,
        value,
        headers,
        event_id,
        event_type,
        reason,
        error_type,
        handler,
        attempts,
        status,
        parked_at,
        extra,
    ) = row
    return DeadLetter(
        id=letter_id,
        group_id=group_id,
        topic=topic,
        partition=partition,
        offset=offset,
        key=key,
        value=bytes(value),
        headers=orjson.loads(headers),
        event_id=event_id,
        event_type=event_type,
        reason=reason,
        error_type=error_type,
        handler=handler,
        attempts=attempts,
        status=DeadLetterStatus(status),
        parked_at=datetime.fromisoformat(parked_at),
        extra=orjson.loads(extra),
    )


class SqliteDeadLetterStore:
    """Keeps dead letters in the `dead_letters` table of the SQLite file."""

    def __init__(self, database: SqliteDatabase) -> None:
        self._database = database

    async def park(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        now = datetime.now(UTC).isoformat()
        rows = [
            (
                letter.group_id,
                letter.topic,
                letter.partition,
                letter.offset,
                letter.key,
                letter.value,
                orjson.dumps(dict(letter.headers)).decode(),
                letter.event_id,
                letter.event_type,
                letter.reason,
                letter.error_type,
                letter.handler,
                letter.attempts,
                DeadLetterStatus.PARKED.value,
                now,
                now,
                orjson.dumps(dict(letter.extra)).decode(),
            )
            for letter in letters
        ]

        def insert(connection: sqlite3.Connection) -> None:
            # Parking the same record and handler again (after a crash before the position
            # was committed) updates the existing letter instead of adding a duplicate.
            connection.executemany(
                "INSERT INTO dead_letters (group_id, topic, partition, log_offset, key, value, "
                "headers, event_id, event_type, reason, error_type, handler, attempts, status, "
                "parked_at, updated_at, extra) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (group_id, topic, partition, log_offset, handler) DO UPDATE SET "
                "reason = excluded.reason, error_type = excluded.error_type, "
                "attempts = excluded.attempts, status = excluded.status, "
                "updated_at = excluded.updated_at, extra = excluded.extra",
                rows,
            )

        await self._database.write(insert)

    async def list(
        self,
        *,
        group_id: str | None = None,
        status: DeadLetterStatus | None = None,
        limit: int = 100,
    ) -> builtins.list[DeadLetter]:
        conditions: list[str] = []
        parameters: list[Any] = []
        if group_id is not None:
            conditions.append("group_id = ?")
            parameters.append(group_id)
        if status is not None:
            conditions.append("status = ?")
            parameters.append(DeadLetterStatus(status).value)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        sql = f"SELECT {_COLUMNS} FROM dead_letters {where} ORDER BY id LIMIT ?"

        def query(connection: sqlite3.Connection) -> builtins.list[DeadLetter]:
            # SQLite's integers have 64 bits, and a larger limit means no limit.
            rows = connection.execute(sql, (*parameters, min(limit, 2**63 - 1))).fetchall()
            return [_row_to_letter(row) for row in rows]

        return await self._database.read(query)

    async def request_retry(
        self, ids: Sequence[int] | None = None, *, group_id: str | None = None
    ) -> int:
        now = datetime.now(UTC).isoformat()
        conditions = ["status = ?"]
        parameters: list[Any] = [DeadLetterStatus.PARKED.value]
        if ids is not None:
            ids = storable_ids(ids)
            if not ids:
                return 0
            # One JSON parameter, because SQLite limits a statement's parameters (250,000 in
            # the SQLite 3.40.1 that Python uses here).
            conditions.append("id IN (SELECT value FROM json_each(?))")
            parameters.append(orjson.dumps(ids).decode())
        if group_id is not None:
            conditions.append("group_id = ?")
            parameters.append(group_id)
        sql = f"UPDATE dead_letters SET status = ?, updated_at = ? WHERE {' AND '.join(conditions)}"

        def update(connection: sqlite3.Connection) -> int:
            cursor = connection.execute(
                sql, (DeadLetterStatus.RETRY_REQUESTED.value, now, *parameters)
            )
            return cursor.rowcount

        return await self._database.write(update)

    async def claim_retries(self, group_id: str, limit: int = 100) -> builtins.list[DeadLetter]:
        sql = (
            f"SELECT {_COLUMNS} FROM dead_letters WHERE group_id = ? AND status = ? "
            "ORDER BY id LIMIT ?"
        )

        def query(connection: sqlite3.Connection) -> builtins.list[DeadLetter]:
            rows = connection.execute(
                sql, (group_id, DeadLetterStatus.RETRY_REQUESTED.value, limit)
            ).fetchall()
            return [_row_to_letter(row) for row in rows]

        return await self._database.read(query)

    async def mark_resolved(self, letter_id: int) -> None:
        await self._set_status(letter_id, DeadLetterStatus.RESOLVED)

    async def mark_parked(
        self,
        letter_id: int,
        reason: str,
        error_type: str,
        attempts: int,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        now = datetime.now(UTC).isoformat()
        details = orjson.dumps(dict(extra or {})).decode()

        def update(connection: sqlite3.Connection) -> None:
            connection.execute(
                "UPDATE dead_letters SET status = ?, reason = ?, error_type = ?, "
                "attempts = attempts + ?, updated_at = ?, extra = ? WHERE id = ?",
                (
                    DeadLetterStatus.PARKED.value,
                    reason,
                    error_type,
                    attempts,
                    now,
                    details,
                    letter_id,
                ),
            )

        await self._database.write(update)

    async def _set_status(self, letter_id: int, status: DeadLetterStatus) -> None:
        now = datetime.now(UTC).isoformat()

        def update(connection: sqlite3.Connection) -> None:
            connection.execute(
                "UPDATE dead_letters SET status = ?, updated_at = ? WHERE id = ?",
                (status.value, now, letter_id),
            )

        await self._database.write(update)
