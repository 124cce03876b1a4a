"""Run an outbox relay in its own process until it is killed, for the relay crash tests.

Usage: python relay_worker.py DSN SCHEMA TARGET_SQLITE_PATH BATCH_SIZE DELAY_SECONDS

Publishes the outbox of SCHEMA into the embedded event log at TARGET_SQLITE_PATH, sleeping
DELAY_SECONDS before each batch so that a test can kill it part-way. Prints `active` once it
is the active relay.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forge.core.events.outbox import OutboxRelay, RelaySettings
from forge.infrastructure.postgres.database import PostgresDatabase
from forge.infrastructure.postgres.outbox import PostgresOutbox
from forge.infrastructure.sqlite.database import SqliteDatabase
from forge.infrastructure.sqlite.event_log import SqliteEventLog
from forge.logging import configure_logging
from forge.models.events import Event


class SlowPublisher:
    def __init__(self, target: SqliteEventLog, delay: float) -> None:
        self._target = target
        self._delay = delay

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, event: Event[Any]) -> None:
        await self.publish_batch([event])

    async def publish_batch(self, events: Sequence[Event[Any]]) -> None:
        await asyncio.sleep(self._delay)
        await self._target.publish_batch(events)


async def main(dsn: str, schema: str, target_path: str, batch_size: int, delay: float) -> None:
    async with (
        PostgresDatabase(dsn, schema=schema, min_size=1, max_size=2) as database,
        SqliteDatabase(Path(target_path)) as sqlite_database,
        SqliteEventLog(sqlite_database) as target,
    ):
        relay = OutboxRelay(
            PostgresOutbox(database),
            SlowPublisher(target, delay),
            RelaySettings(batch_size=batch_size, poll_interval_seconds=0.02),
        )
        async with relay:
            while not relay.is_active:  # noqa: ASYNC110 - the relay offers no event to wait on
                await asyncio.sleep(0.01)
            print("active", flush=True)
            await asyncio.Event().wait()


if __name__ == "__main__":
    # Logs go to stderr, so that stdout carries only the `active` line.
    configure_logging("INFO")
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])))
