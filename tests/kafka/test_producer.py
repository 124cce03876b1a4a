"""KafkaEventProducer against the real broker: acknowledgements, batch failures, lifecycle."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import UnknownTopicOrPartitionError
from structlog.testing import capture_logs

from forge.exceptions import (
    BatchPublishError,
    BrokerUnavailableError,
    EventTooLargeError,
    NotStartedError,
    PublishError,
)
from forge.infrastructure.kafka import producer as producer_module
from forge.infrastructure.kafka.producer import (
    KafkaEventProducer,
    get_event_producer,
    shutdown_event_producer,
)
from forge.models.events import EventType, parse_event, topic_for
from tests.helpers import MAX_EVENT_BYTES, capsule_created, vote_cast
from tests.kafka.conftest import BOOTSTRAP_SERVERS, end_offsets, kafka_settings

pytestmark = pytest.mark.kafka

CAPSULE_TOPIC = topic_for(EventType.CAPSULE_CREATED)


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _read_new(settings: Any, before: dict[Any, int]) -> list[bytes]:
    """Return the values written to the partitions of `before` since those offsets."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        consumer.assign(list(before))
        for tp, offset in before.items():
            consumer.seek(tp, offset)
        ends = await consumer.end_offsets(list(before))
        values: list[bytes] = []
        deadline = time.monotonic() + 10
        while any([await consumer.position(tp) < ends[tp] for tp in before]):
            assert time.monotonic() < deadline, "reading the new records timed out"
            for records in (await consumer.getmany(timeout_ms=200)).values():
                values.extend(record.value for record in records)
        return values
    finally:
        await consumer.stop()


async def test_publish_returns_after_acknowledgement(tmp_path: Path) -> None:
    settings = kafka_settings(tmp_path)
    before = await end_offsets(settings, [CAPSULE_TOPIC])
    event = capsule_created()

    async with KafkaEventProducer(settings=settings) as producer:
        await producer.publish(event)

    # Other writers may share the broker, so the new records are searched, not counted.
    received = [parse_event(value) for value in await _read_new(settings, before)]
    assert event in received


async def test_batch_with_oversized_event_names_only_it(tmp_path: Path) -> None:
    settings = kafka_settings(tmp_path)
    before = await end_offsets(settings, [CAPSULE_TOPIC])
    valid = [capsule_created() for _ in range(5)]
    oversized = capsule_created(content="x" * (MAX_EVENT_BYTES + 1))

    async with KafkaEventProducer(settings=settings) as producer:
        with pytest.raises(BatchPublishError) as caught:
            await producer.publish_batch([valid[0], valid[1], oversized, *valid[2:]])

    assert set(caught.value.failed) == {oversized.id}
    assert isinstance(caught.value.failed[oversized.id], EventTooLargeError)
    assert caught.value.acknowledged == 5
    assert caught.value.retriable is False
    assert "1 of 6 events were not published" in str(caught.value)
    published = {parse_event(value).id for value in await _read_new(settings, before)}
    assert {event.id for event in valid} <= published
    assert oversized.id not in published


async def test_batch_with_broker_rejection_names_only_it(tmp_path: Path) -> None:
    # The broker's message.max.bytes (about 1 MiB by default) is below this limit, so the
    # producer sends the event and the broker rejects it.
    settings = kafka_settings(tmp_path, max_event_bytes=4 * 1024 * 1024)
    before = await end_offsets(settings, [CAPSULE_TOPIC])
    valid = [capsule_created() for _ in range(3)]
    rejected = capsule_created(metadata={"blob": "x" * (1536 * 1024)})

    async with KafkaEventProducer(settings=settings) as producer:
        with pytest.raises(BatchPublishError) as caught:
            await producer.publish_batch([*valid, rejected])

    assert set(caught.value.failed) == {rejected.id}
    cause = caught.value.failed[rejected.id]
    assert isinstance(cause, PublishError)
    assert "MessageSizeTooLarge" in str(cause)
    assert caught.value.acknowledged == 3
    published = {parse_event(value).id for value in await _read_new(settings, before)}
    assert {event.id for event in valid} <= published
    assert rejected.id not in published


