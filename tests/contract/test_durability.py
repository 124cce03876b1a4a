"""Contract of durability: after a clean restart on the same data, nothing accepted is lost."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

from forge.core.audit.store import AuditQuery
from forge.core.events.dead_letters import DeadLetterStatus
from forge.models.capsule import CapsuleCreate, CapsuleUpdate
from forge.models.events import EventType
from tests.helpers import Recorder, capsule_created, failing_handler, vote_cast


async def consume_votes(backend: Any, group_id: str) -> Recorder:
    consumer = backend.make_consumer(group_id)
    recorder = Recorder()
    consumer.register_handler(EventType.VOTE_CAST, recorder)
    await consumer.start()
    await consumer.drain()
    await consumer.stop()
    return recorder


async def test_published_events_survive_restart(backend: Any) -> None:
    published = [vote_cast() for _ in range(3)]
    await backend.publisher.publish_batch(published)

    await backend.restart()

    recorder = await consume_votes(backend, "tally")
    # Three votes, three keys: compared without order, which only the embedded log keeps.
    assert sorted(recorder.ids) == sorted(event.id for event in published)


async def test_positions_survive_restart(backend: Any) -> None:
    handled = [vote_cast() for _ in range(3)]
    await backend.publisher.publish_batch(handled)
    await consume_votes(backend, "tally")

    await backend.restart()

    later = vote_cast()
    await backend.publisher.publish(later)
    recorder = await consume_votes(backend, "tally")
    assert recorder.ids == [later.id]


async def test_offsets_continue_after_restart(backend: Any) -> None:
    before = vote_cast()
    await backend.publisher.publish(before)
    await backend.restart()
    after = vote_cast()

    await backend.publisher.publish(after)

    recorder = await consume_votes(backend, "tally")
    # Two votes, two keys: compared without order, which only the embedded log keeps.
    assert sorted(recorder.ids) == sorted([before.id, after.id])


async def test_dead_letters_survive_restart(backend: Any) -> None:
    poison = capsule_created()
    await backend.publisher.publish(poison)
    failing, _ = failing_handler(RuntimeError("index shard 3 is read-only"))
    consumer = backend.make_consumer("search")
    consumer.register_handler(EventType.CAPSULE_CREATED, failing, name="indexer")
    await consumer.start()
    await consumer.drain()
    await consumer.stop()

    await backend.restart()

    [letter] = await backend.dead_letters.list(group_id="search")
    assert letter.event_id == str(poison.id)
    assert letter.reason == "index shard 3 is read-only"
    assert letter.status is DeadLetterStatus.PARKED


async def test_letter_retried_after_restart(backend: Any) -> None:
    await backend.publisher.publish(capsule_created())
    failing, _ = failing_handler(RuntimeError("index shard 3 is read-only"))
    consumer = backend.make_consumer("search")
    consumer.register_handler(EventType.CAPSULE_CREATED, failing, name="indexer")
    await consumer.start()
    await consumer.drain()
    await consumer.stop()
    await backend.restart()
    await backend.dead_letters.request_retry(group_id="search")
    restarted = backend.make_consumer("search")
    restarted.register_handler(EventType.CAPSULE_CREATED, Recorder(), name="indexer")

    await restarted.start()
    await restarted.drain()

    [letter] = await backend.dead_letters.list(group_id="search")
    assert letter.status is DeadLetterStatus.RESOLVED


async def test_audit_trail_survives_restart(backend: Any) -> None:
    recorded = [capsule_created(), vote_cast()]
    await backend.audit_store.record(recorded)

    await backend.restart()

    page = await backend.audit_store.query(AuditQuery())
    assert {entry.event.id for entry in page.entries} == {event.id for event in recorded}
    assert await backend.audit_store.record(recorded) == 0


async def test_capsules_survive_restart(backend: Any) -> None:
    owner = uuid4()
    created = await backend.capsules.create(
        CapsuleCreate(owner_id=owner, capsule_type="knowledge", title="Offsets")
    )
    updated = await backend.capsules.update(
        created.id, CapsuleUpdate(title="Offsets and positions"), actor_id=owner
    )

    await backend.restart()

    assert await backend.capsules.get(created.id) == updated
    assert (await backend.replayer.replay(created.id)).matches
