"""SqliteDeadLetterStore: every field of a letter is kept, also in a file of an older schema."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from forge.core.events.dead_letters import DeadLetter
from forge.infrastructure.sqlite.database import SqliteDatabase
from forge.infrastructure.sqlite.dead_letters import SqliteDeadLetterStore
from forge.infrastructure.sqlite.schema import MIGRATIONS


def letter(offset: int, extra: dict[str, str] | None = None) -> DeadLetter:
    return DeadLetter(
        group_id="search",
        topic="forge.capsule.created",
        partition=0,
        offset=offset,
        key=None,
        value=b"{}",
        headers={"event_type": "capsule.created"},
        reason=f"failure {offset}",
        error_type="RuntimeError",
        handler="indexer",
        attempts=3,
        extra=extra or {},
    )


async def test_extra_kept(tmp_path: Path) -> None:
    async with SqliteDatabase(tmp_path / "forge.db") as database:
        store = SqliteDeadLetterStore(database)
        await store.park([letter(0, extra={"shard": "3", "host": "worker-b"})])
        await store.request_retry()

        [listed] = await store.list()
        [claimed] = await store.claim_retries("search")

    assert dict(listed.extra) == {"shard": "3", "host": "worker-b"}
    assert dict(claimed.extra) == {"shard": "3", "host": "worker-b"}


async def test_parking_again_replaces_extra(tmp_path: Path) -> None:
    # Like the reason, `extra` describes the latest failure of the record.
    async with SqliteDatabase(tmp_path / "forge.db") as database:
        store = SqliteDeadLetterStore(database)
        await store.park([letter(0, extra={"shard": "3"})])
        await store.park([replace(letter(0), reason="again", extra={"shard": "4"})])

        [listed] = await store.list()

    assert (listed.reason, dict(listed.extra)) == ("again", {"shard": "4"})


async def test_parked_again_after_retry_replaces_extra(tmp_path: Path) -> None:
    async with SqliteDatabase(tmp_path / "forge.db") as database:
        store = SqliteDeadLetterStore(database)
        await store.park([letter(0, extra={"shard": "3"}), letter(1, extra={"shard": "5"})])
        await store.request_retry()
        first, second = await store.claim_retries("search")

        await store.mark_parked(first.id, "again", "KeyError", 1, {"shard": "4"})  # type: ignore[arg-type]
        await store.mark_parked(second.id, "again", "KeyError", 1)  # type: ignore[arg-type]
        replaced, emptied = await store.list()

    assert dict(replaced.extra) == {"shard": "4"}
    assert dict(emptied.extra) == {}
    assert replaced.attempts == 4


async def test_retry_of_many_ids_in_one_call(tmp_path: Path) -> None:
    # More ids than SQLite takes as parameters of one statement.
    async with SqliteDatabase(tmp_path / "forge.db") as database:
        store = SqliteDeadLetterStore(database)
        await store.park([letter(0), letter(1)])
        first, _ = await store.list()

        requested = await store.request_retry([*range(10**6, 10**6 + 300_000), first.id])  # type: ignore[list-item]

    assert requested == 1


async def test_file_of_schema_2_opened(tmp_path: Path) -> None:
    # A file written before dead letters had `extra`: its letters still list, with none.
    path = tmp_path / "forge.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as connection:
        for script in MIGRATIONS[:2]:
            connection.executescript(script)
        connection.execute("PRAGMA user_version = 2")
        connection.execute(
            "INSERT INTO dead_letters (group_id, topic, partition, log_offset, key, value, "
            "headers, reason, error_type, handler, attempts, status, parked_at, updated_at) "
            "VALUES ('search', 'forge.capsule.created', 0, 0, NULL, x'7b7d', '{}', 'old', "
            "'RuntimeError', 'indexer', 3, 'parked', '2025-01-01T00:00:00+00:00', "
            "'2025-01-01T00:00:00+00:00')"
        )

    async with SqliteDatabase(path) as database:
        store = SqliteDeadLetterStore(database)
        await store.park([letter(1, extra={"shard": "3"})])

        old, new = await store.list()

    assert (old.reason, dict(old.extra)) == ("old", {})
    assert dict(new.extra) == {"shard": "3"}


@pytest.mark.parametrize("extra", [{"shard": b"3"}, {"shard": 3}, {3: "shard"}])
def test_extra_not_text_rejected(extra: dict[Any, Any]) -> None:
    with pytest.raises(TypeError) as caught:
        letter(0, extra=extra)

    assert "DeadLetter.extra must map strings to strings" in str(caught.value)
    assert "str() or json.dumps()" in str(caught.value)
