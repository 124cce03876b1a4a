"""The inbox table in PostgreSQL: which events each consumer group has handled."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any
from uuid import UUID

from forge.infrastructure.postgres.database import PostgresDatabase, status_count
from forge.models.events import Event


class PostgresInbox:
    """`Inbox` on the `inbox` table; the transaction it yields is an asyncpg connection.

    Two members handling the same event at once cannot both run the handler. The second
    member's insert of the same (group, event id) waits for the first transaction. It then
    finds the row and skips the event, unless the first rolled back, in which case it claims
    the event itself.
    """

    def __init__(self, database: PostgresDatabase) -> None:
        self._database = database

    @asynccontextmanager
    async def claim(self, group_id: str, event: Event[Any]) -> AsyncIterator[Any | None]:
        """Open a transaction recording `event` as handled by `group_id`; see `Inbox.claim`.

        Raises:
            StorageUnavailableError: the server is unreachable; the event was not recorded
                unless the connection broke during the commit.
        """
        async with self._database.transaction() as connection:
            claimed = await connection.fetchval(
                "INSERT INTO inbox (group_id, event_id, event_type) VALUES ($1, $2, $3) "
                "ON CONFLICT (group_id, event_id) DO NOTHING RETURNING true",
                group_id,
                event.id,
                event.type.value,
            )
            yield connection if claimed else None

    async def is_handled(self, group_id: str, event_id: UUID) -> bool:
        found = await self._database.fetchval(
            "SELECT true FROM inbox WHERE group_id = $1 AND event_id = $2", group_id, event_id
        )
        return bool(found)

    async def delete_handled_before(self, before: datetime) -> int:
        """Forget events handled before `before`; return how many records were deleted.

        A forgotten event that is delivered again is handled again, so keep records at least
        as long as the event log keeps events (Kafka's topic retention).
        """
        status = await self._database.execute("DELETE FROM inbox WHERE handled_at < $1", before)
        return status_count(status)
