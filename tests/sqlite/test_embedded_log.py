"""Behaviour of the embedded SQLite backend that other backends do not share."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any
from uuid import uuid4

import pytest

from forge.exceptions import (
    BatchPublishError,
    ConsumerGroupError,
    EventTooLargeError,
    PublishError,
    StorageFullError,
)
from forge.infrastructure.sqlite import capsule_store as capsule_store_module
from forge.infrastructure.sqlite import event_log as event_log_module
from forge.models.capsule import CapsuleCreate, CapsuleUpdate
from forge.models.events import CapsuleDeletedEvent, EventType
from tests.helpers import (
    MAX_EVENT_BYTES,
    WAIT_TIMEOUT_SECONDS,
    BatchRecorder,
    Recorder,
    capsule_created,
    capsule_updated,
    vote_cast,
    wait_until,
)

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@contextmanager
def raw_connection(backend: Any) -> Iterator[sqlite3.Connection]:
    """Open the backend's file directly, as another program on the machine could."""
    with closing(sqlite3.connect(backend.settings.sqlite_path, isolation_level=None)) as db:
        yield db


def disk_full(*args: Any, **kwargs: Any) -> None:
    raise sqlite3.OperationalError("database or disk is full")


# Consumer groups ---------------------------------------------------------------------------------


async def test_second_group_member_rejected(backend: Any) -> None:
    first = backend.make_consumer("search")
    first.register_handler(EventType.VOTE_CAST, Recorder())
    await first.start()
    second = backend.make_consumer("search")
    second.register_handler(EventType.VOTE_CAST, Recorder())

    with pytest.raises(ConsumerGroupError) as caught:
        await second.start()

    message = str(caught.value)
    assert message.startswith(
        f"Consumer group 'search' already has an active member (pid {os.getpid()} on "
    )
    assert "The embedded event log allows one process per consumer group" in message
    assert "stop that process, use another group id" in message
    assert message.endswith("To share a group between processes, run on Kafka.")


async def test_group_free_after_member_stops(backend: Any) -> None:
    first = backend.make_consumer("search")
    first.register_handler(EventType.VOTE_CAST, Recorder())
    await first.start()
    await first.stop()
    vote = vote_cast()
    await backend.publisher.publish(vote)
    second = backend.make_consumer("search")
    recorder = Recorder()
    second.register_handler(EventType.VOTE_CAST, recorder)

    await second.start()
    await second.drain()

    assert recorder.ids == [vote.id]


async def test_silent_member_replaced(backend: Any) -> None:
    first = backend.make_consumer("search", consumer_session_timeout_seconds=0.3)
    first.register_handler(EventType.VOTE_CAST, Recorder())
    await first.start()
    with raw_connection(backend) as db:
        db.execute("UPDATE consumer_members SET heartbeat_at = ?", (time.time() - 60,))
    second = backend.make_consumer("search", consumer_session_timeout_seconds=0.3)
    second.register_handler(EventType.VOTE_CAST, Recorder())

    await second.start()

    with pytest.raises(ConsumerGroupError, match="lost its membership of consumer group 'search'"):
        await first.drain()


async def test_lost_membership_ends_run(backend: Any) -> None:
    first = backend.make_consumer("search", consumer_session_timeout_seconds=0.3)
    first.register_handler(EventType.VOTE_CAST, Recorder())
    await first.start()
    with raw_connection(backend) as db:
        db.execute("DELETE FROM consumer_members")

    loop = asyncio.create_task(first.run())
    await asyncio.wait({loop}, timeout=WAIT_TIMEOUT_SECONDS)

    assert loop.done()
    assert isinstance(loop.exception(), ConsumerGroupError)


