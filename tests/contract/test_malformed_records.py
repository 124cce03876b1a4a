"""Contract of bad input: malformed records are parked with the reason, bad batches rejected."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from forge.core.events.dead_letters import DECODE_STAGE, DeadLetterStatus
from forge.exceptions import BatchPublishError, EventTooLargeError, EventValidationError
from forge.models.events import EventType
from tests.helpers import MAX_EVENT_BYTES, Recorder, capsule_created, vote_cast


def _capsule_with(**changes: Any) -> bytes:
    values = capsule_created().to_dict()
    values.update(changes)
    return orjson.dumps(values)


def _capsule_without_capsule_type() -> bytes:
    values = capsule_created().to_dict()
    del values["data"]["capsule_type"]
    return orjson.dumps(values)


def _capsule_nested(depth: int) -> bytes:
    """Return a capsule.created event whose metadata nests `depth` arrays."""
    shallow = _capsule_with(metadata={"m": "here"})
    return shallow.replace(b'"here"', b"[" * depth + b"]" * depth)


def _capsule_keyed_in_upper_case() -> tuple[bytes, str]:
    values = capsule_created().to_dict()
    values["resource_id"] = values["resource_id"].upper()
    return orjson.dumps(values), values["resource_id"]


_UPPER_CASE_KEYED = _capsule_keyed_in_upper_case()


def _vote_weighing(weight: object) -> bytes:
    values = vote_cast().to_dict()
    values["data"]["weight"] = weight
    return orjson.dumps(values)


@dataclass(frozen=True)
class Malformed:
    topic: str
    value: Callable[[], bytes]
    reason: str
    error_type: str
    headers: dict[str, str] | None = None
    key: str | None = None


MALFORMED = {
    "not_json": Malformed(
        "forge.capsule.created",
        lambda: b"capsule 42 created",
        "Event is not valid JSON",
        "EventValidationError",
    ),
    "json_array": Malformed(
        "forge.capsule.created",
        lambda: b'["capsule.created"]',
        "Event must be a JSON object, got list.",
        "EventValidationError",
    ),
    "unknown_type": Malformed(
        "forge.capsule.created",
        lambda: _capsule_with(type="capsule.moved"),
        "Unknown event type 'capsule.moved'. Known types: ",
        "UnknownEventTypeError",
    ),
    "missing_field": Malformed(
        "forge.capsule.created",
        _capsule_without_capsule_type,
        "Invalid capsule.created event: data.capsule_type=<missing>: Field required.",
        "EventValidationError",
    ),
    "wrong_type": Malformed(
        "forge.vote.cast",
        lambda: _vote_weighing("heavy"),
        "Invalid vote.cast event: data.weight='heavy': Input should be a valid number.",
        "EventValidationError",
    ),
    "newer_schema": Malformed(
        "forge.capsule.created",
        lambda: _capsule_with(schema_version=99),
        "The capsule.created event has schema_version 99, newer than the 1 this code knows.",
        "EventSchemaError",
    ),
    "invalid_utf8": Malformed(
        "forge.capsule.created",
        lambda: b'{"type": "capsule.created", "title": "\xff\xfe"}',
        "Record is not valid UTF-8 (byte ",
        "EventValidationError",
    ),
    "oversized": Malformed(
        "forge.capsule.created",
        lambda: _capsule_with(metadata={"blob": "x" * MAX_EVENT_BYTES}),
        f"bytes, over the limit of {MAX_EVENT_BYTES} bytes; it was not parsed.",
        "EventTooLargeError",
    ),
    "wrong_topic": Malformed(
        "forge.capsule.created",
        lambda: vote_cast().to_json(),
        "Record in topic 'forge.capsule.created' holds a vote.cast event, which belongs in "
        "'forge.vote.cast'",
        "EventValidationError",
    ),
    "header_mismatch": Malformed(
        "forge.capsule.created",
        lambda: capsule_created().to_json(),
        "Header event_type='vote.cast' does not match the value's type 'capsule.created'",
        "EventValidationError",
        {"event_type": "vote.cast"},
    ),
    "nested_too_deep": Malformed(
        "forge.capsule.created",
        lambda: _capsule_nested(600),
        "is nested deeper than 100 levels, or contains itself",
        "EventValidationError",
    ),
    # The value and the key write the id the same way, but not in canonical form: the key
    # would place the record in another partition and hide it from lookups by resource.
    "key_not_canonical": Malformed(
        "forge.capsule.created",
        lambda: _UPPER_CASE_KEYED[0],
        f"Record key {_UPPER_CASE_KEYED[1]!r} does not match the event's resource_id",
        "EventValidationError",
        key=_UPPER_CASE_KEYED[1],
    ),
}


@pytest.fixture(params=sorted(MALFORMED))
def malformed(request: pytest.FixtureRequest) -> Malformed:
    return MALFORMED[request.param]


async def consume_around(backend: Any, malformed: Malformed) -> Recorder:
    """Publish a good event, append the malformed record, publish another good one, consume."""
    await backend.publisher.publish(capsule_created())
    await backend.append_raw(
        malformed.topic, malformed.value(), key=malformed.key, headers=malformed.headers
    )
    await backend.publisher.publish(vote_cast())
    consumer = backend.make_consumer("projector")
    recorder = Recorder()
    consumer.register_handler(EventType.CAPSULE_CREATED, recorder)
    consumer.register_handler(EventType.VOTE_CAST, recorder)
    await consumer.start()
    await consumer.drain()
    return recorder


async def test_malformed_record_parked(backend: Any, malformed: Malformed) -> None:
    await consume_around(backend, malformed)

    [letter] = await backend.dead_letters.list(group_id="projector")
    assert malformed.reason in letter.reason
    assert letter.error_type == malformed.error_type
    assert letter.handler == DECODE_STAGE
    assert letter.topic == malformed.topic


async def test_malformed_record_blocks_nothing(backend: Any, malformed: Malformed) -> None:
    recorder = await consume_around(backend, malformed)

    # Two topics, whose relative order only the embedded log keeps (README, "Limits").
    assert sorted(event.type for event in recorder.events) == [
        EventType.CAPSULE_CREATED,
        EventType.VOTE_CAST,
    ]


async def test_malformed_record_kept_verbatim(backend: Any) -> None:
    value = b"\x00\x01 not an event"
    await backend.append_raw("forge.capsule.created", value)
    consumer = backend.make_consumer("projector")
    consumer.register_handler(EventType.CAPSULE_CREATED, Recorder())

    await consumer.start()
    await consumer.drain()

    [letter] = await backend.dead_letters.list(group_id="projector")
    assert letter.value == value


async def test_retried_malformed_record_parked_again(backend: Any) -> None:
    await backend.append_raw("forge.capsule.created", b"capsule 42 created")
    consumer = backend.make_consumer("projector")
    consumer.register_handler(EventType.CAPSULE_CREATED, Recorder())
    await consumer.start()
    await consumer.drain()

    await backend.dead_letters.request_retry(group_id="projector")
    await consumer.drain()

    [letter] = await backend.dead_letters.list(group_id="projector")
    assert letter.status is DeadLetterStatus.PARKED
    assert letter.attempts == 2


async def test_oversized_publish_rejected(backend: Any) -> None:
    event = capsule_created(content="x" * MAX_EVENT_BYTES)

    with pytest.raises(EventTooLargeError) as caught:
        await backend.publisher.publish(event)

    assert f"over the limit of {MAX_EVENT_BYTES} bytes" in str(caught.value)
    assert caught.value.retriable is False


async def test_oversized_batch_event_named(backend: Any) -> None:
    first, oversized, last = (
        capsule_created(),
        capsule_created(content="x" * MAX_EVENT_BYTES),
        capsule_created(),
    )

    with pytest.raises(BatchPublishError) as caught:
        await backend.publisher.publish_batch([first, oversized, last])

    # The embedded log writes no event of such a batch, Kafka writes the valid ones (README,
    # "At scale"); tests/sqlite checks that nothing is written.
    assert isinstance(caught.value.failed[oversized.id], EventTooLargeError)
    assert caught.value.acknowledged == 3 - len(caught.value.failed)
    assert caught.value.retriable is False
    assert str(caught.value).startswith("1 of 3 events ")


async def test_unencodable_batch_event_named(backend: Any) -> None:
    first, unencodable, last = (
        capsule_created(),
        capsule_created(metadata={"note": "half of a pair \ud83d"}),
        capsule_created(),
    )

    with pytest.raises(BatchPublishError) as caught:
        await backend.publisher.publish_batch([first, unencodable, last])

    error = caught.value.failed[unencodable.id]
    assert isinstance(error, EventValidationError)
    assert "lone surrogates" in str(error)
    assert caught.value.acknowledged == 3 - len(caught.value.failed)
    assert caught.value.retriable is False


async def test_batch_failure_lists_unwritten_events(backend: Any) -> None:
    batch = [capsule_created(), capsule_created(content="x" * MAX_EVENT_BYTES), capsule_created()]
    with pytest.raises(BatchPublishError) as caught:
        await backend.publisher.publish_batch(batch)
    consumer = backend.make_consumer("projector")
    recorder = Recorder()
    consumer.register_handler(EventType.CAPSULE_CREATED, recorder)

    await consumer.start()
    await consumer.drain()

    # Whether a backend writes the valid events of the batch or none, `failed` names exactly
    # the events that were not written.
    written = set(recorder.ids)
    assert set(caught.value.failed) == {event.id for event in batch} - written
    assert batch[1].id in caught.value.failed
    assert caught.value.acknowledged == len(written)


async def test_batch_resent_without_invalid_event(backend: Any) -> None:
    first, oversized, last = (
        capsule_created(),
        capsule_created(content="x" * MAX_EVENT_BYTES),
        capsule_created(),
    )
    with pytest.raises(BatchPublishError) as caught:
        await backend.publisher.publish_batch([first, oversized, last])
    # Sent again: exactly the events named as not written, without the invalid one.
    await backend.publisher.publish_batch(
        [event for event in (first, last) if event.id in caught.value.failed]
    )
    consumer = backend.make_consumer("projector")
    recorder = Recorder()
    consumer.register_handler(EventType.CAPSULE_CREATED, recorder)

    await consumer.start()
    await consumer.drain()

    # Two capsules, two keys: compared without order, which only the embedded log keeps.
    assert sorted(recorder.ids) == sorted([first.id, last.id])
