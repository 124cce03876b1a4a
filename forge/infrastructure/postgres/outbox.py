"""The outbox table in PostgreSQL, and the advisory lock that elects the active relay.

Writers append rows inside their own transaction with `PostgresOutbox.append`. The relay's
leadership is a session-level advisory lock held on a dedicated connection. PostgreSQL releases
it when that connection ends for any reason, including a killed relay process, so a standby
relay blocked on the same lock takes over at once. Every read and write of the active relay
runs on that same connection: once it is gone, the relay can no longer mark anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

import orjson

from forge.core.events.codec import EncodedEvent
from forge.core.events.dead_letters import storable_ids
from forge.core.events.outbox import OutboxRecord
from forge.exceptions import StorageError
from forge.infrastructure.postgres.database import (
    DRIVER_ERRORS,
    PostgresDatabase,
    status_count,
)
from forge.logging import get_logger

logger = get_logger(__name__)

KEY_LOCK_CLASS = 0x464F5247
"""First half of the two-integer advisory lock that a writer holds on a resource key."""

SESSION_QUERY_TIMEOUT_SECONDS = 30.0
"""Maximum wait in seconds for one query of the active relay before it gives up the leadership."""

_PENDING = "published_at IS NULL AND rejected_at IS NULL"


def relay_lock_name(schema: str) -> str:
    """Return the name hashed into the relay's advisory lock for the outbox of `schema`."""
    return f"forge.outbox_relay:{schema}"


class RejectedRow(NamedTuple):
    """An outbox row the relay rejected: its event was never published."""

    id: int
    event_id: Any
    topic: str
    reason: str
    rejected_at: datetime


class PostgresOutbox:
    """`Outbox` on the `outbox` table of a `PostgresDatabase`."""

    def __init__(self, database: PostgresDatabase) -> None:
        self._database = database

    async def append(self, connection: Any, events: Sequence[EncodedEvent]) -> None:
        """Insert outbox rows for `events` inside the caller's open transaction.

        Per resource key, rows get increasing ids in commit order: the writer first takes a
        transaction-level advisory lock on each key, so a second transaction writing the same
        key waits for the first to commit before it draws its ids. The relay sends rows in id
        order, so each resource's events are published in the order they were committed.
        Within one call the keys are locked in sorted order, so two calls cannot deadlock over
        these locks. Transactions that each call this twice, with keys in another order, can.

        Raises:
            StorageError: `connection` is not inside a transaction.
        """
        if not events:
            return
        if not connection.is_in_transaction():
            raise StorageError(
                "PostgresOutbox.append must run inside the transaction of the state change; "
                "call it within PostgresDatabase.transaction()."
            )
        schema = self._database.schema
        for key in sorted({item.key for item in events if item.key is not None}):
            await connection.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                KEY_LOCK_CLASS,
                f"{schema}:{key}",
            )
        await connection.executemany(
            "INSERT INTO outbox (topic, key, value, headers, event_id) "
            "VALUES ($1, $2, $3, $4::jsonb, $5)",
            [
                (
                    item.topic,
                    item.key,
                    item.value,
                    orjson.dumps(item.headers).decode(),
                    item.event.id,
                )
                for item in events
            ],
        )

    async def acquire(self) -> PostgresOutboxSession:
        """Wait until the relay lock of this schema's outbox is free, then take it.

        Raises:
            StorageUnavailableError: the server cannot be reached or the connection was lost.
        """
        name = relay_lock_name(self._database.schema)
        connection = await self._database.connect_dedicated()
        try:
            # The lock lasts as long as the server keeps this connection. Keepalives make the
            # server drop it within about 30 s when the relay's host vanishes without closing
            # it, instead of after the kernel default of two hours, so a standby can take over.
            await connection.execute(
                "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; "
                "SET tcp_keepalives_count = 3; SET statement_timeout = 0"
            )
            acquired = await connection.fetchval(
                "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", name
            )
            if not acquired:
                logger.info("outbox_relay_standby", schema=self._database.schema)
                await connection.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", name)
        except BaseException as error:
            # Ending the connection also cancels a lock wait still queued on the server.
            connection.terminate()
            if isinstance(error, DRIVER_ERRORS):
                raise self._database.translate_error(error) from error
            raise
        return PostgresOutboxSession(self._database, connection)

    async def pending_count(self) -> int:
        count: int = await self._database.fetchval(f"SELECT count(*) FROM outbox WHERE {_PENDING}")
        return count

    async def rejected_count(self) -> int:
        count: int = await self._database.fetchval(
            "SELECT count(*) FROM outbox WHERE rejected_at IS NOT NULL"
        )
        return count

    async def rejected(self, *, limit: int = 100) -> list[RejectedRow]:
        """Return rejected rows with the reason, oldest first."""
        rows = await self._database.fetch(
            "SELECT id, event_id, topic, last_error, rejected_at FROM outbox "
            "WHERE rejected_at IS NOT NULL ORDER BY id LIMIT $1",
            min(limit, 2**63 - 1),
        )
        return [
            RejectedRow(
                row["id"],
                row["event_id"],
                row["topic"],
                row["last_error"] or "",
                row["rejected_at"],
            )
            for row in rows
        ]

    async def requeue_rejected(self, ids: Sequence[int] | None = None) -> int:
        if ids is not None:
            # Row ids are 64-bit integers, and a larger one would fail in the driver.
            ids = storable_ids(ids)
            if not ids:
                return 0
        sql = "UPDATE outbox SET rejected_at = NULL WHERE rejected_at IS NOT NULL"
        if ids is None:
            status = await self._database.execute(sql)
        else:
            status = await self._database.execute(f"{sql} AND id = ANY($1::bigint[])", list(ids))
        return status_count(status)

    async def records(self, *, limit: int = 1000) -> list[OutboxRecord]:
        """Return every row, pending or not, in id order (for tools and tests)."""
        rows = await self._database.fetch(
            "SELECT id, topic, key, value, headers, event_id, created_at FROM outbox "
            "ORDER BY id LIMIT $1",
            limit,
        )
        return [_row_to_record(row) for row in rows]