async def test_drain_ends_when_stopped(backend: Any) -> None:
    await backend.publisher.publish(vote_cast())
    calls: list[Any] = []

    async def always_fails(event: Any) -> None:
        calls.append(event)
        raise ConnectionError("tally service unreachable")

    consumer = backend.make_consumer(
        "tally", consumer_retry_backoff_seconds=60, consumer_retry_backoff_max_seconds=60
    )
    consumer.register_handler(EventType.VOTE_CAST, always_fails)
    await consumer.start()
    draining = asyncio.create_task(consumer.drain(timeout=WAIT_TIMEOUT_SECONDS))
    await wait_until(lambda: len(calls) == 1, "the handler failed once")

    await consumer.stop()
    handled = await asyncio.wait_for(draining, 2.0)

    assert handled == 0
    assert len(calls) == 1


@pytest.mark.parametrize(
    "change",
    [
        "value = CAST(value AS TEXT)",
        "value = 42",
        "appended_at = 'yesterday'",
        "appended_at = 20260101",
        "headers = 'not json'",
        "key = 7",
    ],
)
async def test_row_changed_by_other_program_handled_or_parked(backend: Any, change: str) -> None:
    # Rows that Forge did not write this way must not stop the group.
    first, second = vote_cast(), vote_cast()
    await backend.publisher.publish(first)
    await backend.publisher.publish(second)
    with raw_connection(backend) as db:
        db.execute(f"UPDATE event_log SET {change} WHERE seq = (SELECT min(seq) FROM event_log)")
    recorder = Recorder()
    consumer = backend.make_consumer("tally")
    consumer.register_handler(EventType.VOTE_CAST, recorder)
    await consumer.start()

    handled = await consumer.drain()

    assert handled == 2
    assert second.id in recorder.ids
    parked = await backend.dead_letters.list(group_id="tally")
    assert len(recorder.ids) + len(parked) == 2


async def test_position_committed_per_topic(backend: Any) -> None:
    await backend.publisher.publish_batch([vote_cast(), vote_cast(), capsule_created()])
    consumer = backend.make_consumer("tally")
    recorder = Recorder()
    consumer.register_handler(EventType.VOTE_CAST, recorder)
    consumer.register_handler(EventType.CAPSULE_CREATED, recorder)

    await consumer.start()
    await consumer.drain()

    with raw_connection(backend) as db:
        rows = db.execute(
            "SELECT topic, next_offset FROM consumer_positions WHERE group_id = 'tally'"
        ).fetchall()
    assert dict(rows) == {"forge.vote.cast": 2, "forge.capsule.created": 1}


async def test_batch_handler_gets_global_append_order(backend: Any) -> None:
    # Kafka orders events per key only; the embedded log keeps the order of every append.
    first, second = uuid4(), uuid4()
    published = [capsule_created(first), capsule_created(second)]
    published += [capsule_updated(key, 1, "title v2") for key in (first, second)]
    published += [CapsuleDeletedEvent.create(key, uuid4(), version="2") for key in (first, second)]
    await backend.publisher.publish_batch(published)
    consumer = backend.make_consumer("projector")
    recorder = BatchRecorder()
    consumer.register_batch_handler(
        [EventType.CAPSULE_CREATED, EventType.CAPSULE_UPDATED, EventType.CAPSULE_DELETED],
        recorder,
        name="projector",
    )

    await consumer.start()
    await consumer.drain()

    assert recorder.ids == [event.id for event in published]


# Atomic writes -----------------------------------------------------------------------------------


async def test_invalid_batch_writes_nothing(backend: Any) -> None:
    # Kafka writes the valid events of such a batch and names only the invalid one as failed.
    batch = [capsule_created(), capsule_created(content="x" * MAX_EVENT_BYTES), capsule_created()]
    with pytest.raises(BatchPublishError) as caught:
        await backend.publisher.publish_batch(batch)
    consumer = backend.make_consumer("projector")
    recorder = Recorder()
    consumer.register_handler(EventType.CAPSULE_CREATED, recorder)

    await consumer.start()
    await consumer.drain()

    assert recorder.events == []
    assert set(caught.value.failed) == {event.id for event in batch}
    assert isinstance(caught.value.failed[batch[1].id], EventTooLargeError)
    assert caught.value.acknowledged == 0
    assert str(caught.value).startswith("1 of 3 events are invalid, so none was written.")


