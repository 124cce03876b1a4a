"""Fixtures of the PostgreSQL tests: a real server, and a fresh schema for every test.

The server is the one started by `scripts/postgres-server start`, or the one at
FORGE_POSTGRES_DSN. When it cannot be reached the tests fail, never skip, so that a missing
server is not mistaken for a passing run.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from forge.infrastructure.postgres.database import PostgresDatabase, redact_dsn
from forge.infrastructure.sqlite.database import SqliteDatabase
from forge.infrastructure.sqlite.event_log import SqliteEventLog

# Read at import, before the root conftest removes FORGE_* variables for each test.
POSTGRES_DSN = os.environ.get("FORGE_POSTGRES_DSN", "postgresql://forge@127.0.0.1:54329/forge")
REPOSITORY = Path(__file__).resolve().parents[2]
SERVER_SCRIPT = REPOSITORY / "scripts" / "postgres-server"


async def _probe(dsn: str) -> None:
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        await connection.fetchval("SELECT 1")
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """Return the DSN of a reachable server, or fail every test that needs one."""
    dsn = POSTGRES_DSN
    try:
        asyncio.run(_probe(dsn))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        pytest.fail(
            f"PostgreSQL is not reachable at {redact_dsn(dsn)} ({error!r}). Start it with "
            "`scripts/postgres-server start`, or set FORGE_POSTGRES_DSN to a running server, "
            "then run the tests again.",
            pytrace=False,
        )
    return dsn


@pytest.fixture
async def schema(postgres_dsn: str) -> AsyncIterator[str]:
    """Return the name of a schema private to this test, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    yield name
    connection = await asyncpg.connect(postgres_dsn, timeout=30)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await connection.close()


@pytest.fixture
async def database(postgres_dsn: str, schema: str) -> AsyncIterator[PostgresDatabase]:
    """Return an open database on the test's own schema."""
    async with PostgresDatabase(postgres_dsn, schema=schema, min_size=1, max_size=5) as db:
        yield db


@pytest.fixture
def target_path(tmp_path: Path) -> Path:
    return tmp_path / "target.sqlite3"


@pytest.fixture
async def target(target_path: Path) -> AsyncIterator[SqliteEventLog]:
    """Return a started embedded event log, the publisher that relays publish into."""
    async with SqliteDatabase(target_path) as sqlite_database:
        async with SqliteEventLog(sqlite_database) as event_log:
            yield event_log
