"""PostgresDeadLetterStore: park, list, retry, claim and resolve, as the port defines them."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from forge.config import ForgeSettings
from forge.core.events.dead_letters import DeadLetter, DeadLetterStatus
from forge.core.events.dispatch import RetryPolicy
from forge.infrastructure.postgres.database import PostgresDatabase
from forge.infrastructure.postgres.dead_letters import PostgresDeadLetterStore
from forge.infrastructure.sqlite.consumer import SqliteEventConsumer
from forge.infrastructure.sqlite.database import SqliteDatabase
from forge.infrastructure.sqlite.event_log import SqliteEventLog
from forge.models.events import CapsuleCreatedEvent, Event, EventType

pytestmark = pytest.mark.postgres


@pytest.fixture
def store(database: PostgresDatabase) -> PostgresDeadLetterStore:
    return PostgresDeadLetterStore(database)


def letter(offset: int, *, group_id: str = "group-a", handler: str = "mod.handle") -> DeadLetter:
    return DeadLetter(
        group_id=group_id,
        topic="forge.capsule.created",
        partition=0,
        offset=offset,
        key=str(uuid.uuid4()),
        value=b'{"not": "json"\xff',
        headers={"event_id": f"id-{offset}", "event_type": "capsule.created"},
        reason=f"failure {offset}",
        error_type="ValueError",
        handler=handler,
        attempts=3,
        event_id=f"id-{offset}",
        event_type="capsule.created",
    )


async def test_extra_kept_then_replaced(store: PostgresDeadLetterStore) -> None:
    await store.park([replace(letter(0), extra={"shard": "3", "host": "worker-b"})])
    [first] = await store.list()
    # Like the reason, `extra` describes the latest failure of the record.
    await store.park([replace(letter(0), reason="again", extra={"shard": "4"})])
    [second] = await store.list()

    assert dict(first.extra) == {"shard": "3", "host": "worker-b"}
    assert (second.reason, dict(second.extra)) == ("again", {"shard": "4"})


async def test_park_and_list_round_trip(store: PostgresDeadLetterStore) -> None:
    parked = [letter(0), letter(1, group_id="group-b")]

    await store.park(parked)
    listed = await store.list()

    assert len(listed) == 2
    for original, stored in zip(parked, listed, strict=True):
        assert stored.id is not None
        assert stored.parked_at is not None
        assert stored.status is DeadLetterStatus.PARKED
        assert (stored.group_id, stored.topic, stored.partition, stored.offset) == (
            original.group_id,
            original.topic,
            original.partition,
            original.offset,
        )
        assert stored.value == original.value
        assert dict(stored.headers) == dict(original.headers)
        assert (stored.reason, stored.error_type, stored.handler, stored.attempts) == (
            original.reason,
            original.error_type,
            original.handler,
            original.attempts,
        )


async def test_parking_same_record_again_updates_it(store: PostgresDeadLetterStore) -> None:
    await store.park([letter(0)])
    again = replace(letter(0), reason="new", attempts=5)

    await store.park([again])
    listed = await store.list()

    assert len(listed) == 1
    assert listed[0].reason == "new"
    assert listed[0].attempts == 5


async def test_parking_same_record_for_other_handler_adds_letter(
    store: PostgresDeadLetterStore,
) -> None:
    await store.park([letter(0), letter(0, handler="mod.other")])

    assert len(await store.list()) == 2


async def test_list_filters_by_group_status_and_limit(store: PostgresDeadLetterStore) -> None:
    await store.park([letter(i) for i in range(4)] + [letter(9, group_id="group-b")])
    first = (await store.list(group_id="group-a"))[0]
    await store.request_retry([first.id])  # type: ignore[list-item]

    group_a = await store.list(group_id="group-a")
    parked = await store.list(group_id="group-a", status=DeadLetterStatus.PARKED)
    retrying = await store.list(status=DeadLetterStatus.RETRY_REQUESTED)
    limited = await store.list(limit=2)

    assert len(group_a) == 4
    assert [item.offset for item in parked] == [1, 2, 3]
    assert [item.id for item in retrying] == [first.id]
    assert len(limited) == 2


async def test_request_retry_by_ids_group_or_all(store: PostgresDeadLetterStore) -> None:
    await store.park([letter(i) for i in range(3)] + [letter(9, group_id="group-b")])
    ids = [item.id for item in await store.list() if item.id is not None]

    assert await store.request_retry([]) == 0
    assert await store.request_retry([ids[0]]) == 1
    assert await store.request_retry([ids[0]]) == 0
    assert await store.request_retry(group_id="group-b") == 1
    assert await store.request_retry() == 2
    assert await store.list(status=DeadLetterStatus.PARKED) == []


async def test_claim_retries_leases_letters(database: PostgresDatabase) -> None:
    store = PostgresDeadLetterStore(database, claim_seconds=0.3)
    await store.park([letter(0), letter(1), letter(2, group_id="group-b")])
    await store.request_retry()

    claimed = await store.claim_retries("group-a")
    claimed_again = await store.claim_retries("group-a")
    await asyncio.sleep(0.4)
    after_lease = await store.claim_retries("group-a", limit=1)

    assert [item.offset for item in claimed] == [0, 1]
    assert claimed_again == []
    assert [item.offset for item in after_lease] == [0]


async def test_concurrent_claims_share_no_letter(store: PostgresDeadLetterStore) -> None:
    await store.park([letter(i) for i in range(20)])
    await store.request_retry()

    claims = await asyncio.gather(*(store.claim_retries("group-a", limit=7) for _ in range(4)))

    claimed_ids = [item.id for claim in claims for item in claim]
    assert len(claimed_ids) == 20
    assert len(set(claimed_ids)) == 20


async def test_mark_resolved_and_parked_again(store: PostgresDeadLetterStore) -> None:
    await store.park([letter(0), letter(1)])
    await store.request_retry()
    first, second = await store.claim_retries("group-a")

    await store.mark_resolved(first.id)  # type: ignore[arg-type]
    await store.mark_parked(second.id, "still failing", "KeyError", 2)  # type: ignore[arg-type]
    resolved, parked = await store.list()

    assert resolved.status is DeadLetterStatus.RESOLVED
    assert parked.status is DeadLetterStatus.PARKED
    assert parked.reason == "still failing"
    assert parked.error_type == "KeyError"
    assert parked.attempts == 5
    assert await store.claim_retries("group-a") == []


async def test_consumer_parks_and_redelivers_through_store(
    store: PostgresDeadLetterStore, tmp_path: Path
) -> None:
    failing = True
    handled: list[Event[Any]] = []

    async def handle(event: Event[Any]) -> None:
        if failing:
            raise RuntimeError("downstream is down")
        handled.append(event)

    async with SqliteDatabase(tmp_path / "log.sqlite3") as sqlite_database:
        log = SqliteEventLog(sqlite_database)
        await log.start()
        event = CapsuleCreatedEvent.create(uuid.uuid4(), uuid.uuid4(), "note")
        await log.publish(event)
        consumer = SqliteEventConsumer(
            sqlite_database,
            "group-a",
            settings=ForgeSettings(data_dir=tmp_path),
            dead_letters=store,
            retry_policy=RetryPolicy(max_attempts=2, initial_backoff_seconds=0.01),
        )
        consumer.register_handler(EventType.CAPSULE_CREATED, handle, name="handle")
        await consumer.start()
        try:
            await consumer.drain()
            parked = await store.list(group_id="group-a")

            failing = False
            assert await store.request_retry(group_id="group-a") == 1
            await consumer.drain()
        finally:
            await consumer.stop()

    assert len(parked) == 1
    assert parked[0].reason == "downstream is down"
    assert parked[0].event_id == str(event.id)
    assert parked[0].attempts == 2
    assert handled == [event]
    assert [item.status for item in await store.list()] == [DeadLetterStatus.RESOLVED]
