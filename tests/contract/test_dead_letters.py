"""Contract of handler failures: bounded retries, parking with the reason, and redelivery."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from uuid import uuid4

import pytest

from forge.core.events.dead_letters import DECODE_STAGE, DeadLetterStatus
from forge.exceptions import EventRejectedError
from forge.models.events import Event, EventType
from tests.helpers import BatchRecorder, Recorder, capsule_created, failing_handler


def is_poison(event: Event[Any]) -> bool:
    return event.data.title == "poison"


async def publish_around_poison(backend: Any) -> list[Event[Any]]:
    """Publish a good event, a poison one and another good one; return them in that order.

    They share one key, so that every backend keeps their order: Kafka orders events per key
    (partition), not between keys.
    """
    key = uuid4()
    events = [capsule_created(key), capsule_created(key, title="poison"), capsule_created(key)]
    for event in events:
        await backend.publisher.publish(event)
    return events


async def park_one(backend: Any, error: Exception, event: Event[Any] | None = None) -> Any:
    """Publish `event` (a new capsule by default) and park it in group `search`.

    Its `indexer` handler always raises `error`. Returns the started consumer.
    """
    await backend.publisher.publish(event or capsule_created())
    failing, _ = failing_handler(error)
    consumer = backend.make_consumer("search")
    consumer.register_handler(EventType.CAPSULE_CREATED, failing, name="indexer")
    await consumer.start()
    await consumer.drain()
    return consumer


async def test_failing_handler_parks_event(backend: Any) -> None:
    before, poison, after = await publish_around_poison(backend)
    indexer, calls = failing_handler(RuntimeError("index shard 3 is read-only"), fail_for=is_poison)
    consumer = backend.make_consumer("search")
    consumer.register_handler(EventType.CAPSULE_CREATED, indexer, name="indexer")

    await consumer.start()
    await consumer.drain()

    [letter] = await backend.dead_letters.list(group_id="search")
    assert letter.event_id == str(poison.id)
    assert letter.reason == "index shard 3 is read-only"
    assert letter.error_type == "RuntimeError"
    assert letter.handler == "indexer"
    assert letter.attempts == backend.settings.consumer_max_attempts
    assert letter.status is DeadLetterStatus.PARKED
    assert letter.event_type == "capsule.created"


async def test_handler_retried_up_to_max_attempts(backend: Any) -> None:
    _, poison, _ = await publish_around_poison(backend)
    indexer, calls = failing_handler(RuntimeError("read-only"), fail_for=is_poison)
    consumer = backend.make_consumer("search")
    consumer.register_handler(EventType.CAPSULE_CREATED, indexer, name="indexer")

    await consumer.start()
    await consumer.drain()

    attempts = [event.id for event in calls if event.id == poison.id]
    assert len(attempts) == backend.settings.consumer_max_attempts


async def test_later_events_flow_past_poison(backend: Any) -> None:
    before, poison, after = await publish_around_poison(backend)
    indexer, calls = failing_handler(RuntimeError("read-only"), fail_for=is_poison)
    consumer = backend.make_consumer("search")
    consumer.register_handler(EventType.CAPSULE_CREATED, indexer, name="indexer")

    await consumer.start()
    await consumer.drain()

    handled = [event.id for event in calls if event.id != poison.id]
    assert handled == [before.id, after.id]


async def test_other_handlers_get_poison_event(backend: Any) -> None:
    _, poison, _ = await publish_around_poison(backend)
    indexer, _ = failing_handler(RuntimeError("read-only"), fail_for=is_poison)
    notifier = Recorder()
    consumer = backend.make_consumer("search")
    consumer.register_handler(EventType.CAPSULE_CREATED, indexer, name="indexer")
    consumer.register_handler(EventType.CAPSULE_CREATED, notifier, name="notifier")

    await consumer.start()
    await consumer.drain()

    assert poison.id in notifier.ids
    assert len(notifier.ids) == 3


async def test_parked_event_not_redelivered_after_restart(backend: Any) -> None:
    await publish_around_poison(backend)
    indexer, calls = failing_handler(RuntimeError("read-only"), fail_for=is_poison)
    first_run = backend.make_consumer("search")
    first_run.register_handler(EventType.CAPSULE_CREATED, indexer, name="indexer")
    await first_run.start()
    await first_run.drain()
    await first_run.stop()
    calls.clear()
    second_run = backend.make_consumer("search")
    second_run.register_handler(EventType.CAPSULE_CREATED, indexer, name="indexer")

    await second_run.start()
    await second_run.drain()

    assert calls == []


async def test_default_handler_name_in_letter(backend: Any) -> None:
    await backend.publisher.publish(capsule_created())

    async def index_capsule(event: Event[Any]) -> None:
        raise RuntimeError("read-only")

    consumer = backend.make_consumer("search")
    consumer.register_handler(EventType.CAPSULE_CREATED, index_capsule)

    await consumer.start()
    await consumer.drain()

    [letter] = await backend.dead_letters.list(group_id="search")
    assert letter.handler == f"{__name__}.{index_capsule.__qualname__}"


async def test_rejected_event_parked_at_once(backend: Any) -> None:
    await backend.publisher.publish(capsule_created())
    reject, calls = failing_handler(EventRejectedError("capsule type 'knowledge' is retired"))
    consumer = backend.make_consumer("search")
    consumer.register_handler(EventType.CAPSULE_CREATED, reject, name="validator")

    await consumer.start()
    await consumer.drain()

    [letter] = await backend.dead_letters.list(group_id="search")
    assert len(calls) == 1
    assert letter.attempts == 1
    assert letter.error_type == "EventRejectedError"
    assert letter.reason == "capsule type 'knowledge' is retired"


async def test_letters_belong_to_their_group(backend: Any) -> None:
    await backend.publisher.publish(capsule_created())
    failing, _ = failing_handler(RuntimeError("read-only"))
    search = backend.make_consumer("search")
    search.register_handler(EventType.CAPSULE_CREATED, failing, name="indexer")
    audit = backend.make_consumer("audit")
    audit.register_handler(EventType.CAPSULE_CREATED, Recorder(), name="recorder")

    for consumer in (search, audit):
        await consumer.start()
        await consumer.drain()

    assert len(await backend.dead_letters.list(group_id="search")) == 1
    assert await backend.dead_letters.list(group_id="audit") == []


async def test_retry_request_redelivers_letter(backend: Any) -> None:
    _, poison, _ = await publish_around_poison(backend)
    index_online = False
    indexed: list[Event[Any]] = []

    async def indexer(event: Event[Any]) -> None:
        if is_poison(event) and not index_online:
            raise ConnectionError("search index unreachable")
        indexed.append(event)

    consumer = backend.make_consumer("search")
    consumer.register_handler(EventType.CAPSULE_CREATED, indexer, name="indexer")
    await consumer.start()
    await consumer.drain()
    [letter] = await backend.dead_letters.list(group_id="search")
    index_online = True

    requested = await backend.dead_letters.request_retry([letter.id])
    await consumer.drain()

    [resolved] = await backend.dead_letters.list(group_id="search")
    assert requested == 1
    assert resolved.status is DeadLetterStatus.RESOLVED
    assert indexed[-1].id == poison.id
    assert len(indexed) == 3


async def test_retry_goes_to_failed_handler_only(backend: Any) -> None:
    await backend.publisher.publish(capsule_created())
    index_online = False
    notifier = Recorder()

    async def indexer(event: Event[Any]) -> None:
        if not index_online:
            raise ConnectionError("search index unreachable")

    consumer = backend.make_consumer("search")
    consumer.register_handler(EventType.CAPSULE_CREATED, indexer, name="indexer")
    consumer.register_handler(EventType.CAPSULE_CREATED, notifier, name="notifier")
    await consumer.start()
    await consumer.drain()
    index_online = True

    await backend.dead_letters.request_retry(group_id="search")
    await consumer.drain()

    assert len(notifier.ids) == 1


async def test_failed_retry_parks_letter_again(backend: Any) -> None:
    consumer = await park_one(backend, ConnectionError("search index unreachable"))

    await backend.dead_letters.request_retry(group_id="search")
    await consumer.drain()

    [letter] = await backend.dead_letters.list(group_id="search")
    assert letter.status is DeadLetterStatus.PARKED
    assert letter.attempts == 2 * backend.settings.consumer_max_attempts


async def test_retry_request_counts_parked_only(backend: Any) -> None:
    await park_one(backend, RuntimeError("read-only"))

    first = await backend.dead_letters.request_retry(group_id="search")
    second = await backend.dead_letters.request_retry(group_id="search")

    assert first == 1
    assert second == 0


async def test_letters_filtered_by_status(backend: Any) -> None:
    await park_one(backend, RuntimeError("read-only"))

    await backend.dead_letters.request_retry(group_id="search")

    requested = await backend.dead_letters.list(status=DeadLetterStatus.RETRY_REQUESTED)
    parked = await backend.dead_letters.list(status=DeadLetterStatus.PARKED)
    assert len(requested) == 1
    assert parked == []


async def test_letter_keeps_original_record(backend: Any) -> None:
    event = capsule_created()

    await park_one(backend, RuntimeError("read-only"), event)

    [letter] = await backend.dead_letters.list(group_id="search")
    assert letter.value == event.to_json()
    assert letter.topic == "forge.capsule.created"
    assert letter.key == str(event.resource_id)


async def test_batch_failure_parks_only_poison(backend: Any) -> None:
    key = uuid4()  # one key, so that every backend keeps the events' order
    events = [capsule_created(key) for _ in range(2)]
    events.append(capsule_created(key, title="poison"))
    events.extend(capsule_created(key) for _ in range(2))
    await backend.publisher.publish_batch(events)
    projected = BatchRecorder()

    async def projector(batch: Sequence[Event[Any]]) -> None:
        if any(is_poison(event) for event in batch):
            raise ValueError("projection rejects a capsule titled 'poison'")
        await projected(batch)

    consumer = backend.make_consumer("projection")
    consumer.register_batch_handler([EventType.CAPSULE_CREATED], projector, name="projector")

    await consumer.start()
    await consumer.drain()

    [letter] = await backend.dead_letters.list(group_id="projection")
    assert letter.event_id == str(events[2].id)
    assert letter.handler == "projector"
    assert letter.reason == "projection rejects a capsule titled 'poison'"
    assert projected.ids == [event.id for event in events if not is_poison(event)]


@pytest.mark.parametrize("max_attempts", [1, 2])
async def test_max_attempts_setting_honoured(backend: Any, max_attempts: int) -> None:
    await backend.publisher.publish(capsule_created())
    failing, calls = failing_handler(RuntimeError("read-only"))
    consumer = backend.make_consumer("search", consumer_max_attempts=max_attempts)
    consumer.register_handler(EventType.CAPSULE_CREATED, failing, name="indexer")

    await consumer.start()
    await consumer.drain()

    [letter] = await backend.dead_letters.list(group_id="search")
    assert len(calls) == max_attempts
    assert letter.attempts == max_attempts


async def test_unparsable_letter_names_event(backend: Any) -> None:
    event = capsule_created()
    broken = json.loads(event.to_json())
    broken["data"]["capsule_type"] = 42
    await backend.append_raw(event.topic, json.dumps(broken).encode(), key=event.key)
    consumer = backend.make_consumer("named-letters")
    consumer.register_handler(EventType.CAPSULE_CREATED, Recorder())
    await consumer.start()
    await consumer.drain()

    letters = await backend.dead_letters.list(group_id="named-letters")

    assert len(letters) == 1
    assert letters[0].handler == "decode"
    assert letters[0].event_id == str(event.id)
    assert letters[0].event_type == "capsule.created"


async def test_letter_keeps_handler_traceback(backend: Any) -> None:
    async def indexer(event: Event[Any]) -> None:
        raise ConnectionError("search index unreachable")

    await backend.publisher.publish(capsule_created())
    consumer = backend.make_consumer("search")
    consumer.register_handler(EventType.CAPSULE_CREATED, indexer, name="indexer")
    await consumer.start()
    await consumer.drain()

    [letter] = await backend.dead_letters.list(group_id="search")
    lines = letter.extra["traceback"].splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "ConnectionError: search index unreachable"
    assert any(", in indexer" in line for line in lines)


async def test_failed_retry_replaces_traceback(backend: Any) -> None:
    failure: Exception = TimeoutError("index timed out")

    async def indexer(event: Event[Any]) -> None:
        raise failure

    await backend.publisher.publish(capsule_created())
    consumer = backend.make_consumer("search")
    consumer.register_handler(EventType.CAPSULE_CREATED, indexer, name="indexer")
    await consumer.start()
    await consumer.drain()
    [first] = await backend.dead_letters.list(group_id="search")
    failure = KeyError("shard 4")

    await backend.dead_letters.request_retry(group_id="search")
    await consumer.drain()

    [again] = await backend.dead_letters.list(group_id="search")
    assert first.extra["traceback"].endswith("TimeoutError: index timed out\n")
    assert again.extra["traceback"].endswith("KeyError: 'shard 4'\n")
    assert again.reason == "'shard 4'"


async def test_invalid_record_letter_has_no_traceback(backend: Any) -> None:
    await backend.append_raw("forge.capsule.created", b'{"type": "capsule.created"}')
    consumer = backend.make_consumer("search")
    consumer.register_handler(EventType.CAPSULE_CREATED, Recorder(), name="indexer")
    await consumer.start()
    await consumer.drain()

    [letter] = await backend.dead_letters.list(group_id="search")
    assert letter.error_type == "EventValidationError"
    assert dict(letter.extra) == {}


async def test_message_with_lone_surrogate_parked(backend: Any) -> None:
    # UTF-8 cannot encode a lone surrogate, for the store or a Kafka header, so the letter
    # keeps the message with it escaped.
    async def indexer(event: Event[Any]) -> None:
        raise RuntimeError("title 'a\ud800b' rejected")

    await backend.publisher.publish(capsule_created())
    consumer = backend.make_consumer("search")
    consumer.register_handler(EventType.CAPSULE_CREATED, indexer, name="indexer")
    await consumer.start()
    handled = await consumer.drain()

    [letter] = await backend.dead_letters.list(group_id="search")
    assert handled == 1
    assert letter.reason == "title 'a\\ud800b' rejected"
    assert letter.extra["traceback"].endswith("RuntimeError: title 'a\\ud800b' rejected\n")


async def test_nul_in_message_and_key_parked(backend: Any) -> None:
    # PostgreSQL's text and jsonb cannot hold NUL, so its store writes it as \x00.
    async def indexer(event: Event[Any]) -> None:
        raise RuntimeError("shard\x00 3")

    event = capsule_created()
    await backend.append_raw(
        event.topic, event.to_json(), key="k\x00", headers={"trace\x00": "t\x00"}
    )
    await backend.publisher.publish(capsule_created())
    consumer = backend.make_consumer("search")
    consumer.register_handler(EventType.CAPSULE_CREATED, indexer, name="indexer")
    await consumer.start()
    handled = await consumer.drain()

    letters = await backend.dead_letters.list(group_id="search")
    assert handled == 2
    assert len(letters) == 2
    keyed, failed = sorted(letters, key=lambda letter: letter.handler)
    assert keyed.handler == DECODE_STAGE
    assert keyed.key in ("k\x00", "k\\x00")
    assert failed.reason in ("shard\x00 3", "shard\\x00 3")


async def test_retry_ids_beyond_64_bits_ignored(backend: Any) -> None:
    await park_one(backend, RuntimeError("read-only"))
    [letter] = await backend.dead_letters.list(group_id="search")

    requested = await backend.dead_letters.request_retry([2**70, letter.id, -(2**64)])

    assert requested == 1