async def test_publish_before_start_raises_not_started(tmp_path: Path) -> None:
    producer = KafkaEventProducer(settings=kafka_settings(tmp_path))

    with pytest.raises(NotStartedError, match="not started"):
        await producer.publish(capsule_created())


async def test_publish_after_stop_raises_not_started(tmp_path: Path) -> None:
    producer = KafkaEventProducer(settings=kafka_settings(tmp_path))
    await producer.start()
    await producer.stop()
    await producer.stop()

    with pytest.raises(NotStartedError):
        await producer.publish_batch([capsule_created()])


async def test_concurrent_starts_create_one_client(tmp_path: Path) -> None:
    producer = KafkaEventProducer(settings=kafka_settings(tmp_path))

    with capture_logs() as logs:
        await asyncio.gather(producer.start(), producer.start(), producer.start())
        await producer.stop()

    started = [entry for entry in logs if entry["event"] == "kafka_producer_started"]
    assert len(started) == 1


async def test_start_without_broker_names_address_and_fix(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_unused_port()}"
    producer = KafkaEventProducer(address, settings=kafka_settings(tmp_path))

    began = time.monotonic()
    with pytest.raises(BrokerUnavailableError) as caught:
        await producer.start()

    assert time.monotonic() - began < 15
    assert address in str(caught.value)
    assert "scripts/kafka-broker start" in str(caught.value)
    assert caught.value.retriable is True
    assert not producer.started


async def test_process_producer_started_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_KAFKA_BOOTSTRAP_SERVERS", BOOTSTRAP_SERVERS)
    monkeypatch.setattr(producer_module, "_producer", None)

    with capture_logs() as logs:
        first, second = await asyncio.gather(get_event_producer(), get_event_producer())
        await shutdown_event_producer()
        await shutdown_event_producer()

    assert first is second
    started = [entry for entry in logs if entry["event"] == "kafka_producer_started"]
    assert len(started) == 1
    assert not first.started


async def test_batch_over_a_chunk_keeps_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(producer_module, "CHUNK_EVENTS", 3)
    settings = kafka_settings(tmp_path)
    before = await end_offsets(settings, [CAPSULE_TOPIC])
    capsule_id = uuid4()
    # One resource, so one partition: the broker keeps them in the order it received them.
    events = [capsule_created(capsule_id, title=f"Version {number}") for number in range(10)]

    async with KafkaEventProducer(settings=settings) as producer:
        await producer.publish_batch(events)

    published = [parse_event(value) for value in await _read_new(settings, before)]
    assert [event.id for event in published if event.resource_id == capsule_id] == [
        event.id for event in events
    ]


async def test_chunk_not_acknowledged_stops_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(producer_module, "CHUNK_EVENTS", 2)
    events = [capsule_created() for _ in range(5)]
    sent: list[list[UUID]] = []

    async def broker_times_out(producer: Any, outgoing: list[Any]) -> dict[Any, PublishError]:
        sent.append([item.event.id for item in outgoing])
        timeout = PublishError("KafkaTimeoutError: no acknowledgement within 30 s")
        timeout.retriable = True
        return {outgoing[0].event.id: timeout}

    async with KafkaEventProducer(settings=kafka_settings(tmp_path)) as producer:
        monkeypatch.setattr(producer, "_send_all", broker_times_out)
        with pytest.raises(BatchPublishError) as caught:
            await producer.publish_batch(events)

    assert sent == [[events[0].id, events[1].id]]
    assert set(caught.value.failed) == {events[0].id, *(event.id for event in events[2:])}
    assert "earlier part of its batch failed" in str(caught.value.failed[events[4].id])
    assert caught.value.acknowledged == 1
    assert caught.value.retriable is True


