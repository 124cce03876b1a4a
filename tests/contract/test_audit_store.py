"""Contract of the audit trail: idempotent recording, filtered queries and stable pages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

import pytest

from forge.core.audit.store import AuditQuery
from forge.exceptions import EventRejectedError, EventValidationError
from forge.models.events import (
    CapsuleCreatedEvent,
    CapsuleDeletedEvent,
    CapsuleUpdatedEvent,
    Event,
    EventType,
    parse_event,
)
from tests.helpers import at, capsule_created, vote_cast

T0 = datetime(2025, 5, 1, 9, 0, tzinfo=UTC)


class History:
    """Four events of two resources by two actors, one minute apart, with known ids."""

    def __init__(self) -> None:
        self.capsule, self.vote = uuid4(), uuid4()
        self.ada, self.bob = uuid4(), uuid4()
        self.request_1, self.request_2 = uuid4(), uuid4()
        self.events: dict[str, Event[Any]] = {
            "created": at(
                CapsuleCreatedEvent.create(
                    self.capsule, self.ada, "knowledge", correlation_id=self.request_1
                ),
                T0,
            ),
            "updated": at(
                CapsuleUpdatedEvent.create(
                    self.capsule,
                    self.bob,
                    "1",
                    "2",
                    ["title"],
                    self.request_1,
                    changes={"title": "Offsets"},
                ),
                T0 + timedelta(minutes=1),
            ),
            "voted": at(
                vote_cast().model_copy(
                    update={
                        "resource_id": self.vote,
                        "actor_id": self.ada,
                        "correlation_id": self.request_2,
                    }
                ),
                T0 + timedelta(minutes=2),
            ),
            "deleted": at(
                CapsuleDeletedEvent.create(self.capsule, self.ada, version="2"),
                T0 + timedelta(minutes=3),
            ),
        }

    def names(self, events: list[Event[Any]]) -> list[str]:
        by_id = {event.id: name for name, event in self.events.items()}
        return [by_id[event.id] for event in events]


@pytest.fixture
async def history(backend: Any) -> History:
    recorded = History()
    await backend.audit_store.record(list(recorded.events.values()))
    return recorded


async def test_recording_returns_new_count(backend: Any) -> None:
    events = [capsule_created(), vote_cast()]

    assert await backend.audit_store.record(events) == 2


async def test_recording_twice_keeps_one(backend: Any) -> None:
    event = capsule_created()
    await backend.audit_store.record([event])

    again = await backend.audit_store.record([event])

    assert again == 0
    assert await backend.audit_store.count() == 1


async def test_reparsed_event_counts_as_same(backend: Any) -> None:
    event = capsule_created(metadata={"source": "api", "tags": ["a", "b"]})
    await backend.audit_store.record([event])

    assert await backend.audit_store.record([parse_event(event.to_json())]) == 0


async def test_reused_id_with_other_content_rejected(backend: Any) -> None:
    original = capsule_created()
    await backend.audit_store.record([original])
    forged = parse_event({**original.to_dict(), "actor_id": str(uuid4())})

    with pytest.raises(EventRejectedError) as caught:
        await backend.audit_store.record([forged])

    assert str(caught.value).startswith(
        f"Event id {original.id} is already in the audit trail with different content"
    )


async def test_rejected_batch_keeps_stored_event(backend: Any) -> None:
    original = capsule_created()
    await backend.audit_store.record([original])
    forged = parse_event({**original.to_dict(), "actor_id": str(uuid4())})
    newcomer = vote_cast()

    with pytest.raises(EventRejectedError):
        await backend.audit_store.record([newcomer, forged])

    page = await backend.audit_store.query(AuditQuery())
    assert [entry.event for entry in page.entries] == [original]


QUERIES = {
    "everything": ({}, ["deleted", "voted", "updated", "created"]),
    "resource": (lambda h: {"resource_id": h.capsule}, ["deleted", "updated", "created"]),
    "actor": (lambda h: {"actor_id": h.ada}, ["deleted", "voted", "created"]),
    "type": ({"event_type": EventType.VOTE_CAST}, ["voted"]),
    "correlation": (lambda h: {"correlation_id": h.request_1}, ["updated", "created"]),
    "since": ({"since": T0 + timedelta(minutes=2)}, ["deleted", "voted"]),
    "until": ({"until": T0 + timedelta(minutes=1)}, ["updated", "created"]),
    "time_range": (
        {"since": T0 + timedelta(minutes=1), "until": T0 + timedelta(minutes=2)},
        ["voted", "updated"],
    ),
    "resource_and_actor": (
        lambda h: {"resource_id": h.capsule, "actor_id": h.ada},
        ["deleted", "created"],
    ),
    "no_match": (lambda h: {"actor_id": UUID(int=7)}, []),
}


@pytest.mark.parametrize("case", sorted(QUERIES))
async def test_query_filters_newest_first(backend: Any, history: History, case: str) -> None:
    filters, expected = QUERIES[case]
    if callable(filters):
        filters = filters(history)

    page = await backend.audit_store.query(AuditQuery(**filters))

    assert history.names([entry.event for entry in page.entries]) == expected


async def test_query_accepts_other_time_zone(backend: Any, history: History) -> None:
    two_minutes_in = (T0 + timedelta(minutes=2)).astimezone(ZoneInfo("America/New_York"))

    page = await backend.audit_store.query(AuditQuery(since=two_minutes_in))

    assert history.names([entry.event for entry in page.entries]) == ["deleted", "voted"]


async def test_entries_are_typed_events(backend: Any, history: History) -> None:
    page = await backend.audit_store.query(AuditQuery(event_type=EventType.CAPSULE_UPDATED))

    assert page.entries[0].event == history.events["updated"]
    assert type(page.entries[0].event) is CapsuleUpdatedEvent


async def test_pages_cover_every_entry_once(backend: Any) -> None:
    same_moment = T0 + timedelta(hours=1)
    events = [at(vote_cast(), T0 + timedelta(seconds=i)) for i in range(20)]
    events += [at(vote_cast(), same_moment) for _ in range(5)]
    await backend.audit_store.record(events)

    seen: list[UUID] = []
    sizes: list[int] = []
    cursor: str | None = None
    while True:
        page = await backend.audit_store.query(AuditQuery(limit=10, cursor=cursor))
        seen += [entry.event.id for entry in page.entries]
        sizes.append(len(page.entries))
        cursor = page.next_cursor
        if cursor is None:
            break

    assert sizes == [10, 10, 5]
    assert sorted(map(str, seen)) == sorted(str(event.id) for event in events)
    assert len(set(seen)) == len(seen)


async def test_pages_are_newest_first(backend: Any) -> None:
    events = [at(vote_cast(), T0 + timedelta(seconds=i)) for i in range(7)]
    await backend.audit_store.record(events)

    first = await backend.audit_store.query(AuditQuery(limit=4))
    second = await backend.audit_store.query(AuditQuery(limit=4, cursor=first.next_cursor))

    timestamps = [entry.event.timestamp for entry in first.entries + second.entries]
    assert timestamps == sorted(timestamps, reverse=True)
    assert second.next_cursor is None


async def test_full_last_page_has_no_cursor(backend: Any) -> None:
    await backend.audit_store.record([vote_cast() for _ in range(4)])

    page = await backend.audit_store.query(AuditQuery(limit=4))

    assert page.next_cursor is None


async def test_cursor_pages_filtered_query(backend: Any) -> None:
    capsule_id = uuid4()
    mine = [at(capsule_created(capsule_id), T0 + timedelta(seconds=i)) for i in range(3)]
    others = [at(capsule_created(), T0 + timedelta(seconds=i)) for i in range(3)]
    await backend.audit_store.record(mine + others)

    first = await backend.audit_store.query(AuditQuery(resource_id=capsule_id, limit=2))
    second = await backend.audit_store.query(
        AuditQuery(resource_id=capsule_id, limit=2, cursor=first.next_cursor)
    )

    assert [entry.event.id for entry in first.entries + second.entries] == [
        event.id for event in reversed(mine)
    ]


# base64 of "9223372036854775807:1" and "253402300800000000:5": 64-bit integers, but times
# after the year 9999; and "1:99999999999999999999", a sequence beyond 64 bits.
OUT_OF_RANGE_CURSORS = [
    "OTIyMzM3MjAzNjg1NDc3NTgwNzox",
    "MjUzNDAyMzAwODAwMDAwMDAwOjU",
    "MTo5OTk5OTk5OTk5OTk5OTk5OTk5OQ",
]


@pytest.mark.parametrize("cursor", ["not-a-cursor", "", "MTox:x", "%%%", *OUT_OF_RANGE_CURSORS])
async def test_invalid_cursor_rejected(backend: Any, cursor: str) -> None:
    with pytest.raises(EventValidationError) as caught:
        await backend.audit_store.query(AuditQuery(cursor=cursor))

    assert str(caught.value) == (
        f"Invalid audit cursor {cursor!r}; pass the next_cursor of a previous page."
    )


async def test_resource_events_oldest_first(backend: Any, history: History) -> None:
    events = await backend.audit_store.events_for_resource(history.capsule)

    assert history.names(events) == ["created", "updated", "deleted"]


async def test_resource_events_until_moment(backend: Any, history: History) -> None:
    events = await backend.audit_store.events_for_resource(
        history.capsule, until=T0 + timedelta(minutes=1)
    )

    assert history.names(events) == ["created", "updated"]


async def test_recorder_consumer_fills_trail(backend: Any) -> None:
    published = [capsule_created(), vote_cast(), capsule_created()]
    for event in published:
        await backend.publisher.publish(event)
    consumer, recorder = backend.make_audit_consumer()

    await consumer.start()
    await consumer.drain()

    page = await backend.audit_store.query(AuditQuery())
    assert {entry.event.id for entry in page.entries} == {event.id for event in published}
    assert recorder.recorded == 3


async def test_recorder_ignores_redelivered_events(backend: Any) -> None:
    event = capsule_created()
    await backend.audit_store.record([event])
    await backend.publisher.publish(event)
    consumer, recorder = backend.make_audit_consumer()

    await consumer.start()
    await consumer.drain()

    assert recorder.recorded == 0
    assert await backend.audit_store.count() == 1


async def test_nul_in_resource_type_recorded(backend: Any) -> None:
    # PostgreSQL's text cannot hold NUL: its store escapes the column, and the event itself
    # is kept exactly in its JSON.
    event = capsule_created().model_copy(update={"resource_type": "job\x00x"})

    assert await backend.audit_store.record([event]) == 1

    page = await backend.audit_store.query(AuditQuery(resource_id=event.resource_id))
    assert [entry.event for entry in page.entries] == [event]
