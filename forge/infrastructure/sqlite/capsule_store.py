"""Capsule store in the embedded SQLite file.

Each write appends its events to the event log inside the same transaction as the capsule row,
so a crash keeps both or neither. No state change is stored without its event, and no event
is stored for a change that was not.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from forge.core.events.codec import EncodedEvent
from forge.exceptions import ConflictError, NotFoundError
from forge.infrastructure.sqlite.database import SqliteDatabase
from forge.infrastructure.sqlite.event_log import append_events
from forge.models.capsule import Capsule

_COLUMNS = (
    "id, owner_id, capsule_type, title, content, parent_id, version, created_at, updated_at, "
    "deleted_at"
)


def _row_to_capsule(row: tuple[Any, ...]) -> Capsule:
    return Capsule(
        id=UUID(row[0]),
        owner_id=UUID(row[1]),
        capsule_type=row[2],
        title=row[3],
        content=row[4],
        parent_id=UUID(row[5]) if row[5] else None,
        version=row[6],
        created_at=datetime.fromisoformat(row[7]),
        updated_at=datetime.fromisoformat(row[8]),
        deleted_at=datetime.fromisoformat(row[9]) if row[9] else None,
    )


class SqliteCapsuleStore:
    """`CapsuleStore` on the `capsules` table, with events appended to the embedded log."""

    def __init__(self, database: SqliteDatabase) -> None:
        self._database = database

    async def get(self, capsule_id: UUID, *, include_deleted: bool = False) -> Capsule | None:
        def select(connection: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = connection.execute(
                f"SELECT {_COLUMNS} FROM capsules WHERE id = ?", (str(capsule_id),)
            ).fetchone()
            return row

        row = await self._database.read(select)
        if row is None:
            return None
        capsule = _row_to_capsule(row)
        if capsule.deleted and not include_deleted:
            return None
        return capsule

    async def list(
        self, *, owner_id: UUID | None = None, include_deleted: bool = False, limit: int = 100
    ) -> list[Capsule]:
        conditions = []
        parameters: list[Any] = []
        if owner_id is not None:
            conditions.append("owner_id = ?")
            parameters.append(str(owner_id))
        if not include_deleted:
            conditions.append("deleted_at IS NULL")
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        sql = f"SELECT {_COLUMNS} FROM capsules {where} ORDER BY created_at, id LIMIT ?"

        def select(connection: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return connection.execute(sql, (*parameters, limit)).fetchall()

        return [_row_to_capsule(row) for row in await self._database.read(select)]

    async def create(self, capsule: Capsule, events: Sequence[EncodedEvent]) -> None:
        def insert(connection: sqlite3.Connection) -> None:
            if capsule.parent_id is not None:
                parent = connection.execute(
                    "SELECT deleted_at FROM capsules WHERE id = ?", (str(capsule.parent_id),)
                ).fetchone()
                if parent is None or parent[0] is not None:
                    raise NotFoundError(
                        f"Parent capsule {capsule.parent_id} not found (or deleted); create "
                        "the parent first or omit parent_id."
                    )
            try:
                connection.execute(
                    f"INSERT INTO capsules ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _capsule_row(capsule),
                )
            except sqlite3.IntegrityError as error:
                raise ConflictError(
                    f"Capsule {capsule.id} already exists; use a new id or update it."
                ) from error
            append_events(connection, events)

        await self._database.write(insert)

    async def update(
        self, capsule: Capsule, expected_version: str, events: Sequence[EncodedEvent]
    ) -> None:
        def replace(connection: sqlite3.Connection) -> None:
            updated = connection.execute(
                "UPDATE capsules SET capsule_type = ?, title = ?, content = ?, version = ?, "
                "updated_at = ? WHERE id = ? AND version = ? AND deleted_at IS NULL",
                (
                    capsule.capsule_type,
                    capsule.title,
                    capsule.content,
                    capsule.version,
                    capsule.updated_at.isoformat(),
                    str(capsule.id),
                    expected_version,
                ),
            ).rowcount
            if updated != 1:
                _raise_missing_or_conflict(connection, capsule.id, expected_version)
            append_events(connection, events)

        await self._database.write(replace)

    async def delete(
        self,
        capsule_id: UUID,
        expected_version: str,
        deleted_at: datetime,
        events: Sequence[EncodedEvent],
    ) -> None:
        def mark(connection: sqlite3.Connection) -> None:
            updated = connection.execute(
                "UPDATE capsules SET deleted_at = ?, updated_at = ? "
                "WHERE id = ? AND version = ? AND deleted_at IS NULL",
                (deleted_at.isoformat(), deleted_at.isoformat(), str(capsule_id), expected_version),
            ).rowcount
            if updated != 1:
                _raise_missing_or_conflict(connection, capsule_id, expected_version)
            append_events(connection, events)

        await self._database.write(mark)


def _capsule_row(capsule: Capsule) -> tuple[Any, ...]:
    return (
        str(capsule.id),
        str(capsule.owner_id),
        capsule.capsule_type,
        capsule.title,
        capsule.content,
        str(capsule.parent_id) if capsule.parent_id else None,
        capsule.version,
        capsule.created_at.isoformat(),
        capsule.updated_at.isoformat(),
        capsule.deleted_at.isoformat() if capsule.deleted_at else None,
    )


def _raise_missing_or_conflict(
    connection: sqlite3.Connection, capsule_id: UUID, expected_version: str
) -> None:
    row = connection.execute(
        "SELECT version, deleted_at FROM capsules WHERE id = ?", (str(capsule_id),)
    ).fetchone()
    if row is None or row[1] is not None:
        raise NotFoundError(f"Capsule {capsule_id} not found (or deleted).")
    raise ConflictError(
        f"Capsule {capsule_id} is at version {row[0]}, not {expected_version}; read it again "
        "and retry the change."
    )
