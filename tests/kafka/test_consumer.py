"""KafkaEventConsumer against the real broker: delivery, order, parking, commits, rebalances."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID, uuid4

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from structlog.testing import capture_logs

from forge.config import ForgeSettings
from forge.core.events.dead_letters import DECODE_STAGE, DeadLetterStatus
from forge.core.events.dispatch import RetryPolicy
from forge.exceptions import NotStartedError
from forge.infrastructure.kafka import consumer as consumer_module
from forge.infrastructure.kafka.consumer import KafkaEventConsumer
from forge.infrastructure.kafka.producer import KafkaEventProducer
from forge.infrastructure.sqlite.database import SqliteDatabase
from forge.infrastructure.sqlite.dead_letters import SqliteDeadLetterStore
from forge.models.events import (
    CapsuleCreatedEvent,
    Event,
    EventType,
    topic_for,
)
from tests.helpers import (
    MAX_EVENT_BYTES,
    SAMPLE_EVENTS,
    Recorder,
    capsule_created,
    capsule_updated,
    failing_handler,
    vote_cast,
    wait_until,
)
from tests.kafka.conftest import dead_letters_of, start_group_at_end, write_unreadable_record

pytestmark = pytest.mark.kafka

CAPSULE_CREATED = topic_for(EventType.CAPSULE_CREATED)
CAPSULE_UPDATED = topic_for(EventType.CAPSULE_UPDATED)


@pytest.fixture
async def producer(settings: ForgeSettings) -> AsyncIterator[KafkaEventProducer]:
    async with KafkaEventProducer(settings=settings) as started:
        yield started


@pytest.fixture
async def letter_store(settings: ForgeSettings) -> AsyncIterator[SqliteDeadLetterStore]:
    """A dead-letter store in a SQLite file of the test's own folder."""
    database = SqliteDatabase(settings.data_dir / "letters.sqlite3")
    await database.open()
    yield SqliteDeadLetterStore(database)
    await database.close()


@pytest.fixture
async def consumers() -> AsyncIterator[list[KafkaEventConsumer]]:
    """Consumers a test made; each is stopped when the test ends."""
    created: list[KafkaEventConsumer] = []
    yield created
    for consumer in created:
        await consumer.stop()


async def new_consumer(
    created: list[KafkaEventConsumer],
    settings: ForgeSettings,
    group_id: str,
    event_types: list[EventType],
    **options: Any,
) -> KafkaEventConsumer:
    """Return a consumer of a group that starts at the current end of its topics."""
    await start_group_at_end(settings, group_id, [topic_for(t) for t in event_types])
    consumer = KafkaEventConsumer(group_id, settings=settings, **options)
    created.append(consumer)
    return consumer


async def test_round_trip_keeps_typed_classes(
    settings: ForgeSettings,
    group_id: str,
    producer: KafkaEventProducer,
    consumers: list[KafkaEventConsumer],
) -> None:
    types = list(SAMPLE_EVENTS)
    consumer = await new_consumer(consumers, settings, group_id, types)
    recorder = Recorder()
    for event_type in types:
        consumer.register_handler(event_type, recorder)
    await consumer.start()
    sent = [SAMPLE_EVENTS[event_type]() for event_type in types]

    await producer.publish_batch(sent)
    handled = await consumer.drain(timeout=30)

    assert handled == len(sent)
    received = {event.id: event for event in recorder.events}
    for event in sent:
        assert type(received[event.id]) is type(event)
        assert received[event.id] == event
        assert received[event.id].type is event.type


async def test_events_of_one_key_handled_in_order(
    settings: ForgeSettings,
    group_id: str,
    producer: KafkaEventProducer,
    consumers: list[KafkaEventConsumer],
) -> None:
    consumer = await new_consumer(consumers, settings, group_id, [EventType.CAPSULE_UPDATED])
    recorder = Recorder()
    consumer.register_handler(EventType.CAPSULE_UPDATED, recorder)
    await consumer.start()
    capsules = [uuid4() for _ in range(6)]
    sent = [
        capsule_updated(capsule_id, version, f"title {version}")
        for version in range(1, 16)
        for capsule_id in capsules
    ]

    await producer.publish_batch(sent)
    await consumer.drain(timeout=30)

    assert sorted(recorder.ids) == sorted(event.id for event in sent)
    for capsule_id in capsules:
        versions = [
            event.data.old_version for event in recorder.events if event.resource_id == capsule_id
        ]
        assert versions == [str(version) for version in range(1, 16)]


