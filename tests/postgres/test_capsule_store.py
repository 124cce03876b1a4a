"""PostgresCapsuleStore: the SQLite store's behaviour, with outbox rows in the same transaction."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from forge.core.capsules.service import CapsuleService
from forge.core.events.codec import encode_event
from forge.exceptions import ConflictError, EventTooLargeError, NotFoundError, StorageError
from forge.infrastructure.postgres.capsule_store import PostgresCapsuleStore
from forge.infrastructure.postgres.database import PostgresDatabase
from forge.infrastructure.postgres.outbox import PostgresOutbox
from forge.models.base import utc_now
from forge.models.capsule import Capsule, CapsuleCreate, CapsuleUpdate
from forge.models.events import CapsuleCreatedEvent, EventType

pytestmark = pytest.mark.postgres


@pytest.fixture
def store(database: PostgresDatabase) -> PostgresCapsuleStore:
    return PostgresCapsuleStore(database)


@pytest.fixture
def service(store: PostgresCapsuleStore) -> CapsuleService:
    return CapsuleService(store)


async def outbox_count(database: PostgresDatabase) -> int:
    count: int = await database.fetchval("SELECT count(*) FROM outbox")
    return count


def new_capsule(**fields: object) -> Capsule:
    now = utc_now()
    values: dict[str, object] = {
        "id": uuid.uuid4(),
        "owner_id": uuid.uuid4(),
        "capsule_type": "note",
        "title": "title",
        "content": "content",
        "created_at": now,
        "updated_at": now,
    }
    values.update(fields)
    return Capsule.model_validate(values)


async def test_create_stores_capsule_and_outbox_row(
    service: CapsuleService, store: PostgresCapsuleStore, database: PostgresDatabase
) -> None:
    owner = uuid.uuid4()

    capsule = await service.create(
        CapsuleCreate(owner_id=owner, capsule_type="note", title="Hello", content="World")
    )

    stored = await store.get(capsule.id)
    assert stored == capsule
    records = await PostgresOutbox(database).records()
    assert len(records) == 1
    assert records[0].topic == "forge.capsule.created"
    assert records[0].key == str(capsule.id)
    assert records[0].headers["event_type"] == EventType.CAPSULE_CREATED.value
    assert records[0].headers["event_id"] == str(records[0].event_id)


async def test_update_bumps_version_and_appends_event(
    service: CapsuleService, store: PostgresCapsuleStore, database: PostgresDatabase
) -> None:
    capsule = await service.create(CapsuleCreate(owner_id=uuid.uuid4(), capsule_type="note"))

    updated = await service.update(
        capsule.id, CapsuleUpdate(title="New", expected_version="1"), actor_id=capsule.owner_id
    )

    assert updated.version == "2"
    assert await store.get(capsule.id) == updated
    topics = [record.topic for record in await PostgresOutbox(database).records()]
    assert topics == ["forge.capsule.created", "forge.capsule.updated"]


async def test_update_without_change_stores_nothing(
    service: CapsuleService, database: PostgresDatabase
) -> None:
    capsule = await service.create(
        CapsuleCreate(owner_id=uuid.uuid4(), capsule_type="note", title="Same")
    )

    unchanged = await service.update(capsule.id, CapsuleUpdate(title="Same"), actor_id=uuid.uuid4())

    assert unchanged.version == "1"
    assert await outbox_count(database) == 1


async def test_update_at_stale_version_conflicts(
    store: PostgresCapsuleStore, database: PostgresDatabase
) -> None:
    capsule = new_capsule()
    await store.create(capsule, [])
    newer = capsule.model_copy(update={"title": "second", "version": "2"})
    await store.update(newer, "1", [])

    with pytest.raises(ConflictError, match=f"Capsule {capsule.id} is at version 2, not 1"):
        await store.update(capsule.model_copy(update={"version": "2"}), "1", [])

    assert (await store.get(capsule.id)) == newer


async def test_concurrent_updates_only_one_wins(
    service: CapsuleService, store: PostgresCapsuleStore, database: PostgresDatabase
) -> None:
    capsule = await service.create(CapsuleCreate(owner_id=uuid.uuid4(), capsule_type="note"))

    results = await asyncio.gather(
        *(
            service.update(
                capsule.id,
                CapsuleUpdate(title=f"writer {n}", expected_version="1"),
                actor_id=uuid.uuid4(),
            )
            for n in range(5)
        ),
        return_exceptions=True,
    )

    winners = [result for result in results if isinstance(result, Capsule)]
    losers = [result for result in results if isinstance(result, ConflictError)]
    assert len(winners) == 1
    assert len(losers) == 4
    assert await store.get(capsule.id) == winners[0]
    assert await outbox_count(database) == 2


async def test_create_with_existing_id_conflicts(
    store: PostgresCapsuleStore, database: PostgresDatabase
) -> None:
    capsule = new_capsule()
    event = encode_event(
        CapsuleCreatedEvent.create(capsule.id, capsule.owner_id, "note"), 1024 * 1024
    )
    await store.create(capsule, [event])

    with pytest.raises(ConflictError, match=f"Capsule {capsule.id} already exists"):
        await store.create(capsule.model_copy(update={"title": "other"}), [event])

    assert (await store.get(capsule.id)) == capsule
    assert await outbox_count(database) == 1


async def test_create_with_missing_parent_stores_nothing(
    service: CapsuleService, store: PostgresCapsuleStore, database: PostgresDatabase
) -> None:
    parent_id = uuid.uuid4()

    with pytest.raises(NotFoundError, match=f"Parent capsule {parent_id} not found"):
        await service.create(
            CapsuleCreate(owner_id=uuid.uuid4(), capsule_type="note", parent_id=parent_id)
        )

    assert await store.list(include_deleted=True) == []
    assert await outbox_count(database) == 0


async def test_create_with_deleted_parent_is_not_found(
    service: CapsuleService, store: PostgresCapsuleStore
) -> None:
    parent = await service.create(CapsuleCreate(owner_id=uuid.uuid4(), capsule_type="note"))
    await service.delete(parent.id, actor_id=parent.owner_id)

    with pytest.raises(NotFoundError, match="not found \\(or deleted\\)"):
        await service.create(
            CapsuleCreate(owner_id=uuid.uuid4(), capsule_type="note", parent_id=parent.id)
        )


async def test_lineage_child_points_to_parent(
    service: CapsuleService, store: PostgresCapsuleStore
) -> None:
    parent = await service.create(CapsuleCreate(owner_id=uuid.uuid4(), capsule_type="note"))

    child = await service.create(
        CapsuleCreate(owner_id=uuid.uuid4(), capsule_type="derived", parent_id=parent.id)
    )

    stored = await store.get(child.id)
    assert stored is not None
    assert stored.parent_id == parent.id


async def test_delete_hides_capsule_unless_included(
    service: CapsuleService, store: PostgresCapsuleStore, database: PostgresDatabase
) -> None:
    capsule = await service.create(CapsuleCreate(owner_id=uuid.uuid4(), capsule_type="note"))

    deleted = await service.delete(capsule.id, actor_id=capsule.owner_id, reason="cleanup")

    assert await store.get(capsule.id) is None
    assert await store.get(capsule.id, include_deleted=True) == deleted
    assert await store.list() == []
    assert await store.list(include_deleted=True) == [deleted]
    topics = [record.topic for record in await PostgresOutbox(database).records()]
    assert topics == ["forge.capsule.created", "forge.capsule.deleted"]


async def test_delete_twice_is_not_found(
    store: PostgresCapsuleStore, database: PostgresDatabase
) -> None:
    capsule = new_capsule()
    await store.create(capsule, [])
    await store.delete(capsule.id, "1", utc_now(), [])

    with pytest.raises(NotFoundError, match=f"Capsule {capsule.id} not found"):
        await store.delete(capsule.id, "1", utc_now(), [])


async def test_delete_at_stale_version_conflicts(store: PostgresCapsuleStore) -> None:
    capsule = new_capsule(version="3")
    await store.create(capsule, [])

    with pytest.raises(ConflictError, match="is at version 3, not 2"):
        await store.delete(capsule.id, "2", utc_now(), [])

    assert await store.get(capsule.id) == capsule


async def test_update_of_missing_capsule_is_not_found(store: PostgresCapsuleStore) -> None:
    capsule = new_capsule()

    with pytest.raises(NotFoundError, match=f"Capsule {capsule.id} not found"):
        await store.update(capsule, "1", [])


async def test_list_filters_by_owner_and_limits(store: PostgresCapsuleStore) -> None:
    owner = uuid.uuid4()
    mine = [new_capsule(owner_id=owner) for _ in range(3)]
    for capsule in [*mine, new_capsule()]:
        await store.create(capsule, [])

    listed = await store.list(owner_id=owner)
    limited = await store.list(limit=2)

    assert [capsule.id for capsule in listed] == [capsule.id for capsule in mine]
    assert len(limited) == 2


async def test_failing_outbox_insert_leaves_no_capsule(
    store: PostgresCapsuleStore, database: PostgresDatabase
) -> None:
    capsule = new_capsule()
    event = encode_event(
        CapsuleCreatedEvent.create(capsule.id, capsule.owner_id, "note"), 1024 * 1024
    )
    # PostgreSQL rejects a NUL character in text, so the outbox insert fails after the
    # capsule row was inserted in the same transaction.
    broken = event._replace(topic="forge.capsule.created\x00")

    with pytest.raises(StorageError):
        await store.create(capsule, [broken])

    assert await store.get(capsule.id, include_deleted=True) is None
    assert await outbox_count(database) == 0


async def test_failing_outbox_insert_leaves_update_undone(
    store: PostgresCapsuleStore, database: PostgresDatabase
) -> None:
    capsule = new_capsule()
    await store.create(capsule, [])
    event = encode_event(
        CapsuleCreatedEvent.create(capsule.id, capsule.owner_id, "note"), 1024 * 1024
    )
    broken = event._replace(headers={"event_id": "\x00"})

    with pytest.raises(StorageError):
        await store.update(capsule.model_copy(update={"title": "x", "version": "2"}), "1", [broken])

    assert await store.get(capsule.id) == capsule
    assert await outbox_count(database) == 0


async def test_oversized_event_stores_nothing(
    store: PostgresCapsuleStore, database: PostgresDatabase
) -> None:
    service = CapsuleService(store, max_event_bytes=2048)

    with pytest.raises(EventTooLargeError, match="over the limit of 2048 bytes"):
        await service.create(
            CapsuleCreate(owner_id=uuid.uuid4(), capsule_type="note", content="x" * 4096)
        )

    assert await store.list(include_deleted=True) == []
    assert await outbox_count(database) == 0


async def test_outbox_append_outside_transaction_is_rejected(database: PostgresDatabase) -> None:
    capsule = new_capsule()
    event = encode_event(
        CapsuleCreatedEvent.create(capsule.id, capsule.owner_id, "note"), 1024 * 1024
    )

    async with database.connection() as connection:
        with pytest.raises(StorageError, match="must run inside the transaction"):
            await PostgresOutbox(database).append(connection, [event])
