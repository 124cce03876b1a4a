"""A PostgreSQL restart or crash while writing: retriable errors during the outage, no loss.

These tests restart the server shared by the whole suite, through `scripts/postgres-server`,
and start it again if a step fails.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import pytest

from forge.core.capsules.service import CapsuleService
from forge.core.events.outbox import OutboxRelay, RelaySettings
from forge.exceptions import StorageUnavailableError
from forge.infrastructure.postgres.capsule_store import PostgresCapsuleStore
from forge.infrastructure.postgres.database import PostgresDatabase
from forge.infrastructure.postgres.outbox import PostgresOutbox
from forge.infrastructure.sqlite.event_log import SqliteEventLog
from forge.models.capsule import CapsuleCreate
from tests.postgres.conftest import SERVER_SCRIPT
from tests.postgres.helpers import read_all, wait_until
from tests.processes import ENVIRONMENT_AT_START

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

WRITES_AFTER_OUTAGE = 30
RELAY_SETTINGS = RelaySettings(
    batch_size=50,
    poll_interval_seconds=0.02,
    initial_backoff_seconds=0.05,
    max_backoff_seconds=0.2,
)


@dataclass
class WriteLog:
    acknowledged: list[uuid.UUID] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)
    other_errors: list[BaseException] = field(default_factory=list)


async def run_server_script(*commands: str) -> None:
    for command in commands:
        process = await asyncio.create_subprocess_exec(
            str(SERVER_SCRIPT),
            command,
            # The root conftest removes FORGE_* variables for each test; the script needs the
            # data and run folders the test run started the server with.
            env=ENVIRONMENT_AT_START,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode == 0, f"postgres-server {command} failed: {stderr.decode()}"


async def write_through_outage(service: CapsuleService, *commands: str) -> WriteLog:
    """Create capsules while the server script runs `commands`, then until enough succeed."""
    log = WriteLog()
    outage_over = asyncio.Event()

    async def writer() -> None:
        after_outage = 0
        while after_outage < WRITES_AFTER_OUTAGE:
            capsule_id = uuid.uuid4()
            try:
                await service.create(
                    CapsuleCreate(owner_id=uuid.uuid4(), capsule_type="note"),
                    capsule_id=capsule_id,
                )
            except StorageUnavailableError as error:
                log.unavailable.append(str(error))
                await asyncio.sleep(0.02)
                continue
            except Exception as error:
                log.other_errors.append(error)
                return
            log.acknowledged.append(capsule_id)
            if outage_over.is_set():
                after_outage += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(writer())
    try:
        await wait_until(
            lambda: asyncio.sleep(0, len(log.acknowledged) >= 20),
            timeout=30,
            message="no write succeeded before the outage",
        )
        await run_server_script(*commands)
        outage_over.set()
        await asyncio.wait_for(task, timeout=60)
    finally:
        task.cancel()
        # A failed step must not leave the rest of the suite without a server.
        await run_server_script("start")
    return log


async def check_nothing_acknowledged_lost(
    database: PostgresDatabase, target: SqliteEventLog, log: WriteLog
) -> None:
    store = PostgresCapsuleStore(database)
    outbox = PostgresOutbox(database)
    stored_ids = {capsule.id for capsule in await store.list(limit=100_000)}
    rows_per_capsule = await database.fetch("SELECT key, count(*) AS rows FROM outbox GROUP BY key")
    published_keys = {record.key for record in await read_all(target)}

    assert log.other_errors == []
    assert log.unavailable, "the outage produced no StorageUnavailableError"
    assert all("scripts/postgres-server start" in message for message in log.unavailable)
    assert set(log.acknowledged) <= stored_ids
    # A write that failed during the commit may have been stored; it must then have its
    # outbox row like any other.
    assert {row["key"] for row in rows_per_capsule} == {str(i) for i in stored_ids}
    assert all(row["rows"] == 1 for row in rows_per_capsule)
    assert await outbox.pending_count() == 0
    assert {str(capsule_id) for capsule_id in stored_ids} <= published_keys


@pytest.mark.parametrize("commands", [("restart",), ("kill", "start")], ids=["restart", "crash"])
async def test_writes_and_relay_survive_server_outage(
    postgres_dsn: str, schema: str, target: SqliteEventLog, commands: tuple[str, ...]
) -> None:
    async with PostgresDatabase(
        postgres_dsn, schema=schema, min_size=2, max_size=5, connect_timeout=2
    ) as database:
        service = CapsuleService(PostgresCapsuleStore(database))
        outbox = PostgresOutbox(database)
        async with OutboxRelay(outbox, target, RELAY_SETTINGS) as relay:
            log = await write_through_outage(service, *commands)
            await wait_until(
                lambda: asyncio.sleep(0, relay.is_active),
                timeout=30,
                message="the relay did not become active again",
            )

            async def drained() -> bool:
                return await outbox.pending_count() == 0

            await wait_until(drained, timeout=30, message="outbox not drained after the outage")

        await check_nothing_acknowledged_lost(database, target, log)


async def test_first_operation_after_restart_succeeds(postgres_dsn: str, schema: str) -> None:
    async with PostgresDatabase(postgres_dsn, schema=schema, min_size=3, max_size=3) as database:
        await asyncio.gather(*(database.fetchval("SELECT pg_sleep(0.01)") for _ in range(3)))

        await run_server_script("restart")
        values = [await database.fetchval("SELECT 1") for _ in range(3)]

    assert values == [1, 1, 1]