async def test_malformed_records_parked_and_stream_flows(
    settings: ForgeSettings,
    group_id: str,
    producer: KafkaEventProducer,
    consumers: list[KafkaEventConsumer],
    letter_store: SqliteDeadLetterStore,
) -> None:
    store = letter_store
    consumer = await new_consumer(
        consumers, settings, group_id, [EventType.CAPSULE_CREATED], dead_letters=store
    )
    recorder = Recorder()
    consumer.register_handler(EventType.CAPSULE_CREATED, recorder)
    await consumer.start()
    newer = {**capsule_created().to_dict(), "schema_version": 99}
    unknown = {**capsule_created().to_dict(), "type": "capsule.moved"}
    invalid = capsule_created().to_dict()
    invalid["data"]["capsule_type"] = ""
    malformed = {
        "not_json": (b"capsule 42 created", "not valid JSON"),
        "invalid_utf8": (b'{"type": "\xff\xfe"}', "not valid UTF-8"),
        "unknown_type": (orjson.dumps(unknown), "capsule.moved"),
        "invalid_payload": (orjson.dumps(invalid), "capsule_type"),
        "newer_schema": (orjson.dumps(newer), "99"),
        "too_large": (b"x" * (MAX_EVENT_BYTES + 10), "over the limit"),
    }
    first, last = capsule_created(), capsule_created()

    await producer.publish(first)
    key = "00000000-0000-0000-0000-000000000001"
    for value, _ in malformed.values():
        await producer.append_raw(CAPSULE_CREATED, value, key=key, headers={"source": "test"})
    await producer.publish(last)
    await consumer.drain(timeout=30)

    assert set(recorder.ids) == {first.id, last.id}
    assert consumer.parked_count == len(malformed)
    letters = await dead_letters_of(settings, group_id)
    assert len(letters) == len(malformed)
    by_value = {letter.value: letter for letter in letters}
    for name, (value, reason) in malformed.items():
        letter = by_value[value]
        assert reason in letter.headers["dlq_reason"], name
        assert letter.headers["dlq_handler"] == DECODE_STAGE
        assert letter.headers["dlq_original_topic"] == CAPSULE_CREATED
        assert letter.headers["dlq_group_id"] == group_id
        assert letter.headers["source"] == "test"
        assert letter.key == key
    stored = await store.list(group_id=group_id)
    assert len(stored) == len(malformed)


async def test_failing_handler_retried_then_parked(
    settings: ForgeSettings,
    group_id: str,
    producer: KafkaEventProducer,
    consumers: list[KafkaEventConsumer],
) -> None:
    poison = vote_cast("against")
    handler, calls = failing_handler(
        RuntimeError("ledger is read-only"), fail_for=lambda event: event.id == poison.id
    )
    consumer = await new_consumer(consumers, settings, group_id, [EventType.VOTE_CAST])
    consumer.register_handler(EventType.VOTE_CAST, handler, name="ledger")
    await consumer.start()
    others = [vote_cast() for _ in range(4)]

    await producer.publish_batch([others[0], poison, *others[1:]])
    await consumer.drain(timeout=30)

    assert [event.id for event in calls].count(poison.id) == settings.consumer_max_attempts
    assert {event.id for event in calls} == {poison.id, *(event.id for event in others)}
    [letter] = await dead_letters_of(settings, group_id)
    assert letter.headers["event_id"] == str(poison.id)
    assert letter.headers["dlq_reason"] == "ledger is read-only"
    assert letter.headers["dlq_error_type"] == "RuntimeError"
    assert letter.headers["dlq_handler"] == "ledger"
    assert letter.headers["dlq_attempts"] == str(settings.consumer_max_attempts)

    # The parked event is committed: the group does not see it again.
    await consumer.stop()
    again = KafkaEventConsumer(group_id, settings=settings)
    consumers.append(again)
    recorder = Recorder()
    again.register_handler(EventType.VOTE_CAST, recorder)
    await again.start()
    assert await again.drain(timeout=30) == 0


