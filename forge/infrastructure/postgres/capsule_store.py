"""Capsule store in PostgreSQL.

Each write inserts its events as outbox rows inside the same transaction as the capsule row, so
a crash keeps both or neither. There is no window where the state changed but no event records
it, nor an event for a change that was not stored. `OutboxRelay` publishes the rows afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from forge.core.events.codec import EncodedEvent
from forge.exceptions import ConflictError, NotFoundError
from forge.infrastructure.postgres.database import PostgresDatabase, status_count
from forge.infrastructure.postgres.outbox import PostgresOutbox
from forge.models.capsule import Capsule

_COLUMNS = (
    "id, owner_id, capsule_type, title, content, parent_id, version, created_at, updated_at, "
    "deleted_at"
)


def _row_to_capsule(row: Any) -> Capsule:
    return Capsule(
        id=UUID(str(row["id"])),
        owner_id=UUID(str(row["owner_id"])),
        capsule_type=row["capsule_type"],
        title=row["title"],
        content=row["content"],
        parent_id=UUID(str(row["parent_id"])) if row["parent_id"] else None,
        version=row["version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        deleted_at=row["deleted_at"],
    )


class PostgresCapsuleStore:
    """`CapsuleStore` on the `capsules` table, with events appended to the outbox table."""

    def __init__(self, database: PostgresDatabase, outbox: PostgresOutbox | None = None) -> None:
        self._database = database
        self._outbox = outbox or PostgresOutbox(database)

    async def get(self, capsule_id: UUID, *, include_deleted: bool = False) -> Capsule | None:
        row = await self._database.fetchrow(
            f"SELECT {_COLUMNS} FROM capsules WHERE id = $1", capsule_id
        )
        if row is None:
            return None
        capsule = _row_to_capsule(row)
        if capsule.deleted and not include_deleted:
            return None
        return capsule

    async def list(
        self, *, owner_id: UUID | None = None, include_deleted: bool = False, limit: int = 100
    ) -> list[Capsule]:
        conditions: list[str] = []
        parameters: list[Any] = []
        if owner_id is not None:
            parameters.append(owner_id)
            conditions.append(f"owner_id = ${len(parameters)}")
        if not include_deleted:
            conditions.append("deleted_at IS NULL")
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        parameters.append(limit)
        rows = await self._database.fetch(
            f"SELECT {_COLUMNS} FROM capsules {where} ORDER BY created_at, id "
            f"LIMIT ${len(parameters)}",
            *parameters,
        )
        return [_row_to_capsule(row) for row in rows]

    async def create(self, capsule: Capsule, events: Sequence[EncodedEvent]) -> None:
        """Insert a new capsule and its outbox rows in one transaction.

        Raises:
            ConflictError: a capsule with this id exists, deleted or not.
            NotFoundError: `parent_id` names no capsule, or a deleted one.
            StorageUnavailableError: the server is unreachable; nothing may have been stored.
        """
        async with self._database.transaction() as connection:
            if capsule.parent_id is not None:
                # FOR SHARE makes a concurrent delete of the parent wait for this commit, so
                # the parent is still live when the child becomes visible.
                parent = await connection.fetchrow(
                    "SELECT deleted_at FROM capsules WHERE id = $1 FOR SHARE", capsule.parent_id
                )
                if parent is None or parent["deleted_at"] is not None:
                    raise NotFoundError(
                        f"Parent capsule {capsule.parent_id} not found (or deleted); create "
                        "the parent first or omit parent_id."
                    )
            inserted = await connection.fetchval(
                f"INSERT INTO capsules ({_COLUMNS}) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
                "ON CONFLICT (id) DO NOTHING RETURNING true",
                *_capsule_row(capsule),
            )
            if not inserted:
                raise ConflictError(
                    f"Capsule {capsule.id} already exists; use a new id or update it."
                )
            await self._outbox.append(connection, events)

    async def update(
        self, capsule: Capsule, expected_version: str, events: Sequence[EncodedEvent]
    ) -> None:
        """Replace a live capsule at `expected_version` and add its outbox rows, atomically.

        Raises:
            NotFoundError: no live capsule has this id.
            ConflictError: the capsule is stored at another version.
        """
        async with self._database.transaction() as connection:
            status = await connection.execute(
                "UPDATE capsules SET capsule_type = $1, title = $2, content = $3, version = $4, "
                "updated_at = $5 WHERE id = $6 AND version = $7 AND deleted_at IS NULL",
                capsule.capsule_type,
                capsule.title,
                capsule.content,
                capsule.version,
                capsule.updated_at,
                capsule.id,
                expected_version,
            )
            if status_count(status) != 1:
                await _raise_missing_or_conflict(connection, capsule.id, expected_version)
            await self._outbox.append(connection, events)

    async def delete(
        self,
        capsule_id: UUID,
        expected_version: str,
        deleted_at: datetime,
        events: Sequence[EncodedEvent],
    ) -> None:
        """Mark a live capsule at `expected_version` deleted and add its outbox rows, atomically.

        Raises:
            NotFoundError: no live capsule has this id.
            ConflictError: the capsule is stored at another version.
        """
        async with self._database.transaction() as connection:
            status = await connection.execute(
                "UPDATE capsules SET deleted_at = $1, updated_at = $1 "
                "WHERE id = $2 AND version = $3 AND deleted_at IS NULL",
                deleted_at,
                capsule_id,
                expected_version,
            )
            if status_count(status) != 1:
                await _raise_missing_or_conflict(connection, capsule_id, expected_version)
            await self._outbox.append(connection, events)


def _capsule_row(capsule: Capsule) -> tuple[Any, ...]:
    return (
        capsule.id,
        capsule.owner_id,
        capsule.capsule_type,
        capsule.title,
        capsule.content,
        capsule.parent_id,
        capsule.version,
        capsule.created_at,
        capsule.updated_at,
        capsule.deleted_at,
    )


async def _raise_missing_or_conflict(
    connection: Any, capsule_id: UUID, expected_version: str
) -> None:
    row = await connection.fetchrow(
        "SELECT version, deleted_at FROM capsules WHERE id = $1", capsule_id
    )
    if row is None or row["deleted_at"] is not None:
        raise NotFoundError(f"Capsule {capsule_id} not found (or deleted).")
    raise ConflictError(
        f"Capsule {capsule_id} is at version {row['version']}, not {expected_version}; read it "
        "again and retry the change."
    )
