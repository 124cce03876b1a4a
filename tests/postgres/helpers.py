"""Helpers shared by the PostgreSQL tests: bounded waits, events and outbox checks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from forge.core.events.codec import encode_event
from forge.core.events.ports import LogRecord
from forge.infrastructure.postgres.database import PostgresDatabase
from forge.infrastructure.postgres.outbox import PostgresOutbox
from forge.infrastructure.sqlite.event_log import SqliteEventLog
from forge.models.events import CapsuleUpdatedEvent, Event

MAX_EVENT_BYTES = 1024 * 1024


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, timeout: float, message: str
) -> None:
    """Poll `condition` every 20 ms until it holds; fail with `message` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"Timed out after {timeout} s: {message}")
        await asyncio.sleep(0.02)


def update_event(resource_id: uuid.UUID, number: int) -> CapsuleUpdatedEvent:
    """Return the `number`-th update of a capsule, so that a test can check the order."""
    return CapsuleUpdatedEvent.create(
        capsule_id=resource_id,
        actor_id=resource_id,
        old_version=str(number),
        new_version=str(number + 1),
        fields_changed=["title"],
        changes={"title": f"title {number}"},
    )


def interleaved_updates(resources: int, per_resource: int) -> list[Event[Any]]:
    """Return updates of several capsules, interleaved: r0#0, r1#0, ..., r0#1, r1#1, ..."""
    ids = [uuid.uuid4() for _ in range(resources)]
    return [update_event(ids[r], n) for n in range(per_resource) for r in range(resources)]


async def append_to_outbox(
    database: PostgresDatabase, events: Sequence[Event[Any]], *, per_transaction: int = 50
) -> None:
    """Write events as outbox rows, `per_transaction` rows per transaction, in order."""
    outbox = PostgresOutbox(database)
    for start in range(0, len(events), per_transaction):
        chunk = [
            encode_event(event, MAX_EVENT_BYTES)
            for event in events[start : start + per_transaction]
        ]
        async with database.transaction() as connection:
            await outbox.append(connection, chunk)


async def read_all(event_log: SqliteEventLog) -> list[LogRecord]:
    """Return every record of the embedded log, in append order."""
    return [record async for record in event_log.read(from_beginning=True)]


def first_seen_ids_by_key(records: Sequence[LogRecord]) -> dict[str | None, list[str]]:
    """Return, per key, the event ids in the order a consumer first receives them."""
    seen: set[str] = set()
    order: dict[str | None, list[str]] = {}
    for record in records:
        event_id = record.headers["event_id"]
        if event_id in seen:
            continue
        seen.add(event_id)
        order.setdefault(record.key, []).append(event_id)
    return order


def ids_by_key(events: Sequence[Event[Any]]) -> dict[str | None, list[str]]:
    """Return, per key, the event ids in the order they were written."""
    order: dict[str | None, list[str]] = {}
    for event in events:
        order.setdefault(event.key, []).append(str(event.id))
    return order
