"""Contract of the publisher and consumer ports: delivery, order, groups and positions."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any
from uuid import uuid4

import pytest

from forge.exceptions import EventValidationError
from forge.models.events import (
    CapsuleCreatedEvent,
    CapsuleDeletedEvent,
    CapsuleUpdatedEvent,
    Event,
    EventType,
    OverlayInvokedEvent,
    VoteCastEvent,
)
from tests.helpers import (
    WAIT_TIMEOUT_SECONDS,
    BatchRecorder,
    Recorder,
    capsule_created,
    capsule_updated,
    running,
    vote_cast,
    wait_until,
)

CAPSULE_TYPES = [EventType.CAPSULE_CREATED, EventType.CAPSULE_UPDATED, EventType.CAPSULE_DELETED]


def capsule_history() -> list[Event[Any]]:
    """Return the events of two capsules, interleaved: created, two updates, deleted."""
    first, second = uuid4(), uuid4()
    events: list[Event[Any]] = []
    for capsule_id in (first, second):
        events.append(capsule_created(capsule_id))
    for version in (1, 2):
        for capsule_id in (first, second):
            events.append(capsule_updated(capsule_id, version, f"title v{version + 1}"))
    for capsule_id in (first, second):
        events.append(CapsuleDeletedEvent.create(capsule_id, uuid4(), version="3"))
    return events


def subscribe(consumer: Any, handler: Any, types: list[EventType] = CAPSULE_TYPES) -> None:
    for event_type in types:
        consumer.register_handler(event_type, handler)


async def test_consumer_gets_every_event_once(backend: Any) -> None:
    published = capsule_history()
    for event in published:
        await backend.publisher.publish(event)
    consumer = backend.make_consumer("projector")
    recorder = Recorder()
    subscribe(consumer, recorder)

    await consumer.start()
    await consumer.drain()

    assert sorted(map(str, recorder.ids)) == sorted(str(event.id) for event in published)
    assert len(recorder.ids) == len(published)


async def test_consumer_keeps_order_per_key(backend: Any) -> None:
    published = capsule_history()
    for event in published:
        await backend.publisher.publish(event)
    consumer = backend.make_consumer("projector")
    recorder = Recorder()
    subscribe(consumer, recorder)

    await consumer.start()
    await consumer.drain()

    for key in {event.resource_id for event in published}:
        expected = [event.id for event in published if event.resource_id == key]
        assert [event.id for event in recorder.events if event.resource_id == key] == expected


async def test_consumer_gets_typed_event(backend: Any) -> None:
    vote = vote_cast("against", 0.5)
    await backend.publisher.publish(vote)
    consumer = backend.make_consumer("tally")
    recorder = Recorder()
    consumer.register_handler(EventType.VOTE_CAST, recorder)

    await consumer.start()
    await consumer.drain()

    assert type(recorder.events[0]) is VoteCastEvent
    assert type(recorder.events[0].type) is EventType
    assert recorder.events == [vote]


async def test_consumer_gets_only_subscribed_types(backend: Any) -> None:
    await backend.publisher.publish(vote_cast())
    created = capsule_created()
    await backend.publisher.publish(created)
    consumer = backend.make_consumer("capsules-only")
    recorder = Recorder()
    consumer.register_handler(EventType.CAPSULE_CREATED, recorder)

    await consumer.start()
    await consumer.drain()

    assert recorder.ids == [created.id]


async def test_every_handler_of_type_called(backend: Any) -> None:
    created = capsule_created()
    await backend.publisher.publish(created)
    consumer = backend.make_consumer("fan-out")
    indexer, notifier = Recorder(), Recorder()
    consumer.register_handler(EventType.CAPSULE_CREATED, indexer, name="indexer")
    consumer.register_handler(EventType.CAPSULE_CREATED, notifier, name="notifier")

    await consumer.start()
    await consumer.drain()

    assert indexer.ids == [created.id]
    assert notifier.ids == [created.id]


async def test_publish_batch_delivers_in_order(backend: Any) -> None:
    capsule_id = uuid4()
    batch = [capsule_created(capsule_id)] + [
        capsule_updated(capsule_id, version, f"v{version + 1}") for version in range(1, 6)
    ]
    await backend.publisher.publish_batch(batch)
    consumer = backend.make_consumer("projector")
    recorder = Recorder()
    subscribe(consumer, recorder)

    await consumer.start()
    await consumer.drain()

    assert recorder.ids == [event.id for event in batch]


async def test_groups_have_independent_positions(backend: Any) -> None:
    first = capsule_created()
    await backend.publisher.publish(first)
    search, audit = Recorder(), Recorder()
    search_consumer = backend.make_consumer("search")
    search_consumer.register_handler(EventType.CAPSULE_CREATED, search)
    await search_consumer.start()
    await search_consumer.drain()
    second = capsule_created()
    await backend.publisher.publish(second)
    audit_consumer = backend.make_consumer("audit")
    audit_consumer.register_handler(EventType.CAPSULE_CREATED, audit)

    await audit_consumer.start()
    await audit_consumer.drain()
    await search_consumer.drain()

    # Two capsules, two keys: only the embedded log orders them (README, "Limits").
    assert sorted(audit.ids) == sorted([first.id, second.id])
    assert search.ids == [first.id, second.id]


async def test_restarted_consumer_resumes_after_commit(backend: Any) -> None:
    handled_before = [capsule_created() for _ in range(3)]
    for event in handled_before:
        await backend.publisher.publish(event)
    first_run = backend.make_consumer("indexer")
    first_run.register_handler(EventType.CAPSULE_CREATED, Recorder())
    await first_run.start()
    await first_run.drain()
    await first_run.stop()
    published_later = [capsule_created() for _ in range(2)]
    for event in published_later:
        await backend.publisher.publish(event)
    second_run = backend.make_consumer("indexer")
    recorder = Recorder()
    second_run.register_handler(EventType.CAPSULE_CREATED, recorder)

    await second_run.start()
    await second_run.drain()

    # Each event is a capsule of its own, and so a key of its own: compared without order.
    assert sorted(recorder.ids) == sorted(event.id for event in published_later)


async def test_stop_during_retry_redelivers_event(backend: Any) -> None:
    event = capsule_created()
    await backend.publisher.publish(event)
    calls: list[Event[Any]] = []

    async def fails_first_time(received: Event[Any]) -> None:
        calls.append(received)
        raise ConnectionError("search index unreachable")

    slow_retry = backend.make_consumer(
        "indexer", consumer_retry_backoff_seconds=60, consumer_retry_backoff_max_seconds=60
    )
    slow_retry.register_handler(EventType.CAPSULE_CREATED, fails_first_time, name="indexer")
    async with running(slow_retry):
        await wait_until(lambda: len(calls) == 1, "the handler failed once")
    restarted = backend.make_consumer("indexer")
    recorder = Recorder()
    restarted.register_handler(EventType.CAPSULE_CREATED, recorder, name="indexer")

    await restarted.start()
    await restarted.drain()

    assert recorder.ids == [event.id]
    assert await backend.dead_letters.list(group_id="indexer") == []


async def test_stop_interrupts_retry_wait(backend: Any) -> None:
    await backend.publisher.publish(capsule_created())
    calls: list[Event[Any]] = []

    async def always_fails(received: Event[Any]) -> None:
        calls.append(received)
        raise ConnectionError("search index unreachable")

    consumer = backend.make_consumer(
        "indexer", consumer_retry_backoff_seconds=60, consumer_retry_backoff_max_seconds=60
    )
    consumer.register_handler(EventType.CAPSULE_CREATED, always_fails)
    await consumer.start()
    loop = asyncio.create_task(consumer.run())
    await wait_until(lambda: len(calls) == 1, "the handler failed once")
    stop_started = time.monotonic()

    await consumer.stop()
    await asyncio.wait_for(loop, WAIT_TIMEOUT_SECONDS)

    assert time.monotonic() - stop_started < 2.0
    assert len(calls) == 1


async def test_running_consumer_gets_new_events(backend: Any) -> None:
    consumer = backend.make_consumer("live")
    recorder = Recorder()
    consumer.register_handler(EventType.OVERLAY_INVOKED, recorder)

    async with running(consumer):
        invoked = OverlayInvokedEvent.create(uuid4(), "summarizer", "summarize", 12.0, True)
        await backend.publisher.publish(invoked)
        await wait_until(lambda: len(recorder.ids) == 1, "the running consumer got the event")

    assert recorder.ids == [invoked.id]


async def test_handler_events_caused_by_trigger(backend: Any) -> None:
    trigger = capsule_created()
    await backend.publisher.publish(trigger)

    async def announce(event: Event[Any]) -> None:
        await backend.events.overlay_invoked(uuid4(), "indexer", "index", 3.5, True)

    reactor = backend.make_consumer("reactor")
    reactor.register_handler(EventType.CAPSULE_CREATED, announce)
    await reactor.start()
    await reactor.drain()
    observer = backend.make_consumer("observer")
    recorder = Recorder()
    observer.register_handler(EventType.OVERLAY_INVOKED, recorder)

    await observer.start()
    await observer.drain()

    assert recorder.events[0].causation_id == trigger.id
    assert recorder.events[0].correlation_id == trigger.id


async def test_drain_handles_events_its_handlers_publish(backend: Any) -> None:
    trigger = capsule_created()
    await backend.publisher.publish(trigger)
    recorder = Recorder()
    hops = 5

    async def announce(event: Event[Any]) -> None:
        await backend.events.overlay_invoked(uuid4(), "indexer", "index", 3.5, True)

    async def relay(event: Event[Any]) -> None:
        # Each hop publishes the next, so most are written after drain() began.
        await recorder(event)
        if len(recorder.events) < hops:
            await backend.events.overlay_invoked(uuid4(), "indexer", "index", 3.5, True)

    consumer = backend.make_consumer("chain")
    consumer.register_handler(EventType.CAPSULE_CREATED, announce)
    consumer.register_handler(EventType.OVERLAY_INVOKED, relay)
    await consumer.start()
    handled = await consumer.drain()

    assert handled == 1 + hops
    assert len(recorder.events) == hops
    assert recorder.events[0].causation_id == trigger.id


async def test_batch_handler_gets_events_in_order(backend: Any) -> None:
    published = capsule_history()
    await backend.publisher.publish_batch(published)
    consumer = backend.make_consumer("projector")
    recorder = BatchRecorder()
    consumer.register_batch_handler(CAPSULE_TYPES, recorder, name="projector")

    await consumer.start()
    await consumer.drain()

    # Events of one resource are ordered; only the embedded log orders the two capsules'
    # events between them (README, "Limits"; tests/sqlite checks that global order).
    handled = [event for batch in recorder.batches for event in batch]
    assert sorted(map(str, recorder.ids)) == sorted(str(event.id) for event in published)
    for key in {event.resource_id for event in published}:
        expected = [event.id for event in published if event.resource_id == key]
        assert [event.id for event in handled if event.resource_id == key] == expected


async def test_consumer_without_types_rejected(backend: Any) -> None:
    consumer = backend.make_consumer("idle")

    with pytest.raises(ValueError) as caught:
        await consumer.start()

    # The backend may run the test's group "idle" under a longer, unique group id.
    assert consumer.group_id.endswith("idle")
    assert str(caught.value) == (
        f"Consumer group {consumer.group_id!r} has no event types to consume; register a "
        "handler or pass event_types to start()."
    )


async def test_typed_classes_survive_the_log(backend: Any) -> None:
    capsule_id = uuid4()
    published = [
        capsule_created(capsule_id),
        capsule_updated(capsule_id, 1, "second"),
        CapsuleDeletedEvent.create(capsule_id, uuid4()),
    ]
    await backend.publisher.publish_batch(published)
    consumer = backend.make_consumer("projector")
    recorder = Recorder()
    subscribe(consumer, recorder)

    await consumer.start()
    await consumer.drain()

    assert [type(event) for event in recorder.events] == [
        CapsuleCreatedEvent,
        CapsuleUpdatedEvent,
        CapsuleDeletedEvent,
    ]


async def test_repeated_id_in_batch_rejected(backend: Any) -> None:
    first = capsule_created()
    copy = first.model_copy(update={"metadata": {"pad": "x" * 100}})

    with pytest.raises(EventValidationError) as caught:
        await backend.events.publish_many([first, capsule_created(), copy])

    assert f"Event id {first.id} appears twice in the batch; nothing was published" in str(
        caught.value
    )
    consumer = backend.make_consumer("copies")
    recorder = Recorder()
    consumer.register_handler(EventType.CAPSULE_CREATED, recorder)
    await consumer.start()
    await consumer.drain()
    assert first.id not in recorder.ids


async def test_naive_timestamp_from_model_copy_rejected(backend: Any) -> None:
    # model_copy does not validate, so creation's check cannot catch this.
    event = capsule_created().model_copy(update={"timestamp": datetime(2026, 1, 31, 12, 0)})

    with pytest.raises(EventValidationError) as caught:
        await backend.events.publish(event)

    assert "has the naive timestamp 2026-01-31T12:00:00" in str(caught.value)
    assert [problem.location for problem in caught.value.problems] == ["timestamp"]