async def test_stop_mid_batch_commits_only_finished(
    settings: ForgeSettings,
    group_id: str,
    producer: KafkaEventProducer,
    consumers: list[KafkaEventConsumer],
) -> None:
    capsule_id = uuid4()
    sent = [capsule_updated(capsule_id, version, f"v{version}") for version in range(1, 11)]
    stuck = sent[5]
    seen: list[UUID] = []

    async def handle(event: Event[Any]) -> None:
        seen.append(event.id)
        if event.id == stuck.id:
            raise RuntimeError("search index is down")

    # A long backoff keeps the first consumer waiting to retry the sixth event.
    slow_retries = RetryPolicy(max_attempts=5, initial_backoff_seconds=30)
    first = await new_consumer(
        consumers, settings, group_id, [EventType.CAPSULE_UPDATED], retry_policy=slow_retries
    )
    first.register_handler(EventType.CAPSULE_UPDATED, handle)
    await producer.publish_batch(sent)
    await first.start()
    loop = asyncio.create_task(first.run())
    await wait_until(lambda: stuck.id in seen, "the sixth event was tried")

    began = time.monotonic()
    await first.stop()
    await asyncio.wait_for(loop, 5)

    assert time.monotonic() - began < settings.consumer_stop_timeout_seconds
    assert seen == [event.id for event in sent[:6]]
    second = KafkaEventConsumer(group_id, settings=settings)
    consumers.append(second)
    recorder = Recorder()
    second.register_handler(EventType.CAPSULE_UPDATED, recorder)
    await second.start()
    await second.drain(timeout=30)
    assert recorder.ids == [event.id for event in sent[5:]]


async def test_small_batches_all_committed_by_stop(
    settings: ForgeSettings,
    group_id: str,
    producer: KafkaEventProducer,
    consumers: list[KafkaEventConsumer],
) -> None:
    # Each batch's commit runs while the next batch is handled; stop() ends with all of them.
    small = settings.model_copy(update={"consumer_batch_size": 3})
    sent = [capsule_created() for _ in range(10)]
    recorder = Recorder()
    first = await new_consumer(consumers, small, group_id, [EventType.CAPSULE_CREATED])
    first.register_handler(EventType.CAPSULE_CREATED, recorder)
    await producer.publish_batch(sent)
    await first.start()
    deadline = time.monotonic() + 30
    while len(recorder.ids) < len(sent) and time.monotonic() < deadline:
        await first.poll_once()
    await first.stop()

    second = KafkaEventConsumer(group_id, settings=small)
    consumers.append(second)
    again = Recorder()
    second.register_handler(EventType.CAPSULE_CREATED, again)
    await second.start()
    handled = await second.drain(timeout=30)

    assert sorted(map(str, recorder.ids)) == sorted(str(event.id) for event in sent)
    assert handled == 0
    assert again.ids == []


async def test_killed_round_redelivered_to_next_member(
    settings: ForgeSettings,
    group_id: str,
    producer: KafkaEventProducer,
    consumers: list[KafkaEventConsumer],
) -> None:
    # A consumer whose process dies after handling, before its commit, loses nothing: the
    # records come again to the group.
    settings = settings.model_copy(update={"consumer_batch_size": 4})
    sent = [capsule_created() for _ in range(4)]
    first = await new_consumer(consumers, settings, group_id, [EventType.CAPSULE_CREATED])
    handled_by_first: list[UUID] = []

    async def handle_then_die(event: Event[Any]) -> None:
        handled_by_first.append(event.id)
        raise asyncio.CancelledError

    first.register_handler(EventType.CAPSULE_CREATED, handle_then_die)
    await producer.publish_batch(sent)
    await first.start()
    with pytest.raises(asyncio.CancelledError):
        for _ in range(40):
            await first.poll_once()
    assert handled_by_first
    consumers.remove(first)
    await first.stop()

    second = KafkaEventConsumer(group_id, settings=settings)
    consumers.append(second)
    recorder = Recorder()
    second.register_handler(EventType.CAPSULE_CREATED, recorder)
    await second.start()
    await second.drain(timeout=30)
    assert sorted(recorder.ids) == sorted(event.id for event in sent)


