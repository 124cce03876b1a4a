"""PostgresAuditStore: append-only, idempotent by event id, queryable like the SQLite store."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from forge.core.audit.recorder import AuditRecorder
from forge.core.audit.store import AuditQuery
from forge.exceptions import EventRejectedError, EventValidationError, StorageError
from forge.infrastructure.postgres.audit_store import PostgresAuditStore
from forge.infrastructure.postgres.database import PostgresDatabase
from forge.models.events import (
    CapsuleCreatedEvent,
    CapsuleDeletedEvent,
    CapsuleUpdatedEvent,
    Event,
    EventType,
)

pytestmark = pytest.mark.postgres

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(database: PostgresDatabase) -> PostgresAuditStore:
    return PostgresAuditStore(database)


def at(event: Event[Any], moment: datetime) -> Event[Any]:
    return event.model_copy(update={"timestamp": moment})


def created(capsule_id: uuid.UUID, owner: uuid.UUID, moment: datetime) -> Event[Any]:
    return at(CapsuleCreatedEvent.create(capsule_id, owner, "note"), moment)


def updated(capsule_id: uuid.UUID, actor: uuid.UUID, moment: datetime, n: int = 1) -> Event[Any]:
    return at(CapsuleUpdatedEvent.create(capsule_id, actor, str(n), str(n + 1), ["title"]), moment)


async def test_record_is_idempotent(store: PostgresAuditStore) -> None:
    events = [created(uuid.uuid4(), uuid.uuid4(), START + timedelta(seconds=i)) for i in range(3)]

    first = await store.record(events)
    again = await store.record(events)
    partly_new = await store.record([*events[:2], created(uuid.uuid4(), uuid.uuid4(), START)])

    assert first == 3
    assert again == 0
    assert partly_new == 1
    assert await store.count() == 4


async def test_record_of_empty_batch_stores_nothing(store: PostgresAuditStore) -> None:
    assert await store.record([]) == 0
    assert await store.count() == 0


async def test_same_id_with_other_content_is_rejected(store: PostgresAuditStore) -> None:
    original = created(uuid.uuid4(), uuid.uuid4(), START)
    await store.record([original])
    forged = original.model_copy(update={"actor_id": uuid.uuid4()})
    other = created(uuid.uuid4(), uuid.uuid4(), START)

    with pytest.raises(EventRejectedError, match=f"Event id {original.id} is already in"):
        await store.record([other, forged])

    assert await store.count() == 1
    stored = await store.events_for_resource(original.resource_id)  # type: ignore[arg-type]
    assert stored == [original]


async def test_changed_duplicate_in_batch_rejected(
    store: PostgresAuditStore,
) -> None:
    original = created(uuid.uuid4(), uuid.uuid4(), START)
    forged = original.model_copy(update={"actor_id": uuid.uuid4()})

    with pytest.raises(EventRejectedError):
        await store.record([original, forged])

    assert await store.count() == 0


async def test_concurrent_recorders_keep_one_row_per_event(store: PostgresAuditStore) -> None:
    events = [created(uuid.uuid4(), uuid.uuid4(), START + timedelta(seconds=i)) for i in range(50)]

    new_counts = await asyncio.gather(*(store.record(events) for _ in range(4)))

    assert sum(new_counts) == 50
    assert await store.count() == 50


async def test_audit_recorder_redelivery_records_once(store: PostgresAuditStore) -> None:
    recorder = AuditRecorder(store)
    events = [created(uuid.uuid4(), uuid.uuid4(), START + timedelta(seconds=i)) for i in range(5)]

    await recorder.record(events)
    await recorder.record(events)
    await recorder.record(events[2:])

    assert recorder.recorded == 5
    assert await store.count() == 5


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_trail SET actor_type = 'system'",
        "DELETE FROM audit_trail",
        "TRUNCATE audit_trail",
    ],
)
async def test_trail_is_append_only(
    store: PostgresAuditStore, database: PostgresDatabase, statement: str
) -> None:
    await store.record([created(uuid.uuid4(), uuid.uuid4(), START)])

    with pytest.raises(StorageError, match="the audit trail is append-only"):
        await database.execute(statement)

    assert await store.count() == 1


async def test_query_filters_each_field(store: PostgresAuditStore) -> None:
    capsule, other_capsule = uuid.uuid4(), uuid.uuid4()
    owner, editor = uuid.uuid4(), uuid.uuid4()
    correlation = uuid.uuid4()
    first = created(capsule, owner, START)
    second = updated(capsule, editor, START + timedelta(seconds=1)).model_copy(
        update={"correlation_id": correlation}
    )
    third = created(other_capsule, editor, START + timedelta(seconds=2))
    await store.record([first, second, third])

    def ids(page_entries: list[Any]) -> list[uuid.UUID]:
        return [entry.event.id for entry in page_entries]

    by_resource = await store.query(AuditQuery(resource_id=capsule))
    by_actor = await store.query(AuditQuery(actor_id=editor))
    by_type = await store.query(AuditQuery(event_type=EventType.CAPSULE_CREATED))
    by_correlation = await store.query(AuditQuery(correlation_id=correlation))
    combined = await store.query(AuditQuery(actor_id=editor, event_type=EventType.CAPSULE_UPDATED))

    assert ids(by_resource.entries) == [second.id, first.id]
    assert ids(by_actor.entries) == [third.id, second.id]
    assert ids(by_type.entries) == [third.id, first.id]
    assert ids(by_correlation.entries) == [second.id]
    assert ids(combined.entries) == [second.id]
    assert by_resource.next_cursor is None


async def test_query_returns_typed_events_and_recorded_at(store: PostgresAuditStore) -> None:
    event = created(uuid.uuid4(), uuid.uuid4(), START)
    before = datetime.now(UTC)
    await store.record([event])

    page = await store.query(AuditQuery())

    assert len(page.entries) == 1
    assert isinstance(page.entries[0].event, CapsuleCreatedEvent)
    assert page.entries[0].event == event
    assert page.entries[0].recorded_at >= before - timedelta(seconds=5)


async def test_query_time_range_is_inclusive(store: PostgresAuditStore) -> None:
    capsule, owner = uuid.uuid4(), uuid.uuid4()
    events = [updated(capsule, owner, START + timedelta(minutes=i), i) for i in range(5)]
    await store.record(events)

    page = await store.query(
        AuditQuery(since=START + timedelta(minutes=1), until=START + timedelta(minutes=3))
    )

    assert [entry.event.id for entry in page.entries] == [events[3].id, events[2].id, events[1].id]


async def test_pagination_visits_each_event_once(
    store: PostgresAuditStore,
) -> None:
    capsule, owner = uuid.uuid4(), uuid.uuid4()
    # Several events share a timestamp, so the cursor must break ties by insertion order.
    events = [updated(capsule, owner, START + timedelta(microseconds=i // 3), i) for i in range(25)]
    await store.record(events)

    seen: list[uuid.UUID] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await store.query(AuditQuery(resource_id=capsule, limit=4, cursor=cursor))
        seen.extend(entry.event.id for entry in page.entries)
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break

    assert pages == 7
    assert seen == [event.id for event in reversed(events)]


async def test_invalid_cursor_is_rejected(store: PostgresAuditStore) -> None:
    with pytest.raises(EventValidationError, match="Invalid audit cursor 'not-a-cursor'"):
        await store.query(AuditQuery(cursor="not-a-cursor"))


async def test_events_for_resource_oldest_first(store: PostgresAuditStore) -> None:
    capsule, owner = uuid.uuid4(), uuid.uuid4()
    first = created(capsule, owner, START)
    second = updated(capsule, owner, START + timedelta(seconds=10))
    third = at(CapsuleDeletedEvent.create(capsule, owner), START + timedelta(seconds=20))
    await store.record([third, first, second, created(uuid.uuid4(), owner, START)])

    everything = await store.events_for_resource(capsule)
    until_second = await store.events_for_resource(capsule, until=START + timedelta(seconds=10))

    assert everything == [first, second, third]
    assert until_second == [first, second]
