"""PostgresInbox: a redelivered event is skipped, so the handler's effect happens exactly once."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from forge.config import ForgeSettings
from forge.core.events.dispatch import RetryPolicy
from forge.core.events.inbox import Inbox, effectively_once
from forge.infrastructure.postgres.database import PostgresDatabase
from forge.infrastructure.postgres.inbox import PostgresInbox
from forge.infrastructure.sqlite.consumer import SqliteEventConsumer
from forge.infrastructure.sqlite.database import SqliteDatabase
from forge.infrastructure.sqlite.event_log import SqliteEventLog
from forge.models.base import utc_now
from forge.models.events import CapsuleCreatedEvent, Event, EventType

pytestmark = pytest.mark.postgres

GROUP = "capsule-counter"


@pytest.fixture
async def inbox(database: PostgresDatabase) -> PostgresInbox:
    await database.execute("CREATE TABLE counters (name text PRIMARY KEY, value bigint NOT NULL)")
    return PostgresInbox(database)


async def count_capsule(event: Event[Any], connection: Any) -> None:
    """Example handler: its effect is a counter in the same database as the inbox."""
    await connection.execute(
        "INSERT INTO counters (name, value) VALUES ($1, 1) "
        "ON CONFLICT (name) DO UPDATE SET value = counters.value + 1",
        event.type.value,
    )


async def counter(database: PostgresDatabase, name: str = "capsule.created") -> int:
    value = await database.fetchval("SELECT value FROM counters WHERE name = $1", name)
    return int(value or 0)


def new_event() -> CapsuleCreatedEvent:
    return CapsuleCreatedEvent.create(uuid.uuid4(), uuid.uuid4(), "note")


async def test_inbox_satisfies_port(inbox: PostgresInbox) -> None:
    assert isinstance(inbox, Inbox)


async def test_claim_yields_transaction_once(inbox: PostgresInbox) -> None:
    event = new_event()

    async with inbox.claim(GROUP, event) as first:
        assert first is not None
    async with inbox.claim(GROUP, event) as second:
        assert second is None

    assert await inbox.is_handled(GROUP, event.id)


async def test_redelivered_event_counts_once(
    inbox: PostgresInbox, database: PostgresDatabase
) -> None:
    handle = effectively_once(inbox, GROUP, count_capsule)
    event = new_event()

    for _ in range(3):
        await handle(event)

    assert await counter(database) == 1


async def test_concurrent_deliveries_count_once(
    inbox: PostgresInbox, database: PostgresDatabase
) -> None:
    handle = effectively_once(inbox, GROUP, count_capsule)
    events = [new_event() for _ in range(10)]

    await asyncio.gather(*(handle(event) for event in events for _ in range(4)))

    assert await counter(database) == 10


async def test_failed_handler_is_retried_once(
    inbox: PostgresInbox, database: PostgresDatabase
) -> None:
    attempts = 0

    async def flaky(event: Event[Any], connection: Any) -> None:
        nonlocal attempts
        attempts += 1
        await count_capsule(event, connection)
        if attempts == 1:
            raise RuntimeError("crash after the write")

    handle = effectively_once(inbox, GROUP, flaky)
    event = new_event()

    with pytest.raises(RuntimeError, match="crash after the write"):
        await handle(event)
    handled_after_failure = await inbox.is_handled(GROUP, event.id)
    await handle(event)
    await handle(event)

    assert not handled_after_failure
    assert attempts == 2
    assert await counter(database) == 1


async def test_each_group_handles_event_once(
    inbox: PostgresInbox, database: PostgresDatabase
) -> None:
    event = new_event()

    for group in ("group-a", "group-b", "group-a"):
        await effectively_once(inbox, group, count_capsule)(event)

    assert await counter(database) == 2


async def test_wrapper_keeps_handler_name(inbox: PostgresInbox) -> None:
    handle = effectively_once(inbox, GROUP, count_capsule)

    assert handle.__qualname__ == count_capsule.__qualname__
    assert handle.__module__ == count_capsule.__module__


async def test_delete_handled_before_forgets_old_records(inbox: PostgresInbox) -> None:
    old, recent = new_event(), new_event()
    async with inbox.claim(GROUP, old):
        pass
    cutoff = utc_now()
    async with inbox.claim(GROUP, recent):
        pass

    deleted = await inbox.delete_handled_before(cutoff)

    assert deleted == 1
    assert not await inbox.is_handled(GROUP, old.id)
    assert await inbox.is_handled(GROUP, recent.id)


async def test_consumer_redelivery_has_one_effect(
    inbox: PostgresInbox, database: PostgresDatabase, tmp_path: Path
) -> None:
    event = new_event()
    async with SqliteDatabase(tmp_path / "log.sqlite3") as sqlite_database:
        log = SqliteEventLog(sqlite_database)
        await log.start()
        # The same event appended twice is what a consumer receives after a relay re-sent it.
        await log.publish(event)
        await log.publish(event)
        await log.publish(new_event())
        consumer = SqliteEventConsumer(
            sqlite_database,
            GROUP,
            settings=ForgeSettings(data_dir=tmp_path),
            retry_policy=RetryPolicy(max_attempts=1),
        )
        consumer.register_handler(
            EventType.CAPSULE_CREATED, effectively_once(inbox, GROUP, count_capsule)
        )
        await consumer.start()
        try:
            handled = await consumer.drain()
        finally:
            await consumer.stop()

    assert handled == 3
    assert await counter(database) == 2