async def test_partition_usable_after_broker_rejection(tmp_path: Path) -> None:
    # As in the test above, the broker rejects the large event. aiokafka counted its sequence
    # numbers anyway, so without a new producer id every later batch of that partition fails.
    settings = kafka_settings(tmp_path, max_event_bytes=4 * 1024 * 1024)
    before = await end_offsets(settings, [CAPSULE_TOPIC])
    capsule_id = uuid4()
    first = capsule_created(capsule_id, title="First")
    rejected = capsule_created(capsule_id, metadata={"blob": "x" * (1536 * 1024)})
    later = [capsule_created(capsule_id, title=f"Later {number}") for number in range(3)]

    async with KafkaEventProducer(settings=settings) as producer:
        await producer.publish(first)
        with pytest.raises(BatchPublishError) as caught:
            await producer.publish_batch([rejected])
        await producer.publish_batch(later)

    assert set(caught.value.failed) == {rejected.id}
    published = [parse_event(value) for value in await _read_new(settings, before)]
    assert [event.id for event in published if event.resource_id == capsule_id] == [
        event.id for event in [first, *later]
    ]


async def test_probe_succeeds_with_running_broker(tmp_path: Path) -> None:
    async with KafkaEventProducer(settings=kafka_settings(tmp_path)) as producer:
        await producer.probe()

    with pytest.raises(NotStartedError):
        await producer.probe()


async def test_unknown_partitions_name_both_causes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    event = capsule_created()

    async def no_metadata(topic: str) -> set[int]:
        raise UnknownTopicOrPartitionError()

    async with KafkaEventProducer(settings=kafka_settings(tmp_path)) as producer:
        forget_metadata(producer, monkeypatch, {event.topic})
        assert producer._producer is not None
        monkeypatch.setattr(producer._producer, "partitions_for", no_metadata)
        with pytest.raises(PublishError) as caught:
            await producer.publish(event)

    assert "forge kafka topics ensure" in str(caught.value)
    assert "broker is down" in str(caught.value)
    assert caught.value.retriable is True


def forget_metadata(
    producer: KafkaEventProducer, monkeypatch: pytest.MonkeyPatch, topics: set[str]
) -> None:
    """Make the producer's client report no partitions for `topics`, as for a new topic."""
    assert producer._producer is not None
    cluster = producer._producer.client.cluster
    known = cluster.partitions_for_topic

    def partitions_for_topic(topic: str) -> set[int] | None:
        return None if topic in topics else known(topic)

    monkeypatch.setattr(cluster, "partitions_for_topic", partitions_for_topic)


async def test_unknown_topics_share_one_metadata_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    votes = [vote_cast() for _ in range(4)]
    capsules = [capsule_created() for _ in range(4)]
    requested: list[str] = []

    async def metadata_never_comes(topic: str) -> set[int]:
        requested.append(topic)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    producer = KafkaEventProducer(settings=kafka_settings(tmp_path), request_timeout_ms=1000)
    async with producer:
        forget_metadata(producer, monkeypatch, {votes[0].topic, capsules[0].topic})
        assert producer._producer is not None
        monkeypatch.setattr(producer._producer, "partitions_for", metadata_never_comes)
        started = time.monotonic()
        with pytest.raises(BatchPublishError) as caught:
            await producer.publish_batch([*votes, *capsules])
        elapsed = time.monotonic() - started

    # Each topic's metadata is requested once, and the two topics share the request timeout of
    # 1 s, where aiokafka bounds only the wait for each topic.
    assert requested == [votes[0].topic, capsules[0].topic]
    assert elapsed < 2.5
    assert set(caught.value.failed) == {event.id for event in [*votes, *capsules]}
    assert all(error.retriable for error in caught.value.failed.values())


async def test_repeated_invalid_event_counted_each_time(tmp_path: Path) -> None:
    valid = capsule_created()
    oversized = capsule_created(content="x" * (MAX_EVENT_BYTES + 1))

    async with KafkaEventProducer(settings=kafka_settings(tmp_path)) as producer:
        with pytest.raises(BatchPublishError) as caught:
            await producer.publish_batch([valid, oversized, oversized, oversized])

    assert set(caught.value.failed) == {oversized.id}
    assert caught.value.acknowledged == 1
    assert "3 of 4 events were not published" in str(caught.value)
