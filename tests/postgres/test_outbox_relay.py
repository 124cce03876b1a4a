"""OutboxRelay on PostgreSQL: order per resource, at least once across crashes, one active relay.

The relays publish into an embedded SQLite event log, a real `EventPublisher` that needs no
broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from forge.core.capsules.service import CapsuleService
from forge.core.events.codec import encode_event
from forge.core.events.outbox import Outbox, OutboxRelay, RelaySettings
from forge.exceptions import BatchPublishError, ConflictError, NotStartedError, PublishError
from forge.infrastructure.postgres.capsule_store import PostgresCapsuleStore
from forge.infrastructure.postgres.database import PostgresDatabase
from forge.infrastructure.postgres.outbox import PostgresOutbox
from forge.infrastructure.sqlite.database import SqliteDatabase
from forge.infrastructure.sqlite.event_log import SqliteEventLog
from forge.models.capsule import CapsuleCreate, CapsuleUpdate
from forge.models.events import (
    CapsuleCreatedEvent,
    CapsuleSearchedEvent,
    ConfigChangedEvent,
    Event,
    UserAuthenticatedEvent,
    VoteCastEvent,
    parse_event,
)
from tests.postgres.helpers import (
    append_to_outbox,
    first_seen_ids_by_key,
    ids_by_key,
    interleaved_updates,
    read_all,
    update_event,
    wait_until,
)

pytestmark = pytest.mark.postgres

WORKER = Path(__file__).with_name("relay_worker.py")
FAST = RelaySettings(
    batch_size=16,
    poll_interval_seconds=0.02,
    initial_backoff_seconds=0.02,
    max_backoff_seconds=0.1,
    stop_timeout_seconds=2.0,
)


class WrappedPublisher:
    """An `EventPublisher` that forwards to the target log, for subclasses to interfere."""

    def __init__(self, target: SqliteEventLog) -> None:
        self.target = target
        self.calls: list[list[Event[Any]]] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, event: Event[Any]) -> None:
        await self.publish_batch([event])

    async def publish_batch(self, events: Sequence[Event[Any]]) -> None:
        self.calls.append(list(events))
        await self.target.publish_batch(events)


async def drained(outbox: Outbox) -> bool:
    return await outbox.pending_count() == 0


async def assert_published_once_in_order(
    target: SqliteEventLog, database: PostgresDatabase, events: Sequence[Event[Any]]
) -> None:
    records = await read_all(target)
    outbox_rows = await PostgresOutbox(database).records(limit=100_000)
    values = {str(row.event_id): row.value for row in outbox_rows}

    assert [record.headers["event_id"] for record in records] == [str(e.id) for e in events]
    assert all(record.value == values[record.headers["event_id"]] for record in records)


async def test_relay_publishes_in_order_and_marks(
    database: PostgresDatabase, target: SqliteEventLog
) -> None:
    events = interleaved_updates(resources=5, per_resource=40)
    await append_to_outbox(database, events, per_transaction=7)
    outbox = PostgresOutbox(database)

    async with OutboxRelay(outbox, target, FAST) as relay:
        await wait_until(lambda: drained(outbox), timeout=30, message="outbox not drained")
        published = relay.published_count

    assert published == len(events)
    await assert_published_once_in_order(target, database, events)
    unmarked = await database.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
    assert unmarked == 0


async def test_relay_resends_values_byte_for_byte(
    database: PostgresDatabase, target: SqliteEventLog
) -> None:
    capsule_id, user_id = uuid.uuid4(), uuid.uuid4()
    events: list[Event[Any]] = [
        CapsuleCreatedEvent.create(
            capsule_id, user_id, "note", title="Grüße ✓", content='quote " and \\ and \n'
        ),
        CapsuleSearchedEvent.create(user_id, "q", 3, filters={"tags": ["a", "b"], "n": 1.5}),
        UserAuthenticatedEvent.create(user_id, "2001:db8::1", user_agent="agent/1.0"),
        VoteCastEvent.create(uuid.uuid4(), uuid.uuid4(), user_id, "for", 0.1),
        ConfigChangedEvent.create("limits.max", old_value=1e-7, new_value={"x": [1, None]}),
        update_event(capsule_id, 1).model_copy(update={"metadata": {"z": 1, "a": 2}}),
    ]
    await append_to_outbox(database, events)
    outbox = PostgresOutbox(database)

    async with OutboxRelay(outbox, target, FAST):
        await wait_until(lambda: drained(outbox), timeout=30, message="outbox not drained")

    records = await read_all(target)
    outbox_values = [row.value for row in await outbox.records()]
    assert [record.value for record in records] == outbox_values
    assert [parse_event(record.value) for record in records] == events


async def test_cancelled_relay_resends_batch(
    database: PostgresDatabase, target: SqliteEventLog
) -> None:
    class HangsAfterThirdBatch(WrappedPublisher):
        async def publish_batch(self, events: Sequence[Event[Any]]) -> None:
            await super().publish_batch(events)
            if len(self.calls) == 3:
                # Acknowledged by the log but never reported back to the relay.
                await asyncio.Event().wait()

    events = interleaved_updates(resources=4, per_resource=30)
    await append_to_outbox(database, events)
    outbox = PostgresOutbox(database)
    hanging = HangsAfterThirdBatch(target)
    relay = OutboxRelay(outbox, hanging, RelaySettings(batch_size=16, stop_timeout_seconds=0.2))
    await relay.start()
    await wait_until(
        lambda: asyncio.sleep(0, len(hanging.calls) >= 3), timeout=10, message="no third batch"
    )

    await relay.stop()
    pending_after_cancel = await outbox.pending_count()
    async with OutboxRelay(outbox, target, FAST):
        await wait_until(lambda: drained(outbox), timeout=30, message="outbox not drained")

    records = await read_all(target)
    assert pending_after_cancel == len(events) - 32
    assert len(records) == len(events) + 16
    assert first_seen_ids_by_key(records) == ids_by_key(events)
    assert {record.headers["event_id"] for record in records} == {str(e.id) for e in events}


async def test_killed_relay_process_loses_nothing(
    postgres_dsn: str,
    database: PostgresDatabase,
    target: SqliteEventLog,
    target_path: Path,
    tmp_path: Path,
) -> None:
    events = interleaved_updates(resources=6, per_resource=100)
    await append_to_outbox(database, events, per_transaction=100)
    outbox = PostgresOutbox(database)

    worker = await start_worker(postgres_dsn, database.schema, target_path, tmp_path, delay=0.02)
    try:
        await wait_until(
            lambda: count_at_least(target, 100), timeout=30, message="worker published nothing"
        )
    finally:
        worker.kill()
        await worker.wait()
    pending_after_kill = await outbox.pending_count()
    async with OutboxRelay(outbox, target, FAST):
        await wait_until(lambda: drained(outbox), timeout=60, message="outbox not drained")

    records = await read_all(target)
    assert 0 < pending_after_kill < len(events)
    assert {record.headers["event_id"] for record in records} == {str(e.id) for e in events}
    assert first_seen_ids_by_key(records) == ids_by_key(events)


async def test_standby_takes_over_after_stop(
    database: PostgresDatabase, target: SqliteEventLog
) -> None:
    outbox = PostgresOutbox(database)
    first = OutboxRelay(outbox, target, FAST)
    second = OutboxRelay(outbox, target, FAST)
    await first.start()
    try:
        await wait_until(lambda: asyncio.sleep(0, first.is_active), timeout=10, message="no leader")
        await second.start()
        events = interleaved_updates(resources=3, per_resource=10)
        await append_to_outbox(database, events)
        await wait_until(lambda: drained(outbox), timeout=30, message="outbox not drained")
        second_was_active = second.is_active

        await first.stop()
        await wait_until(
            lambda: asyncio.sleep(0, second.is_active), timeout=10, message="no takeover"
        )
        later = interleaved_updates(resources=3, per_resource=10)
        await append_to_outbox(database, later)
        await wait_until(lambda: drained(outbox), timeout=30, message="outbox not drained")
    finally:
        await first.stop()
        await second.stop()

    assert not second_was_active
    assert first.published_count == len(events)
    assert second.published_count == len(later)
    await assert_published_once_in_order(target, database, [*events, *later])


async def test_standby_takes_over_killed_leader(
    postgres_dsn: str,
    database: PostgresDatabase,
    target: SqliteEventLog,
    target_path: Path,
    tmp_path: Path,
) -> None:
    outbox = PostgresOutbox(database)
    worker = await start_worker(postgres_dsn, database.schema, target_path, tmp_path, delay=0.05)
    standby = OutboxRelay(outbox, target, FAST)
    events = interleaved_updates(resources=4, per_resource=50)
    try:
        await standby.start()
        await append_to_outbox(database, events, per_transaction=25)
        await wait_until(
            lambda: count_at_least(target, 16), timeout=30, message="worker published nothing"
        )
        standby_was_active = standby.is_active

        worker.kill()
        await worker.wait()
        killed_at = time.monotonic()
        await wait_until(
            lambda: asyncio.sleep(0, standby.is_active), timeout=10, message="no takeover"
        )
        takeover_seconds = time.monotonic() - killed_at
        await wait_until(lambda: drained(outbox), timeout=60, message="outbox not drained")
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
        await standby.stop()

    records = await read_all(target)
    assert not standby_was_active
    assert takeover_seconds < 5
    assert standby.published_count > 0
    assert {record.headers["event_id"] for record in records} == {str(e.id) for e in events}
    assert first_seen_ids_by_key(records) == ids_by_key(events)


async def test_partial_failure_resends_key_in_order(
    database: PostgresDatabase, target: SqliteEventLog
) -> None:
    events = interleaved_updates(resources=3, per_resource=4)
    failing = events[3]  # second event of the first resource

    class FailsOneEventOnce(WrappedPublisher):
        async def publish_batch(self, batch: Sequence[Event[Any]]) -> None:
            self.calls.append(list(batch))
            if len(self.calls) > 1:
                await self.target.publish_batch(batch)
                return
            # Like a broker that loses one send of a batch and stores the others.
            others = [event for event in batch if event.id != failing.id]
            await self.target.publish_batch(others)
            raise BatchPublishError(
                "1 event was not acknowledged",
                {failing.id: PublishError("request timed out")},
                acknowledged=len(others),
            )

    await append_to_outbox(database, events)
    outbox = PostgresOutbox(database)
    publisher = FailsOneEventOnce(target)

    async with OutboxRelay(outbox, publisher, FAST):
        await wait_until(lambda: drained(outbox), timeout=30, message="outbox not drained")

    same_key_from_failure = [e.id for e in events[3:] if e.key == failing.key]
    assert [event.id for event in publisher.calls[1]] == same_key_from_failure
    assert len(publisher.calls) == 2
    records = await read_all(target)
    last_seen: dict[str | None, list[str]] = {}
    for record in reversed(records):
        ids = last_seen.setdefault(record.key, [])
        if record.headers["event_id"] not in ids:
            ids.insert(0, record.headers["event_id"])
    assert last_seen == ids_by_key(events)


async def test_event_rejected_for_good_is_parked_once(
    database: PostgresDatabase, target: SqliteEventLog
) -> None:
    # Like a broker that rejects one event as too large for its topic, every time.
    events = interleaved_updates(resources=3, per_resource=4)
    rejected = events[3]  # second event of the first resource

    class RejectsOneEvent(WrappedPublisher):
        async def publish_batch(self, batch: Sequence[Event[Any]]) -> None:
            self.calls.append(list(batch))
            others = [event for event in batch if event.id != rejected.id]
            await self.target.publish_batch(others)
            if len(others) < len(batch):
                too_large = PublishError("MessageSizeTooLargeError: the broker rejected it")
                too_large.retriable = False
                raise BatchPublishError(
                    "1 event was not acknowledged", {rejected.id: too_large}, len(others)
                )

    await append_to_outbox(database, events)
    outbox = PostgresOutbox(database)
    publisher = RejectsOneEvent(target)

    async with OutboxRelay(outbox, publisher, FAST) as relay:
        await wait_until(lambda: drained(outbox), timeout=30, message="outbox not drained")
        rejected_by_relay = relay.rejected_count

    [row] = await outbox.rejected()
    published = [record.headers["event_id"] for record in await read_all(target)]
    assert rejected_by_relay == 1
    assert await outbox.rejected_count() == 1
    assert (row.event_id, row.topic) == (rejected.id, rejected.topic)
    assert "MessageSizeTooLargeError" in row.reason
    # Every other event went out once, and no batch was sent again.
    assert sorted(published) == sorted(str(e.id) for e in events if e.id != rejected.id)
    assert len(publisher.calls) == 1


async def test_publish_outage_retries_without_marking(
    database: PostgresDatabase, target: SqliteEventLog
) -> None:
    class DownThreeTimes(WrappedPublisher):
        async def publish_batch(self, batch: Sequence[Event[Any]]) -> None:
            self.calls.append(list(batch))
            if len(self.calls) <= 3:
                raise PublishError("broker unreachable")
            await self.target.publish_batch(batch)

    events = interleaved_updates(resources=2, per_resource=5)
    await append_to_outbox(database, events)
    outbox = PostgresOutbox(database)
    publisher = DownThreeTimes(target)

    async with OutboxRelay(outbox, publisher, FAST):
        await wait_until(
            lambda: asyncio.sleep(0, len(publisher.calls) >= 2), timeout=10, message="no retry"
        )
        pending_during_outage = await outbox.pending_count()
        await wait_until(lambda: drained(outbox), timeout=30, message="outbox not drained")

    assert pending_during_outage == len(events)
    assert all(call == publisher.calls[0] for call in publisher.calls[:4])
    await assert_published_once_in_order(target, database, events)


async def test_publisher_rejected_event_is_parked(
    database: PostgresDatabase, target: SqliteEventLog, tmp_path: Path
) -> None:
    small = CapsuleCreatedEvent.create(uuid.uuid4(), uuid.uuid4(), "note")
    large = CapsuleCreatedEvent.create(uuid.uuid4(), uuid.uuid4(), "note", content="x" * 5000)
    await append_to_outbox(database, [small, large])
    outbox = PostgresOutbox(database)

    async with (
        SqliteDatabase(tmp_path / "strict.sqlite3") as strict_database,
        SqliteEventLog(strict_database, max_event_bytes=2048) as strict_target,
    ):
        async with OutboxRelay(outbox, strict_target, FAST) as relay:
            await wait_until(lambda: drained(outbox), timeout=30, message="outbox not drained")
            rejected = relay.rejected_count
        strict_records = await read_all(strict_target)
    last_error = await database.fetchval(
        "SELECT last_error FROM outbox WHERE event_id = $1", large.id
    )

    requeued = await outbox.requeue_rejected()
    async with OutboxRelay(outbox, target, FAST):
        await wait_until(lambda: drained(outbox), timeout=30, message="outbox not drained")

    assert rejected == 1
    assert [record.headers["event_id"] for record in strict_records] == [str(small.id)]
    assert "The publisher rejected the event" in last_error
    assert "over the limit of 2048 bytes" in last_error
    assert requeued == 1
    assert [record.headers["event_id"] for record in await read_all(target)] == [str(large.id)]


async def test_invalid_rows_are_parked(database: PostgresDatabase, target: SqliteEventLog) -> None:
    before, after = update_event(uuid.uuid4(), 1), update_event(uuid.uuid4(), 2)
    misrouted = update_event(uuid.uuid4(), 3)
    await append_to_outbox(database, [before])
    await database.execute(
        "INSERT INTO outbox (topic, key, value, headers, event_id) "
        "VALUES ('forge.capsule.updated', 'k', 'not json', '{}', gen_random_uuid())"
    )
    await database.execute(
        "INSERT INTO outbox (topic, key, value, headers, event_id) "
        "VALUES ('forge.capsule.deleted', $1, $2, '{}', $3)",
        str(misrouted.resource_id),
        misrouted.to_json(),
        misrouted.id,
    )
    await append_to_outbox(database, [after])
    outbox = PostgresOutbox(database)

    async with OutboxRelay(outbox, target, FAST) as relay:
        await wait_until(lambda: drained(outbox), timeout=30, message="outbox not drained")
        rejected = relay.rejected_count

    undecodable = await database.fetchval("SELECT last_error FROM outbox WHERE key = 'k'")
    wrong_topic = await database.fetchval(
        "SELECT last_error FROM outbox WHERE event_id = $1", misrouted.id
    )
    assert rejected == 2
    assert undecodable.startswith("Event is not valid JSON")
    assert wrong_topic == (
        "The topic 'forge.capsule.deleted' of the row differs from the event's "
        "'forge.capsule.updated'; rewrite the row with encode_event."
    )
    records = await read_all(target)
    assert [record.headers["event_id"] for record in records] == [str(before.id), str(after.id)]


async def test_stop_is_bounded_when_publisher_hangs(
    database: PostgresDatabase, target: SqliteEventLog
) -> None:
    class Hangs(WrappedPublisher):
        async def publish_batch(self, batch: Sequence[Event[Any]]) -> None:
            self.calls.append(list(batch))
            await asyncio.Event().wait()

    events = interleaved_updates(resources=1, per_resource=3)
    await append_to_outbox(database, events)
    outbox = PostgresOutbox(database)
    publisher = Hangs(target)
    relay = OutboxRelay(outbox, publisher, RelaySettings(stop_timeout_seconds=0.3))
    await relay.start()
    await wait_until(lambda: asyncio.sleep(0, bool(publisher.calls)), timeout=10, message="idle")

    started = time.monotonic()
    await relay.stop()
    stop_seconds = time.monotonic() - started
    await relay.stop()
    async with OutboxRelay(outbox, target, FAST) as successor:
        await wait_until(
            lambda: asyncio.sleep(0, successor.is_active), timeout=5, message="lock not released"
        )
        await wait_until(lambda: drained(outbox), timeout=30, message="outbox not drained")

    assert stop_seconds < 2
    assert not relay.is_running
    await assert_published_once_in_order(target, database, events)


async def test_unexpected_error_raised_by_stop(
    database: PostgresDatabase, target: SqliteEventLog
) -> None:
    class Broken(WrappedPublisher):
        async def publish_batch(self, batch: Sequence[Event[Any]]) -> None:
            raise RuntimeError("bug in the publisher")

    await append_to_outbox(database, interleaved_updates(resources=1, per_resource=2))
    outbox = PostgresOutbox(database)
    relay = OutboxRelay(outbox, Broken(target), FAST)
    await relay.start()
    await wait_until(lambda: asyncio.sleep(0, not relay.is_running), timeout=10, message="alive")

    with pytest.raises(RuntimeError, match="bug in the publisher"):
        await relay.stop()
    await relay.stop()
    assert await outbox.pending_count() == 2


async def test_wait_raises_loop_failure(database: PostgresDatabase, target: SqliteEventLog) -> None:
    class Broken(WrappedPublisher):
        async def publish_batch(self, batch: Sequence[Event[Any]]) -> None:
            raise RuntimeError("bug in the publisher")

    await append_to_outbox(database, interleaved_updates(resources=1, per_resource=2))
    relay = OutboxRelay(PostgresOutbox(database), Broken(target), FAST)
    await relay.start()

    with pytest.raises(RuntimeError, match="bug in the publisher"):
        await asyncio.wait_for(relay.wait(), timeout=10)
    await relay.stop()


async def test_wait_returns_after_stop(database: PostgresDatabase, target: SqliteEventLog) -> None:
    relay = OutboxRelay(PostgresOutbox(database), target, FAST)

    with pytest.raises(NotStartedError, match="call start\\(\\) first"):
        await relay.wait()
    await relay.start()
    waiting = asyncio.create_task(relay.wait())
    await asyncio.sleep(0.1)
    running_before_stop = not waiting.done()
    await relay.stop()

    await asyncio.wait_for(waiting, timeout=5)
    assert running_before_stop


async def test_published_rows_purged_after_retention(
    database: PostgresDatabase, target: SqliteEventLog
) -> None:
    await append_to_outbox(database, interleaved_updates(resources=2, per_resource=5))
    outbox = PostgresOutbox(database)
    settings = RelaySettings(
        poll_interval_seconds=0.02, retention_seconds=0.01, purge_interval_seconds=0.05
    )

    async def outbox_empty() -> bool:
        remaining: int = await database.fetchval("SELECT count(*) FROM outbox")
        return remaining == 0

    async with OutboxRelay(outbox, target, settings):
        await wait_until(outbox_empty, timeout=10, message="published rows not purged")

    assert len(await read_all(target)) == 10


async def test_concurrent_writers_keep_key_order(
    database: PostgresDatabase, target: SqliteEventLog
) -> None:
    outbox = PostgresOutbox(database)
    keys = [uuid.uuid4() for _ in range(3)]
    committed: dict[str | None, list[str]] = {str(key): [] for key in keys}
    counters = dict.fromkeys(keys, 0)

    async def writer(key: uuid.UUID) -> None:
        for _ in range(15):
            async with database.transaction() as connection:
                number = counters[key]
                event = update_event(key, number)
                await outbox.append(connection, [encode_event(event, 1024 * 1024)])
                # The key's lock is held from the append to the commit, so this order is the
                # commit order of the key's rows.
                counters[key] += 1
                committed[str(key)].append(str(event.id))
                await asyncio.sleep(random.uniform(0, 0.005))

    async with OutboxRelay(outbox, target, FAST):
        await asyncio.gather(*(writer(key) for key in keys for _ in range(4)))
        await wait_until(lambda: drained(outbox), timeout=30, message="outbox not drained")

    records = await read_all(target)
    assert len(records) == 3 * 4 * 15
    assert first_seen_ids_by_key(records) == committed


async def test_capsule_events_published_in_version_order(
    database: PostgresDatabase, target: SqliteEventLog
) -> None:
    service = CapsuleService(PostgresCapsuleStore(database))
    outbox = PostgresOutbox(database)
    capsules = [
        await service.create(CapsuleCreate(owner_id=uuid.uuid4(), capsule_type="note"))
        for _ in range(3)
    ]

    async def edit(capsule_id: uuid.UUID, writer: int) -> None:
        for n in range(8):
            while True:
                try:
                    await service.update(
                        capsule_id, CapsuleUpdate(title=f"{writer}-{n}"), actor_id=uuid.uuid4()
                    )
                    break
                except ConflictError:
                    await asyncio.sleep(0)

    async with OutboxRelay(outbox, target, FAST):
        await asyncio.gather(*(edit(c.id, w) for c in capsules for w in range(3)))
        await wait_until(lambda: drained(outbox), timeout=30, message="outbox not drained")

    versions: dict[str | None, list[str]] = {}
    for record in await read_all(target):
        event = parse_event(record.value)
        version = event.data.get("new_version") or event.data.get("version")
        versions.setdefault(record.key, []).append(version)
    assert versions == {str(c.id): [str(v) for v in range(1, 26)] for c in capsules}


async def test_relay_start_and_stop_are_idempotent(
    database: PostgresDatabase, target: SqliteEventLog
) -> None:
    relay = OutboxRelay(PostgresOutbox(database), target, FAST)

    await relay.stop()
    await relay.start()
    await relay.start()
    await wait_until(lambda: asyncio.sleep(0, relay.is_active), timeout=10, message="no leader")
    await relay.stop()
    await relay.stop()

    assert not relay.is_running
    assert not relay.is_active


# Helpers ---------------------------------------------------------------------------------------


async def count_at_least(target: SqliteEventLog, count: int) -> bool:
    return len(await read_all(target)) >= count


async def start_worker(
    dsn: str, schema: str, target_path: Path, tmp_path: Path, *, delay: float
) -> asyncio.subprocess.Process:
    """Start `relay_worker.py` and wait until it is the active relay."""
    log = (tmp_path / "worker.log").open("ab")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        dsn,
        schema,
        str(target_path),
        "16",
        str(delay),
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
    )
    log.close()
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"The relay worker did not become active; see {tmp_path / 'worker.log'}")
    assert line.strip() == b"active", (tmp_path / "worker.log").read_text()
    return process


async def test_cli_lists_and_requeues_rejected_rows(
    database: PostgresDatabase, postgres_dsn: str, tmp_path: Path
) -> None:
    event = update_event(uuid.uuid4(), 1)
    await append_to_outbox(database, [event])
    outbox = PostgresOutbox(database)
    [row] = await outbox.records()
    await database.execute(
        "UPDATE outbox SET rejected_at = now(), last_error = 'too large' WHERE id = $1", row.id
    )

    async def forge(*args: str) -> tuple[int, str, str]:
        # A process of its own, because the command line configures logging for the process.
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "forge.cli.main",
            *args,
            env={
                **os.environ,
                "FORGE_EVENT_BACKEND": "kafka",
                "FORGE_POSTGRES_DSN": postgres_dsn,
                "FORGE_POSTGRES_SCHEMA": database.schema,
                "FORGE_DATA_DIR": str(tmp_path),
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 120)
        return process.returncode or 0, out.decode(), err.decode()

    listed = await forge("outbox", "list", "--json")
    requeued = await forge("outbox", "requeue", str(row.id))

    assert listed[0] == 0, listed[2]
    printed = json.loads(listed[1].splitlines()[0])
    assert (printed["id"], printed["event_id"], printed["reason"]) == (
        row.id,
        str(event.id),
        "too large",
    )
    assert requeued[0] == 0, requeued[2]
    assert "1 row(s) requeued" in requeued[1]
    assert await outbox.rejected_count() == 0
    assert await outbox.pending_count() == 1
