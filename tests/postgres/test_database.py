"""PostgresDatabase: lifecycle, migrations, transactions and error translation."""

from __future__ import annotations

import asyncio
import socket

import asyncpg
import pytest

from forge.config import ForgeSettings
from forge.exceptions import (
    ConfigurationError,
    ConflictError,
    NotStartedError,
    StorageError,
    StorageFullError,
    StorageUnavailableError,
)
from forge.infrastructure.postgres.database import PostgresDatabase, redact_dsn, translate_error
from forge.infrastructure.postgres.schema import MIGRATIONS, VERSION_TABLE

pytestmark = pytest.mark.postgres


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_open_and_close_twice(postgres_dsn: str, schema: str) -> None:
    database = PostgresDatabase(postgres_dsn, schema=schema)

    await database.open()
    await database.open()
    assert database.is_open
    assert await database.fetchval("SELECT 1") == 1
    await database.close()
    await database.close()

    assert not database.is_open


async def test_use_before_open_raises_not_started(postgres_dsn: str, schema: str) -> None:
    database = PostgresDatabase(postgres_dsn, schema=schema)

    with pytest.raises(NotStartedError, match="call open\\(\\) first"):
        await database.fetchval("SELECT 1")


async def test_context_manager_creates_schema_and_tables(postgres_dsn: str, schema: str) -> None:
    async with PostgresDatabase(postgres_dsn, schema=schema) as database:
        tables = {
            row["table_name"]
            for row in await database.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
                schema,
            )
        }
        version = await database.fetchval(f"SELECT max(version) FROM {VERSION_TABLE}")

    assert {"capsules", "outbox", "inbox", "audit_trail", "dead_letters"} <= tables
    assert version == len(MIGRATIONS)
    assert not database.is_open


async def test_concurrent_opens_migrate_once(postgres_dsn: str, schema: str) -> None:
    databases = [PostgresDatabase(postgres_dsn, schema=schema, min_size=0) for _ in range(5)]

    await asyncio.gather(*(database.open() for database in databases))
    try:
        rows = await databases[0].fetch(f"SELECT version FROM {VERSION_TABLE} ORDER BY version")
    finally:
        await asyncio.gather(*(database.close() for database in databases))

    assert [row["version"] for row in rows] == list(range(1, len(MIGRATIONS) + 1))
    assert all(database.schema_version == len(MIGRATIONS) for database in databases)


async def test_reopen_keeps_data(postgres_dsn: str, schema: str) -> None:
    async with PostgresDatabase(postgres_dsn, schema=schema) as database:
        await database.execute(
            "INSERT INTO inbox (group_id, event_id, event_type) "
            "VALUES ('g', gen_random_uuid(), 'capsule.created')"
        )
    async with PostgresDatabase(postgres_dsn, schema=schema) as database:
        assert await database.fetchval("SELECT count(*) FROM inbox") == 1


async def test_transaction_rolls_back_when_block_raises(database: PostgresDatabase) -> None:
    with pytest.raises(ValueError, match="stop here"):
        async with database.transaction() as connection:
            await connection.execute(
                "INSERT INTO inbox (group_id, event_id, event_type) "
                "VALUES ('g', gen_random_uuid(), 'capsule.created')"
            )
            raise ValueError("stop here")

    assert await database.fetchval("SELECT count(*) FROM inbox") == 0


async def test_transaction_translates_driver_errors(database: PostgresDatabase) -> None:
    with pytest.raises(StorageError, match="42P01") as raised:
        async with database.transaction() as connection:
            await connection.execute("SELECT * FROM no_such_table")

    assert isinstance(raised.value.__cause__, asyncpg.PostgresError)


async def test_unique_violation_becomes_conflict(database: PostgresDatabase) -> None:
    insert = (
        "INSERT INTO inbox (group_id, event_id, event_type) "
        "VALUES ('g', '00000000-0000-0000-0000-000000000001', 'capsule.created')"
    )
    await database.execute(insert)

    with pytest.raises(ConflictError, match="inbox_pkey"):
        await database.execute(insert)


async def test_unreachable_server_names_dsn_and_fix(schema: str) -> None:
    dsn = f"postgresql://forge:secret@127.0.0.1:{free_port()}/forge"
    database = PostgresDatabase(dsn, schema=schema, connect_timeout=5)

    with pytest.raises(StorageUnavailableError) as raised:
        await database.open()

    message = str(raised.value)
    assert "postgresql://forge@127.0.0.1:" in message
    assert "secret" not in message
    assert "scripts/postgres-server start" in message
    assert raised.value.retriable
    assert not database.is_open


def test_redact_dsn_removes_password() -> None:
    assert (
        redact_dsn("postgresql://forge:secret@127.0.0.1:54329/forge?sslmode=disable")
        == "postgresql://forge@127.0.0.1:54329/forge?sslmode=disable"
    )
    assert (
        redact_dsn("postgresql://forge@127.0.0.1/forge?password=secret&application_name=x")
        == "postgresql://forge@127.0.0.1/forge?application_name=x"
    )
    assert redact_dsn("host=127.0.0.1 password=secret user=forge") == (
        "host=127.0.0.1 password=*** user=forge"
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (asyncpg.exceptions.DiskFullError("could not extend file"), StorageFullError),
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), StorageUnavailableError),
        (asyncpg.exceptions.CannotConnectNowError("starting up"), StorageUnavailableError),
        (asyncpg.exceptions.CrashShutdownError("crash"), StorageUnavailableError),
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed"), StorageUnavailableError),
        (asyncpg.exceptions.TooManyConnectionsError("too many"), StorageUnavailableError),
        (asyncpg.exceptions.SerializationError("conflict"), StorageUnavailableError),
        (asyncpg.exceptions.DeadlockDetectedError("deadlock"), StorageUnavailableError),
        (asyncpg.exceptions.UniqueViolationError("duplicate key"), ConflictError),
        (asyncpg.exceptions.InvalidPasswordError("bad password"), StorageError),
        (asyncpg.exceptions.UndefinedTableError("no table"), StorageError),
        (
            asyncpg.InterfaceError("cannot perform operation: connection is closed"),
            StorageUnavailableError,
        ),
        (ConnectionRefusedError(111, "Connection refused"), StorageUnavailableError),
        (ConnectionResetError(104, "Connection reset by peer"), StorageUnavailableError),
        (TimeoutError(), StorageUnavailableError),
    ],
)
def test_translate_error_maps_driver_errors(error: BaseException, expected: type) -> None:
    translated = translate_error(error, "postgresql://forge:secret@127.0.0.1:54329/forge")

    assert type(translated) is expected
    assert "secret" not in str(translated)


