"""Interoperability with Kafka's own console tools, and the group-free reader."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from forge.config import ForgeSettings
from forge.infrastructure.kafka.consumer import KafkaEventConsumer
from forge.infrastructure.kafka.producer import KafkaEventProducer
from forge.infrastructure.kafka.reader import KafkaEventLogReader
from forge.models.events import CapsuleCreatedEvent, EventType, topic_for
from tests.helpers import Recorder, capsule_created
from tests.kafka.conftest import (
    BOOTSTRAP_SERVERS,
    BROKER_SCRIPT,
    dead_letters_of,
    end_offsets,
    kafka_settings,
    start_group_at_end,
    write_unreadable_record,
)
from tests.processes import ENVIRONMENT_AT_START

pytestmark = pytest.mark.kafka

CAPSULE_TOPIC = topic_for(EventType.CAPSULE_CREATED)
EVENT_FIELDS = {
    "id",
    "type",
    "timestamp",
    "actor_id",
    "actor_type",
    "resource_type",
    "resource_id",
    "data",
    "correlation_id",
    "causation_id",
    "metadata",
    "schema_version",
}
TOOL_TIMEOUT_SECONDS = 60


def _console(*args: str, stdin: str | None = None) -> str:
    completed = subprocess.run(
        [str(BROKER_SCRIPT), *args, "--bootstrap-server", BOOTSTRAP_SERVERS],
        env=ENVIRONMENT_AT_START,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_SECONDS,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


async def test_console_consumer_reads_forge_json(settings: ForgeSettings) -> None:
    event = capsule_created(title="Read by the console consumer")
    async with KafkaEventProducer(settings=settings) as producer:
        await producer.publish(event)
    reader = KafkaEventLogReader(settings=settings)
    [written] = [
        record
        async for record in reader.read([EventType.CAPSULE_CREATED])
        if record.headers.get("event_id") == str(event.id)
    ]

    output = await asyncio.to_thread(
        _console,
        "console-consumer",
        "--topic",
        CAPSULE_TOPIC,
        "--partition",
        str(written.partition),
        "--offset",
        str(written.offset),
        "--max-messages",
        "1",
        "--timeout-ms",
        "30000",
        "--formatter-property",
        "print.key=true",
        "--formatter-property",
        "print.headers=true",
    )

    headers, key, value = output.rstrip("\n").split("\t")
    assert key == str(event.resource_id)
    assert f"event_id:{event.id}" in headers.split(",")
    assert "event_type:capsule.created" in headers.split(",")
    assert "schema_version:1" in headers.split(",")
    document: dict[str, Any] = orjson.loads(value)
    assert set(document) == EVENT_FIELDS
    assert document["id"] == str(event.id)
    assert document["type"] == "capsule.created"
    assert document["resource_id"] == str(event.resource_id)
    assert document["data"]["title"] == "Read by the console consumer"
    assert document["schema_version"] == 1


async def test_console_producer_records_handled_or_parked(
    settings: ForgeSettings, group_id: str
) -> None:
    await start_group_at_end(settings, group_id, [CAPSULE_TOPIC])
    valid = capsule_created(title="Written by the console producer")
    invalid = {**valid.to_dict(), "id": "not-a-uuid"}
    lines = [
        f"{valid.resource_id}|{valid.to_json().decode()}",
        f"{valid.resource_id}|{orjson.dumps(invalid).decode()}",
    ]
    await asyncio.to_thread(
        _console,
        "console-producer",
        "--topic",
        CAPSULE_TOPIC,
        "--reader-property",
        "parse.key=true",
        "--reader-property",
        "key.separator=|",
        stdin="\n".join(lines) + "\n",
    )
    consumer = KafkaEventConsumer(group_id, settings=settings)
    recorder = Recorder()
    consumer.register_handler(EventType.CAPSULE_CREATED, recorder)

    async with consumer:
        await consumer.drain(timeout=30)

    assert recorder.ids == [valid.id]
    assert isinstance(recorder.events[0], CapsuleCreatedEvent)
    assert recorder.events[0] == valid
    [letter] = await dead_letters_of(settings, group_id)
    assert "not-a-uuid" in letter.headers["dlq_reason"]
    assert letter.key == str(valid.resource_id)


async def test_reader_follows_new_records_without_group(settings: ForgeSettings) -> None:
    reader = KafkaEventLogReader(settings=settings)
    received: set[str] = set()
    sent = [capsule_created() for _ in range(3)]
    expected = {str(event.id) for event in sent}

    async def follow() -> None:
        async for record in reader.read(
            [EventType.CAPSULE_CREATED], from_beginning=False, follow=True
        ):
            received.add(record.headers["event_id"])
            if expected <= received:
                break

    task = asyncio.create_task(follow())
    async with KafkaEventProducer(settings=settings) as producer:
        # The reader starts at the end offsets of the moment it is positioned. Probes are
        # published until it receives one, so that the events below are after that point.
        probes: set[str] = set()
        while not probes & received:
            assert len(probes) < 50, "the reader received none of 50 probe events"
            probe = capsule_created()
            probes.add(str(probe.id))
            await producer.publish(probe)
            await asyncio.sleep(0.2)
        await producer.publish_batch(sent)
        await asyncio.wait_for(task, 20)

    assert expected <= received


async def test_reader_stops_at_end_offsets(settings: ForgeSettings) -> None:
    sent = [capsule_created() for _ in range(2)]
    async with KafkaEventProducer(settings=settings) as producer:
        await producer.publish_batch(sent)
    reader = KafkaEventLogReader(settings=settings)

    records = [record async for record in reader.read([EventType.CAPSULE_CREATED])]

    ids = [record.headers.get("event_id") for record in records]
    assert {str(event.id) for event in sent} <= set(ids)
    ends = await end_offsets(settings, [CAPSULE_TOPIC])
    assert len(records) <= sum(ends.values())


async def test_reader_skips_unreadable_record(settings: ForgeSettings) -> None:
    before, bad, after = (capsule_created() for _ in range(3))
    async with KafkaEventProducer(settings=settings) as producer:
        await producer.publish(before)
        await write_unreadable_record(settings, CAPSULE_TOPIC, bad.to_json(), str(bad.key))
        await producer.publish(after)
    reader = KafkaEventLogReader(settings=settings)

    with capture_logs() as logs:
        records = [record async for record in reader.read([EventType.CAPSULE_CREATED])]

    ids = {record.headers.get("event_id") for record in records}
    assert {str(before.id), str(after.id)} <= ids
    assert str(bad.id) not in ids
    skipped = [entry for entry in logs if entry["event"] == "kafka_record_unreadable"]
    assert skipped
    assert "UnicodeDecodeError" in skipped[-1]["reason"]


async def test_reader_skips_missing_topic(tmp_path: Path) -> None:
    reader = KafkaEventLogReader(settings=kafka_settings(tmp_path))

    records = [record async for record in reader.read(topics=["forge-test.never-created"])]

    assert records == []