async def test_long_handler_keeps_group_membership(
    settings: ForgeSettings,
    group_id: str,
    producer: KafkaEventProducer,
    consumers: list[KafkaEventConsumer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without the keep-alive polls, aiokafka leaves the group after max_poll_interval_ms, and
    # the group's partitions are revoked and assigned again.
    monkeypatch.setattr(consumer_module, "MAX_POLL_INTERVAL_MS", 2000)
    monkeypatch.setattr(consumer_module, "KEEPALIVE_INTERVAL_SECONDS", 0.3)
    event = capsule_created()
    consumer = await new_consumer(consumers, settings, group_id, [EventType.CAPSULE_CREATED])
    calls: list[UUID] = []

    async def slow(received: Event[Any]) -> None:
        calls.append(received.id)
        await asyncio.sleep(5)

    consumer.register_handler(EventType.CAPSULE_CREATED, slow)
    await consumer.start()
    await producer.publish(event)

    with capture_logs() as logs:
        await consumer.drain(timeout=30)

    assert calls == [event.id]
    names = [entry["event"] for entry in logs]
    assert "partitions_revoked" not in names
    assert "offsets_not_committed" not in names
    assert "kafka_consumer_keepalive" in names
    await consumer.stop()
    again = KafkaEventConsumer(group_id, settings=settings)
    consumers.append(again)
    again.register_handler(EventType.CAPSULE_CREATED, Recorder())
    await again.start()
    assert await again.drain(timeout=30) == 0


async def test_dead_letter_retry_redelivers_to_handler(
    settings: ForgeSettings,
    group_id: str,
    producer: KafkaEventProducer,
    consumers: list[KafkaEventConsumer],
    letter_store: SqliteDeadLetterStore,
) -> None:
    store = letter_store
    broken = True
    handled: list[UUID] = []

    async def handle(event: Event[Any]) -> None:
        if broken:
            raise RuntimeError("projection table is locked")
        handled.append(event.id)

    consumer = await new_consumer(
        consumers, settings, group_id, [EventType.CAPSULE_CREATED], dead_letters=store
    )
    consumer.register_handler(EventType.CAPSULE_CREATED, handle, name="projection")
    await consumer.start()
    event = capsule_created()
    await producer.publish(event)
    await consumer.drain(timeout=30)
    [letter] = await store.list(group_id=group_id)
    assert letter.status is DeadLetterStatus.PARKED

    broken = False
    assert await store.request_retry(group_id=group_id) == 1
    await consumer.drain(timeout=30)

    assert handled == [event.id]
    [resolved] = await store.list(group_id=group_id)
    assert resolved.status is DeadLetterStatus.RESOLVED


async def test_consumer_before_start_raises_not_started(settings: ForgeSettings) -> None:
    consumer = KafkaEventConsumer("never-started", settings=settings)

    with pytest.raises(NotStartedError):
        await consumer.run()
    with pytest.raises(NotStartedError):
        await consumer.poll_once()
    await consumer.stop()


async def test_batch_handler_sees_events_in_order(
    settings: ForgeSettings,
    group_id: str,
    producer: KafkaEventProducer,
    consumers: list[KafkaEventConsumer],
) -> None:
    consumer = await new_consumer(consumers, settings, group_id, [EventType.CAPSULE_UPDATED])
    batches: list[list[CapsuleCreatedEvent]] = []

    async def handle_batch(events: Any) -> None:
        batches.append(list(events))

    consumer.register_batch_handler([EventType.CAPSULE_UPDATED], handle_batch)
    await consumer.start()
    capsule_id = uuid4()
    sent = [capsule_updated(capsule_id, version, f"v{version}") for version in range(1, 21)]

    await producer.publish_batch(sent)
    await consumer.drain(timeout=30)

    assert [event.id for batch in batches for event in batch] == [event.id for event in sent]
    assert len(batches) < len(sent)


async def test_invalid_event_time_header_ignored(
    settings: ForgeSettings,
    group_id: str,
    producer: KafkaEventProducer,
    consumers: list[KafkaEventConsumer],
) -> None:
    # The header only orders the records of a fetch, so an invalid one falls back to Kafka's
    # timestamp. "²" passes `str.isdigit()` but not `int()`, and `int()` rejects 5,000 digits.
    consumer = await new_consumer(consumers, settings, group_id, [EventType.CAPSULE_CREATED])
    recorder = Recorder()
    consumer.register_handler(EventType.CAPSULE_CREATED, recorder)
    await consumer.start()
    odd = [capsule_created() for _ in range(6)]
    plain = [capsule_created() for _ in range(6)]

    for event, header in zip(odd, ["²", "9" * 5000, "-5", "1e9", "", " 7"], strict=True):
        headers = {"event_id": str(event.id), "event_time_us": header}
        await producer.append_raw(CAPSULE_CREATED, event.to_json(), key=event.key, headers=headers)
    await producer.publish_batch(plain)
    handled = await consumer.drain(timeout=30)

    assert handled == 12
    assert set(recorder.ids) == {event.id for event in [*odd, *plain]}
    assert consumer.parked_count == 0


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
async def test_compressed_records_handled(
    settings: ForgeSettings, group_id: str, consumers: list[KafkaEventConsumer], codec: str
) -> None:
    # Any producer may compress its batches; aiokafka reads all but gzip with cramjam.
    consumer = await new_consumer(consumers, settings, group_id, [EventType.CAPSULE_CREATED])
    recorder = Recorder()
    consumer.register_handler(EventType.CAPSULE_CREATED, recorder)
    await consumer.start()
    events = [capsule_created() for _ in range(20)]

    async with KafkaEventProducer(settings=settings, compression_type=codec) as producer:
        await producer.publish_batch(events)
    await consumer.drain(timeout=30)

    assert set(recorder.ids) == {event.id for event in events}


async def test_aborted_transaction_not_handled(
    settings: ForgeSettings, group_id: str, consumers: list[KafkaEventConsumer]
) -> None:
    consumer = await new_consumer(consumers, settings, group_id, [EventType.CAPSULE_CREATED])
    recorder = Recorder()
    consumer.register_handler(EventType.CAPSULE_CREATED, recorder)
    await consumer.start()
    aborted, committed = capsule_created(), capsule_created()

    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        transactional_id=f"test-{uuid4()}",
    )
    await producer.start()
    try:
        for event, commit in ((aborted, False), (committed, True)):
            await producer.begin_transaction()
            await producer.send_and_wait(
                CAPSULE_CREATED, event.to_json(), key=event.key.encode() if event.key else None
            )
            if commit:
                await producer.commit_transaction()
            else:
                await producer.abort_transaction()
    finally:
        await producer.stop()
    await consumer.drain(timeout=30)

    assert recorder.ids == [committed.id]


@pytest.mark.parametrize("part", ["key", "headers"])
async def test_dead_letter_too_large_for_topic_cut(
    settings: ForgeSettings,
    group_id: str,
    producer: KafkaEventProducer,
    consumers: list[KafkaEventConsumer],
    part: str,
) -> None:
    # A record just under the broker's limit no longer fits once the reason headers are added.
    consumer = await new_consumer(consumers, settings, group_id, [EventType.CAPSULE_CREATED])
    recorder = Recorder()
    consumer.register_handler(EventType.CAPSULE_CREATED, recorder)
    await consumer.start()
    key, headers = b"k", [(f"h{index:04}", b"v" * 1_000) for index in range(1_030)]
    if part == "key":
        key, headers = b"k" * 1_040_000, []
    raw = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers, max_request_size=2_000_000
    )
    await raw.start()
    try:
        await raw.send_and_wait(CAPSULE_CREATED, b"not json", key=key, headers=headers)
    finally:
        await raw.stop()
    later = [capsule_created() for _ in range(3)]
    await producer.publish_batch(later)

    handled = await consumer.drain(timeout=60)

    assert handled == 4
    assert sorted(recorder.ids) == sorted(event.id for event in later)
    [letter] = await dead_letters_of(settings, group_id)
    assert letter.value == b"not json"
    if part == "key":
        assert letter.headers["dlq_key_truncated"] == "1040000"
        assert letter.key == "k" * 1024
    else:
        assert letter.headers["dlq_headers_dropped"] == "1030"
        assert "h0000" not in letter.headers
    assert "not valid JSON" in letter.headers["dlq_reason"]