def test_disk_full_message_names_the_fix() -> None:
    translated = translate_error(
        asyncpg.exceptions.DiskFullError("could not extend file"),
        "postgresql://forge@127.0.0.1:54329/forge",
    )

    assert str(translated) == (
        "PostgreSQL at postgresql://forge@127.0.0.1:54329/forge has no disk space left (could "
        "not extend file). Nothing of the failed write was stored; free space on the server's "
        "data volume, then retry."
    )
    assert translated.retriable


def test_server_shutdown_message_names_the_fix() -> None:
    translated = translate_error(
        asyncpg.exceptions.AdminShutdownError(
            "terminating connection due to administrator command"
        ),
        "postgresql://forge@127.0.0.1:54329/forge",
    )

    assert str(translated) == (
        "PostgreSQL at postgresql://forge@127.0.0.1:54329/forge did not complete the operation "
        "because the server is shutting down (57P01: terminating connection due to "
        "administrator command). Start it with `scripts/postgres-server start`, or point "
        "FORGE_POSTGRES_DSN at a running server, then retry."
    )


@pytest.mark.parametrize("name", ["Public", "1abc", "a-b", "x" * 64, ""])
def test_invalid_schema_name_is_rejected(name: str) -> None:
    with pytest.raises(ConfigurationError, match="Invalid PostgreSQL schema name"):
        PostgresDatabase("postgresql://forge@127.0.0.1:54329/forge", schema=name)


def test_invalid_pool_size_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="Invalid pool size"):
        PostgresDatabase("postgresql://forge@127.0.0.1:54329/forge", min_size=3, max_size=2)


async def test_pool_sizes_from_settings(postgres_dsn: str, schema: str) -> None:
    settings = ForgeSettings(
        postgres_dsn=postgres_dsn,
        postgres_schema=schema,
        postgres_pool_min_size=2,
        postgres_pool_max_size=3,
    )

    async with PostgresDatabase.from_settings(settings) as database:
        assert database._pool.get_min_size() == 2
        assert database._pool.get_max_size() == 3


def test_pool_sizes_in_wrong_order_rejected() -> None:
    settings = ForgeSettings(postgres_pool_min_size=4, postgres_pool_max_size=2)

    with pytest.raises(ConfigurationError) as caught:
        PostgresDatabase.from_settings(settings)

    assert "min_size=4, max_size=2" in str(caught.value)
    assert "FORGE_POSTGRES_POOL_MAX_SIZE" in str(caught.value)


async def test_pool_exhaustion_raises_unavailable(postgres_dsn: str, schema: str) -> None:
    async with PostgresDatabase(
        postgres_dsn, schema=schema, min_size=1, max_size=1, acquire_timeout=0.2
    ) as database:
        async with database.connection():
            with pytest.raises(StorageUnavailableError, match="max_size=1"):
                await database.fetchval("SELECT 1")


async def test_pool_minimum_above_server_limit_rejected(postgres_dsn: str, schema: str) -> None:
    probe = await asyncpg.connect(postgres_dsn)
    try:
        limit = int(await probe.fetchval("SELECT current_setting('max_connections')"))
    finally:
        await probe.close()
    database = PostgresDatabase(postgres_dsn, schema=schema, min_size=limit + 5, max_size=limit + 5)

    # A retry cannot help, so the error is not retriable and start-up fails at once.
    with pytest.raises(ConfigurationError) as caught:
        await database.open()

    assert caught.value.retriable is False
    assert f"keeps {limit + 5} connections open (FORGE_POSTGRES_POOL_MIN_SIZE)" in str(caught.value)
    assert "raise max_connections on the server" in str(caught.value)
    # asyncpg closed the connections it had opened before the rejection.
    async with PostgresDatabase(postgres_dsn, schema=schema, min_size=5) as reopened:
        assert await reopened.fetchval("SELECT 1") == 1


async def test_slots_held_by_others_stay_retriable(postgres_dsn: str, schema: str) -> None:
    others: list[asyncpg.Connection] = []
    try:
        # Take every free slot, then give two back.
        while True:
            try:
                others.append(await asyncpg.connect(postgres_dsn))
            except asyncpg.TooManyConnectionsError:
                break
        for connection in others[-2:]:
            await connection.close()
        del others[-2:]

        # Three connections fit within the limit, but only two slots are free.
        with pytest.raises(StorageUnavailableError) as caught:
            await PostgresDatabase(postgres_dsn, schema=schema, min_size=3, max_size=3).open()
    finally:
        await asyncio.gather(*(connection.close() for connection in others))

    assert caught.value.retriable is True
    assert "has no free connection slot" in str(caught.value)
