"""Keys that seal personal data, in the embedded SQLite file."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from uuid import UUID

from forge.infrastructure.sqlite.database import SqliteDatabase

KEY_BYTES = 32


class SqliteSubjectKeyStore:
    """`SubjectKeyStore` on the `subject_keys` table; an erased key stays NULL for good."""

    def __init__(self, database: SqliteDatabase) -> None:
        self._database = database

    async def key_for(self, subject_id: UUID, *, create: bool) -> bytes | None:
        def get_or_create(connection: sqlite3.Connection) -> bytes | None:
            return _get_or_create(connection, subject_id, create)

        if create:
            return await self._database.write(get_or_create)
        return await self._database.read(get_or_create)

    async def keys_for(
        self, subject_ids: Sequence[UUID], *, create: bool
    ) -> dict[UUID, bytes | None]:
        """Return what `key_for` returns for each subject, in one transaction for all."""

        def get_or_create_all(connection: sqlite3.Connection) -> dict[UUID, bytes | None]:
            return {
                subject_id: _get_or_create(connection, subject_id, create)
                for subject_id in subject_ids
            }

        if create:
            return await self._database.write(get_or_create_all)
        return await self._database.read(get_or_create_all)

    async def forget(self, subject_id: UUID) -> bool:
        def erase(connection: sqlite3.Connection) -> bool:
            return _erase(connection, subject_id)

        return await self._database.write(erase)

    async def forget_many(self, subject_ids: Sequence[UUID]) -> dict[UUID, bool]:
        """Return what `forget` returns for each subject, in one transaction for all."""

        def erase_all(connection: sqlite3.Connection) -> dict[UUID, bool]:
            return {subject_id: _erase(connection, subject_id) for subject_id in subject_ids}

        return await self._database.write(erase_all)


def _get_or_create(connection: sqlite3.Connection, subject_id: UUID, create: bool) -> bytes | None:
    row = connection.execute(
        "SELECT key FROM subject_keys WHERE subject_id = ?", (str(subject_id),)
    ).fetchone()
    if row is not None:
        return bytes(row[0]) if row[0] is not None else None
    if not create:
        return None
    key = os.urandom(KEY_BYTES)
    connection.execute(
        "INSERT INTO subject_keys (subject_id, key, created_at) VALUES (?, ?, ?)",
        (str(subject_id), key, datetime.now(UTC).isoformat()),
    )
    return key


def _erase(connection: sqlite3.Connection, subject_id: UUID) -> bool:
    now = datetime.now(UTC).isoformat()
    # A row with a NULL key also blocks new keys, so later data of the subject is
    # dropped rather than sealed with a fresh key.
    cursor = connection.execute(
        "INSERT INTO subject_keys (subject_id, key, created_at, erased_at) "
        "VALUES (?, NULL, ?, ?) ON CONFLICT (subject_id) DO UPDATE SET key = NULL, "
        "erased_at = excluded.erased_at WHERE subject_keys.key IS NOT NULL",
        (str(subject_id), now, now),
    )
    return cursor.rowcount > 0