async def test_failed_append_writes_no_event(backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    real_append = event_log_module.append_records

    def append_then_fail(connection: sqlite3.Connection, records: Any) -> Any:
        real_append(connection, list(records)[:1])
        disk_full()

    monkeypatch.setattr(event_log_module, "append_records", append_then_fail)

    with pytest.raises(PublishError, match="none was written: Writing to .* disk is full"):
        await backend.publisher.publish_batch([vote_cast(), vote_cast()])

    monkeypatch.undo()
    consumer = backend.make_consumer("tally")
    recorder = Recorder()
    consumer.register_handler(EventType.VOTE_CAST, recorder)
    await consumer.start()
    await consumer.drain()
    assert recorder.events == []


async def test_failed_event_append_keeps_no_capsule(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = uuid4()
    monkeypatch.setattr(capsule_store_module, "append_events", disk_full)

    with pytest.raises(StorageFullError, match="Nothing of this write was stored"):
        await backend.capsules.create(CapsuleCreate(owner_id=owner, capsule_type="knowledge"))

    assert await backend.capsule_store.list(owner_id=owner, include_deleted=True) == []


async def test_failed_event_append_keeps_old_version(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await backend.capsules.create(
        CapsuleCreate(owner_id=uuid4(), capsule_type="knowledge", title="v1")
    )
    monkeypatch.setattr(capsule_store_module, "append_events", disk_full)

    with pytest.raises(StorageFullError):
        await backend.capsules.update(created.id, CapsuleUpdate(title="v2"), actor_id=uuid4())

    assert await backend.capsules.get(created.id) == created


async def test_failed_event_append_keeps_capsule_live(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await backend.capsules.create(
        CapsuleCreate(owner_id=uuid4(), capsule_type="knowledge")
    )
    monkeypatch.setattr(capsule_store_module, "append_events", disk_full)

    with pytest.raises(StorageFullError):
        await backend.capsules.delete(created.id, actor_id=uuid4())

    assert await backend.capsules.get(created.id) == created


# Audit trail and replay --------------------------------------------------------------------------


async def test_audit_trail_rejects_update(backend: Any) -> None:
    await backend.audit_store.record([capsule_created()])

    with raw_connection(backend) as db:
        with pytest.raises(sqlite3.IntegrityError, match="the audit trail is append-only"):
            db.execute("UPDATE audit_trail SET actor_id = NULL")


async def test_audit_trail_rejects_delete(backend: Any) -> None:
    await backend.audit_store.record([capsule_created()])

    with raw_connection(backend) as db:
        with pytest.raises(sqlite3.IntegrityError, match="the audit trail is append-only"):
            db.execute("DELETE FROM audit_trail")

    assert await backend.audit_store.count() == 1


async def test_tampered_capsule_row_reported(backend: Any) -> None:
    created = await backend.capsules.create(
        CapsuleCreate(owner_id=uuid4(), capsule_type="knowledge", title="Offsets")
    )
    with raw_connection(backend) as db:
        db.execute("UPDATE capsules SET title = 'Tampered' WHERE id = ?", (str(created.id),))

    result = await backend.replayer.replay(created.id)

    assert not result.matches
    assert [(d.field, d.rebuilt, d.stored) for d in result.differences] == [
        ("title", "Offsets", "Tampered")
    ]


async def test_capsule_without_events_reported(backend: Any) -> None:
    created = await backend.capsules.create(
        CapsuleCreate(owner_id=uuid4(), capsule_type="knowledge")
    )
    with raw_connection(backend) as db:
        db.execute("DELETE FROM event_log WHERE key = ?", (str(created.id),))

    result = await backend.replayer.replay(created.id)

    assert result.rebuilt is None
    assert [d.field for d in result.differences] == ["<capsule>"]
