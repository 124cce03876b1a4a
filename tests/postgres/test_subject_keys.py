"""PostgresSubjectKeyStore: one key per subject, erased for good."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from forge.core.privacy import PersonalDataProtector, SubjectKeyStore
from forge.infrastructure.postgres.database import PostgresDatabase
from forge.infrastructure.postgres.subject_keys import KEY_BYTES, PostgresSubjectKeyStore
from forge.models.events import SEALED_PREFIX, UserAuthenticatedEvent

pytestmark = pytest.mark.postgres


@pytest.fixture
def keys(database: PostgresDatabase) -> PostgresSubjectKeyStore:
    return PostgresSubjectKeyStore(database)


async def test_store_satisfies_port(keys: PostgresSubjectKeyStore) -> None:
    assert isinstance(keys, SubjectKeyStore)


async def test_key_is_created_once_and_kept(keys: PostgresSubjectKeyStore) -> None:
    subject = uuid.uuid4()

    missing = await keys.key_for(subject, create=False)
    created = await keys.key_for(subject, create=True)
    again = await keys.key_for(subject, create=True)
    read = await keys.key_for(subject, create=False)

    assert missing is None
    assert created is not None
    assert len(created) == KEY_BYTES
    assert again == created
    assert read == created


async def test_concurrent_creators_get_one_key(keys: PostgresSubjectKeyStore) -> None:
    subject = uuid.uuid4()

    created = await asyncio.gather(*(keys.key_for(subject, create=True) for _ in range(8)))

    assert len(set(created)) == 1


async def test_keys_for_matches_key_for(keys: PostgresSubjectKeyStore) -> None:
    known, erased, unknown, new = (uuid.uuid4() for _ in range(4))
    known_key = await keys.key_for(known, create=True)
    await keys.forget(erased)

    read = await keys.keys_for([known, erased, unknown], create=False)
    created = await keys.keys_for([known, erased, new, new], create=True)

    assert read == {known: known_key, erased: None, unknown: None}
    assert created[known] == known_key
    assert created[erased] is None
    assert created[new] is not None
    assert created[new] == await keys.key_for(new, create=False)


async def test_concurrent_batches_share_keys(keys: PostgresSubjectKeyStore) -> None:
    subjects = [uuid.uuid4() for _ in range(20)]

    batches = await asyncio.gather(
        *(keys.keys_for(random.sample(subjects, len(subjects)), create=True) for _ in range(6))
    )

    assert all(batch == batches[0] for batch in batches)
    assert all(key is not None for key in batches[0].values())


async def test_concurrently_committed_key_returned(
    keys: PostgresSubjectKeyStore, database: PostgresDatabase
) -> None:
    # The batch's INSERT waits for the other transaction's row, then its SELECT, which began
    # before that commit, cannot see the row: the store must read it again.
    subject, other = uuid.uuid4(), uuid.uuid4()
    key = bytes(range(KEY_BYTES))
    inserted = asyncio.Event()
    release = asyncio.Event()

    async def create_elsewhere() -> None:
        async with database.transaction() as connection:
            await connection.execute(
                "INSERT INTO subject_keys (subject_id, key) VALUES ($1, $2)", subject, key
            )
            inserted.set()
            await release.wait()

    creator = asyncio.create_task(create_elsewhere())
    await inserted.wait()
    batch = asyncio.create_task(keys.keys_for([other, subject], create=True))
    await asyncio.sleep(0.3)
    assert not batch.done()
    release.set()
    await creator

    found = await batch
    assert found[subject] == key
    assert found[other] is not None


async def test_erase_during_create_not_deadlocked(keys: PostgresSubjectKeyStore) -> None:
    # Each call locks its subjects' rows one by one; in opposite orders two calls could each
    # hold a row the other waits for. With the order given, 32 of 600 calls deadlocked.
    for _ in range(60):
        subjects = sorted(uuid.uuid4() for _ in range(20))

        created, erased = await asyncio.gather(
            keys.keys_for(subjects, create=True), keys.forget_many(subjects[::-1])
        )

        assert set(created) == set(erased) == set(subjects)
        assert await keys.keys_for(subjects, create=False) == dict.fromkeys(subjects)


async def test_forgotten_key_never_comes_back(keys: PostgresSubjectKeyStore) -> None:
    subject = uuid.uuid4()
    await keys.key_for(subject, create=True)

    first = await keys.forget(subject)
    second = await keys.forget(subject)

    assert first
    assert not second
    assert await keys.key_for(subject, create=True) is None
    assert await keys.key_for(subject, create=False) is None


async def test_forgetting_unknown_subject_blocks_new_key(keys: PostgresSubjectKeyStore) -> None:
    subject = uuid.uuid4()

    assert await keys.forget(subject)
    assert await keys.key_for(subject, create=True) is None


async def test_sealed_data_unreadable_after_forget(keys: PostgresSubjectKeyStore) -> None:
    protector = PersonalDataProtector(keys)
    user = uuid.uuid4()
    event = UserAuthenticatedEvent.create(user, "10.1.2.3", user_agent="curl/8.0")

    sealed = await protector.seal(event)
    revealed = await protector.reveal(sealed)
    await protector.forget(user)
    after_forget = await protector.reveal(sealed)

    assert str(sealed.data.ip_address).startswith(SEALED_PREFIX)
    assert str(revealed.data.ip_address) == "10.1.2.3"
    assert revealed.data.user_agent == "curl/8.0"
    assert after_forget.data.ip_address is None
    assert after_forget.data.user_agent is None


async def test_forget_many_erases_each_once(keys: PostgresSubjectKeyStore) -> None:
    keyed, unknown = uuid.uuid4(), uuid.uuid4()
    await keys.key_for(keyed, create=True)

    first = await keys.forget_many([keyed, unknown, keyed])
    second = await keys.forget_many([keyed, unknown])

    assert first == {keyed: True, unknown: True}
    assert second == {keyed: False, unknown: False}
    assert await keys.key_for(keyed, create=True) is None
    assert await keys.key_for(unknown, create=True) is None