class PostgresOutboxSession:
    """The active relay's hold on the outbox: one connection holding the advisory lock."""

    def __init__(self, database: PostgresDatabase, connection: Any) -> None:
        self._database = database
        self._connection = connection

    @property
    def is_alive(self) -> bool:
        return not self._connection.is_closed()

    async def fetch_pending(self, limit: int) -> list[OutboxRecord]:
        rows = await self._run(
            "fetch",
            "SELECT id, topic, key, value, headers, event_id, created_at FROM outbox "
            f"WHERE {_PENDING} ORDER BY id LIMIT $1",
            limit,
        )
        return [_row_to_record(row) for row in rows]

    async def mark_published(self, ids: Sequence[int]) -> None:
        if ids:
            await self._run(
                "execute",
                "UPDATE outbox SET published_at = now() "
                "WHERE id = ANY($1::bigint[]) AND published_at IS NULL",
                list(ids),
            )

    async def reject(self, record_id: int, reason: str) -> None:
        await self._run(
            "execute",
            "UPDATE outbox SET rejected_at = now(), last_error = $2 WHERE id = $1",
            record_id,
            reason,
        )

    async def delete_published(self, before: datetime) -> int:
        status = await self._run("execute", "DELETE FROM outbox WHERE published_at < $1", before)
        return status_count(status)

    async def close(self) -> None:
        """Close the connection, which releases the advisory lock; idempotent."""
        if self._connection.is_closed():
            return
        try:
            await self._connection.close(timeout=5)
        except DRIVER_ERRORS:
            self._connection.terminate()

    async def _run(self, method: str, sql: str, *args: Any) -> Any:
        # The timeout ends the leadership of a relay whose connection hangs, for example
        # behind a network partition, instead of blocking it forever.
        try:
            return await getattr(self._connection, method)(
                sql, *args, timeout=SESSION_QUERY_TIMEOUT_SECONDS
            )
        except DRIVER_ERRORS as error:
            raise self._database.translate_error(error) from error


def _row_to_record(row: Any) -> OutboxRecord:
    return OutboxRecord(
        id=row["id"],
        topic=row["topic"],
        key=row["key"],
        value=bytes(row["value"]),
        headers={str(name): str(value) for name, value in orjson.loads(row["headers"]).items()},
        event_id=UUID(str(row["event_id"])),
        created_at=row["created_at"],
    )
