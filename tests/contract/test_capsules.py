"""Contract of the capsule store and service: versions, lineage, conflicts, state with its event."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

import pytest

from forge.exceptions import ConflictError, EventTooLargeError, NotFoundError
from forge.models.capsule import Capsule, CapsuleCreate, CapsuleUpdate
from forge.models.events import (
    CapsuleCreatedEvent,
    CapsuleDeletedEvent,
    CapsuleUpdatedEvent,
    Event,
    EventType,
)
from tests.helpers import MAX_EVENT_BYTES, Recorder

CAPSULE_TYPES = [EventType.CAPSULE_CREATED, EventType.CAPSULE_UPDATED, EventType.CAPSULE_DELETED]


def draft(owner_id: UUID | None = None, **fields: Any) -> CapsuleCreate:
    values: dict[str, Any] = {
        "owner_id": owner_id or uuid4(),
        "capsule_type": "knowledge",
        "title": "Consumer groups",
        "content": "Each group keeps its own position per partition.",
    }
    values.update(fields)
    return CapsuleCreate(**values)


async def capsule_events(backend: Any) -> list[Event[Any]]:
    """Return every capsule event in the log, read by a new consumer group."""
    consumer = backend.make_consumer(f"reader-{uuid4()}")
    recorder = Recorder()
    for event_type in CAPSULE_TYPES:
        consumer.register_handler(event_type, recorder)
    await consumer.start()
    await consumer.drain()
    await consumer.stop()
    return recorder.events


# Create ------------------------------------------------------------------------------------------


async def test_created_capsule_readable(backend: Any) -> None:
    created = await backend.capsules.create(draft())

    assert await backend.capsules.get(created.id) == created
    assert created.version == "1"


async def test_create_emits_created_event(backend: Any) -> None:
    created = await backend.capsules.create(draft(title="Offsets"))

    [event] = await capsule_events(backend)
    assert type(event) is CapsuleCreatedEvent
    assert event.resource_id == created.id
    assert event.actor_id == created.owner_id
    assert event.data.title == "Offsets"
    assert event.data.version == "1"
    assert event.timestamp == created.created_at


async def test_child_keeps_parent_id(backend: Any) -> None:
    parent = await backend.capsules.create(draft())

    child = await backend.capsules.create(draft(parent_id=parent.id))

    # Two capsules, two keys: found by id, since only the embedded log orders them.
    events = await capsule_events(backend)
    [event] = [event for event in events if event.resource_id == child.id]
    assert len(events) == 2
    assert child.parent_id == parent.id
    assert event.data.parent_id == parent.id


async def test_missing_parent_rejected(backend: Any) -> None:
    owner, parent_id = uuid4(), uuid4()

    with pytest.raises(NotFoundError) as caught:
        await backend.capsules.create(draft(owner, parent_id=parent_id))

    assert str(caught.value).startswith(f"Parent capsule {parent_id} not found")
    assert await backend.capsule_store.list(owner_id=owner) == []
    assert await capsule_events(backend) == []


async def test_deleted_parent_rejected(backend: Any) -> None:
    parent = await backend.capsules.create(draft())
    await backend.capsules.delete(parent.id, actor_id=parent.owner_id)

    with pytest.raises(NotFoundError, match=f"Parent capsule {parent.id} not found"):
        await backend.capsules.create(draft(parent_id=parent.id))


async def test_taken_id_conflicts(backend: Any) -> None:
    first = await backend.capsules.create(draft(title="first"))

    with pytest.raises(ConflictError, match=f"Capsule {first.id} already exists"):
        await backend.capsules.create(draft(title="second"), capsule_id=first.id)

    assert (await backend.capsules.get(first.id)).title == "first"
    assert len(await capsule_events(backend)) == 1


async def test_oversized_capsule_stores_nothing(backend: Any) -> None:
    owner = uuid4()

    with pytest.raises(EventTooLargeError):
        await backend.capsules.create(draft(owner, content="x" * (MAX_EVENT_BYTES + 1)))

    assert await backend.capsule_store.list(owner_id=owner) == []
    assert await capsule_events(backend) == []


# Update ------------------------------------------------------------------------------------------


async def test_update_bumps_version(backend: Any) -> None:
    created = await backend.capsules.create(draft())

    updated = await backend.capsules.update(
        created.id, CapsuleUpdate(title="Offsets"), actor_id=created.owner_id
    )

    assert updated.version == "2"
    assert await backend.capsules.get(created.id) == updated


async def test_update_event_lists_changed_fields(backend: Any) -> None:
    created = await backend.capsules.create(draft())
    editor = uuid4()

    await backend.capsules.update(
        created.id,
        CapsuleUpdate(title="Offsets", content=created.content, capsule_type="reference"),
        actor_id=editor,
    )

    [_, event] = await capsule_events(backend)
    assert type(event) is CapsuleUpdatedEvent
    assert event.data.fields_changed == ("capsule_type", "title")
    assert dict(event.data.changes) == {"capsule_type": "reference", "title": "Offsets"}
    assert (event.data.old_version, event.data.new_version) == ("1", "2")
    assert event.actor_id == editor


async def test_unchanged_update_emits_nothing(backend: Any) -> None:
    created = await backend.capsules.create(draft())

    same = await backend.capsules.update(
        created.id, CapsuleUpdate(title=created.title), actor_id=created.owner_id
    )

    assert same == created
    assert len(await capsule_events(backend)) == 1


async def test_stale_expected_version_conflicts(backend: Any) -> None:
    created = await backend.capsules.create(draft())
    await backend.capsules.update(created.id, CapsuleUpdate(title="v2"), actor_id=uuid4())

    with pytest.raises(ConflictError) as caught:
        await backend.capsules.update(
            created.id, CapsuleUpdate(title="v2 again", expected_version="1"), actor_id=uuid4()
        )

    assert str(caught.value) == (
        f"Capsule {created.id} is at version 2, not 1; read it again and retry the change."
    )


async def test_store_rejects_stale_write(backend: Any) -> None:
    created = await backend.capsules.create(draft())
    await backend.capsules.update(created.id, CapsuleUpdate(title="v2 by Ada"), actor_id=uuid4())
    stale = created.model_copy(update={"title": "v2 by Bob", "version": "2"})

    with pytest.raises(ConflictError, match="is at version 2, not 1"):
        await backend.capsule_store.update(stale, "1", [])

    assert (await backend.capsules.get(created.id)).title == "v2 by Ada"


async def test_oversized_update_keeps_version(backend: Any) -> None:
    created = await backend.capsules.create(draft())

    with pytest.raises(EventTooLargeError):
        await backend.capsules.update(
            created.id, CapsuleUpdate(content="x" * (MAX_EVENT_BYTES + 1)), actor_id=uuid4()
        )

    assert await backend.capsules.get(created.id) == created
    assert len(await capsule_events(backend)) == 1


async def test_update_of_missing_capsule_rejected(backend: Any) -> None:
    capsule_id = uuid4()

    with pytest.raises(NotFoundError, match=f"Capsule {capsule_id} not found."):
        await backend.capsules.update(capsule_id, CapsuleUpdate(title="x"), actor_id=uuid4())


# Delete ------------------------------------------------------------------------------------------


async def test_deleted_capsule_not_found(backend: Any) -> None:
    created = await backend.capsules.create(draft())

    await backend.capsules.delete(created.id, actor_id=created.owner_id, reason="duplicate")

    with pytest.raises(NotFoundError):
        await backend.capsules.get(created.id)


async def test_deleted_capsule_kept_with_date(backend: Any) -> None:
    created = await backend.capsules.create(draft())

    deleted = await backend.capsules.delete(created.id, actor_id=created.owner_id)

    stored = await backend.capsules.get(created.id, include_deleted=True)
    assert stored == deleted
    assert stored.deleted_at is not None


async def test_delete_emits_deleted_event(backend: Any) -> None:
    created = await backend.capsules.create(draft())
    moderator = uuid4()

    await backend.capsules.delete(created.id, actor_id=moderator, reason="duplicate")

    [_, event] = await capsule_events(backend)
    assert type(event) is CapsuleDeletedEvent
    assert event.actor_id == moderator
    assert event.data.reason == "duplicate"
    assert event.data.version == "1"


async def test_update_after_delete_rejected(backend: Any) -> None:
    created = await backend.capsules.create(draft())
    await backend.capsules.delete(created.id, actor_id=created.owner_id)

    with pytest.raises(NotFoundError):
        await backend.capsules.update(created.id, CapsuleUpdate(title="x"), actor_id=uuid4())


async def test_second_delete_rejected(backend: Any) -> None:
    created = await backend.capsules.create(draft())
    await backend.capsules.delete(created.id, actor_id=created.owner_id)

    with pytest.raises(NotFoundError):
        await backend.capsules.delete(created.id, actor_id=created.owner_id)

    assert len(await capsule_events(backend)) == 2


async def test_list_hides_deleted(backend: Any) -> None:
    owner = uuid4()
    live = await backend.capsules.create(draft(owner))
    deleted = await backend.capsules.create(draft(owner))
    await backend.capsules.delete(deleted.id, actor_id=owner)

    assert await backend.capsule_store.list(owner_id=owner) == [live]


# Replay ------------------------------------------------------------------------------------------


async def edited_capsule(backend: Any) -> tuple[Capsule, Capsule]:
    """Create a capsule and update it twice; return the first and the last version."""
    created = await backend.capsules.create(draft())
    await backend.capsules.update(created.id, CapsuleUpdate(title="v2"), actor_id=uuid4())
    last = await backend.capsules.update(
        created.id, CapsuleUpdate(content="rewritten", capsule_type="reference"), actor_id=uuid4()
    )
    return created, last


async def test_replay_rebuilds_stored_capsule(backend: Any) -> None:
    _, last = await edited_capsule(backend)

    result = await backend.replayer.replay(last.id)

    assert result.rebuilt == last
    assert result.matches
    assert result.events_applied == 3


async def test_replay_rebuilds_deleted_capsule(backend: Any) -> None:
    _, last = await edited_capsule(backend)
    deleted = await backend.capsules.delete(last.id, actor_id=uuid4())

    result = await backend.replayer.replay(last.id)

    assert result.rebuilt == deleted
    assert result.differences == []


async def test_replay_at_gives_earlier_version(backend: Any) -> None:
    created, last = await edited_capsule(backend)

    result = await backend.replayer.replay(last.id, at=created.updated_at)

    assert result.rebuilt == created
    assert result.events_applied == 1


async def test_replay_before_creation_is_empty(backend: Any) -> None:
    created, _ = await edited_capsule(backend)

    result = await backend.replayer.replay(created.id, at=created.created_at.replace(year=2000))

    assert result.rebuilt is None
    assert result.events_applied == 0


async def test_replay_at_naive_time_rejected(backend: Any) -> None:
    created, _ = await edited_capsule(backend)

    with pytest.raises(ValueError) as caught:
        await backend.replayer.replay(created.id, at=datetime(2030, 1, 1))

    assert str(caught.value) == (
        "at=2030-01-01T00:00:00 has no timezone; pass an aware datetime, for example with "
        "tzinfo=UTC."
    )


async def test_replay_of_unknown_capsule_rejected(backend: Any) -> None:
    capsule_id = uuid4()

    with pytest.raises(NotFoundError) as caught:
        await backend.replayer.replay(capsule_id)

    assert str(caught.value) == f"Capsule {capsule_id} has no events and is not stored."