async def test_unreadable_header_name_parked(
    settings: ForgeSettings,
    group_id: str,
    producer: KafkaEventProducer,
    consumers: list[KafkaEventConsumer],
    letter_store: SqliteDeadLetterStore,
) -> None:
    # Kafka's Java client cannot write such a header name, but librdkafka can. aiokafka fails
    # on it at every fetch, so it must be parked by position.
    consumer = await new_consumer(
        consumers, settings, group_id, [EventType.CAPSULE_CREATED], dead_letters=letter_store
    )
    recorder = Recorder()
    consumer.register_handler(EventType.CAPSULE_CREATED, recorder)
    await consumer.start()
    key = uuid4()
    before, bad, after = (capsule_created(key) for _ in range(3))
    # Events of other partitions, which aiokafka takes in the same fetch as the bad record.
    others = [capsule_created() for _ in range(30)]
    await producer.publish_batch([before, *others[:15]])
    await write_unreadable_record(settings, CAPSULE_CREATED, bad.to_json(), str(key))
    await producer.publish_batch([after, *others[15:]])

    handled = await consumer.drain(timeout=30)

    assert handled == 33
    assert sorted(recorder.ids) == sorted(event.id for event in [before, after, *others])
    assert [i for i in recorder.ids if i in (before.id, after.id)] == [before.id, after.id]
    [letter] = await letter_store.list(group_id=group_id)
    assert letter.error_type == "UnicodeDecodeError"
    assert letter.reason.startswith("The Kafka client could not read record ")
    assert letter.handler == DECODE_STAGE
    [topic_letter] = await dead_letters_of(settings, group_id)
    assert topic_letter.headers["dlq_original_offset"] == str(letter.offset)
