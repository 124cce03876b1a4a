"""A PostgreSQL database holding the stores of the distributed backend.

Connections come from an asyncpg pool. After the server restarts, the pool replaces the closed
connections by itself: an operation that was running when the connection broke raises
`StorageUnavailableError` (retriable), and the next one runs on a new connection.

Driver errors are translated here, once, into Forge's errors; the stores and their callers never
import asyncpg's exceptions.
"""

from __future__ import annotations

import asyncio
import re
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, overload
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from forge.config import ForgeSettings
from forge.exceptions import (
    ConfigurationError,
    ConflictError,
    ForgeError,
    NotStartedError,
    StorageError,
    StorageFullError,
    StorageUnavailableError,
)
from forge.infrastructure.postgres.schema import migrate
from forge.logging import get_logger

logger = get_logger(__name__)

DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
)
"""Exceptions raised by asyncpg or the socket under it; `translate_error` maps each of them."""

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

_START_FIX = (
    "Start it with `scripts/postgres-server start`, or point FORGE_POSTGRES_DSN at a running "
    "server, then retry."
)

# SQLSTATEs after which the same statement may succeed later: the connection or server went
# away, the server is starting or stopping, a resource ran short, or the transaction lost a
# serialization conflict or a deadlock.
_UNAVAILABLE_SQLSTATES = {
    "57P01": "the server is shutting down",
    "57P02": "the server crashed",
    "57P03": "the server is starting up or shutting down",
    "57P05": "the session was idle for too long",
    "57014": "the statement timed out or was cancelled",
    "53000": "the server is short of resources",
    "53200": "the server is out of memory",
    "53300": "the server has no free connection slot",
    "40001": "the transaction conflicted with a concurrent one",
    "40P01": "the transaction was chosen as a deadlock victim",
}


def redact_dsn(dsn: str) -> str:
    """Return `dsn` without its password, for messages and logs."""
    if "://" not in dsn:
        return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", dsn)
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if "@" in netloc:
        user_info, host_info = netloc.rsplit("@", 1)
        netloc = f"{user_info.split(':', 1)[0]}@{host_info}"
    query = urlencode(
        [(name, value) for name, value in parse_qsl(parts.query) if name != "password"]
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def translate_error(error: BaseException, dsn: str) -> ForgeError:
    """Map an asyncpg or socket error to Forge's error, naming the redacted DSN and the fix.

    Lost connections, a server that is down, starting or stopping, timeouts and transient
    conflicts become `StorageUnavailableError`, which is retriable. SQLSTATE 53100 (disk full)
    becomes `StorageFullError`, a unique violation `ConflictError`, and the rest `StorageError`.
    """
    redacted = redact_dsn(dsn)
    if isinstance(error, asyncpg.PostgresError):
        sqlstate = error.sqlstate or ""
        message = str(error)
        if sqlstate == "53100":
            return StorageFullError(
                f"PostgreSQL at {redacted} has no disk space left ({message}). Nothing of the "
                "failed write was stored; free space on the server's data volume, then retry."
            )
        if sqlstate.startswith("08"):
            return StorageUnavailableError(
                f"The connection to PostgreSQL at {redacted} was lost ({message}). {_START_FIX}"
            )
        if sqlstate in _UNAVAILABLE_SQLSTATES:
            return StorageUnavailableError(
                f"PostgreSQL at {redacted} did not complete the operation because "
                f"{_UNAVAILABLE_SQLSTATES[sqlstate]} ({sqlstate}: {message}). "
                + (
                    "Retry the operation."
                    if sqlstate.startswith(("40", "53", "57014"))
                    else _START_FIX
                )
            )
        if sqlstate == "23505":
            constraint = getattr(error, "constraint_name", None) or "a unique constraint"
            return ConflictError(
                f"The write conflicts with a stored row ({constraint}): {message}. Read the "
                "current state and retry the change."
            )
        if sqlstate.startswith("28"):
            return StorageError(
                f"PostgreSQL at {redacted} rejected the login ({message}). Check the user and "
                "password in FORGE_POSTGRES_DSN."
            )
        if sqlstate == "3D000":
            return StorageError(
                f"The database of {redacted} does not exist ({message}). Create it, or run "
                "`scripts/postgres-server start`, which creates the database 'forge'."
            )
        return StorageError(f"PostgreSQL operation on {redacted} failed ({sqlstate}: {message}).")

    if isinstance(error, TimeoutError):
        return StorageUnavailableError(
            f"PostgreSQL at {redacted} did not respond within the timeout. {_START_FIX}"
        )
    if isinstance(error, OSError):
        return StorageUnavailableError(
            f"Cannot reach PostgreSQL at {redacted} ({error.strerror or error}). {_START_FIX}"
        )
    if _is_connection_error(error):
        return StorageUnavailableError(
            f"The connection to PostgreSQL at {redacted} is broken ({error}). {_START_FIX}"
        )
    return StorageError(f"PostgreSQL client error for {redacted}: {error}")


@overload
def storable_text(text: str) -> str: ...


@overload
def storable_text(text: None) -> None: ...


def storable_text(text: str | None) -> str | None:
    """Return `text` with NUL characters written as `\\x00`.

    PostgreSQL's text and jsonb cannot hold NUL. The stores write with it the text that
    Forge keeps beside an exact copy, such as a dead letter's key and headers (the record's
    value is kept as bytes) or an audit row's columns (the event's JSON escapes NUL).
    """
    if text is None or "\x00" not in text:
        return text
    return text.replace("\x00", "\\x00")


class PostgresDatabase:
    """A pool of connections to one PostgreSQL schema, used as an async context manager.

    `open()` creates the pool and brings the schema up to date; `open()` and `close()` may be
    called twice. Every table is created in `schema`, which is created when missing.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        acquire_timeout: float = 30.0,
        command_timeout: float | None = None,
        close_timeout: float = 10.0,
    ) -> None:
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ConfigurationError(
                f"Invalid PostgreSQL schema name {schema!r}; use 1 to 63 lowercase letters, "
                "digits and underscores, not starting with a digit."
            )
        if min_size < 0 or max_size < 1 or min_size > max_size:
            raise ConfigurationError(
                f"Invalid pool size min_size={min_size}, max_size={max_size}; use "
                "0 <= min_size <= max_size and max_size >= 1 (FORGE_POSTGRES_POOL_MIN_SIZE and "
                "FORGE_POSTGRES_POOL_MAX_SIZE)."
            )
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("acquire_timeout", acquire_timeout),
            ("close_timeout", close_timeout),
        ):
            if value <= 0:
                raise ConfigurationError(f"{name} must be above 0 seconds, got {value}.")
        self.schema = schema
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._acquire_timeout = acquire_timeout
        self._command_timeout = command_timeout
        self._close_timeout = close_timeout
        self._pool: Any = None
        self._open_lock = asyncio.Lock()
        self.schema_version = 0

    @classmethod
    def from_settings(
        cls, settings: ForgeSettings, *, schema: str | None = None
    ) -> PostgresDatabase:
        """Build a database from `FORGE_POSTGRES_DSN`, `FORGE_POSTGRES_SCHEMA` (or `schema`)
        and the pool sizes `FORGE_POSTGRES_POOL_MIN_SIZE` and `FORGE_POSTGRES_POOL_MAX_SIZE`.

        Call `open()` before use.

        Raises:
            ConfigurationError: the schema name is invalid, or the minimum pool size is above
                the maximum.
        """
        return cls(
            settings.postgres_dsn,
            schema=schema or settings.postgres_schema,
            min_size=settings.postgres_pool_min_size,
            max_size=settings.postgres_pool_max_size,
        )

    def __repr__(self) -> str:
        return f"PostgresDatabase({self.dsn!r}, schema={self.schema!r})"

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            warnings.warn(
                f"{self!r} was not closed; call close() or use it as an async context manager",
                ResourceWarning,
                stacklevel=1,
            )

    async def __aenter__(self) -> PostgresDatabase:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def dsn(self) -> str:
        """The DSN without its password."""
        return redact_dsn(self._dsn)

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    @property
    def _server_settings(self) -> dict[str, str]:
        return {"search_path": self.schema, "application_name": "forge"}

    def translate_error(self, error: BaseException) -> ForgeError:
        """Map a driver error to Forge's error for this database (see `translate_error`)."""
        return translate_error(error, self._dsn)

    async def open(self) -> None:
        """Create the pool and migrate the schema.

        Raises:
            StorageUnavailableError: the server cannot be reached; the message names the fix.
            StorageError: the login or the migration failed.
        """
        async with self._open_lock:
            if self._pool is not None:
                return
            try:
                pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    timeout=self._connect_timeout,
                    command_timeout=self._command_timeout,
                    server_settings=self._server_settings,
                )
            except asyncpg.TooManyConnectionsError as error:
                raise await self._too_many_connections_error(error) from error
            except DRIVER_ERRORS as error:
                raise self.translate_error(error) from error

            try:
                async with pool.acquire(timeout=self._acquire_timeout) as connection:
                    self.schema_version = await migrate(connection, self.schema)
            except BaseException as error:
                pool.terminate()
                if isinstance(error, DRIVER_ERRORS):
                    raise self.translate_error(error) from error
                raise
            self._pool = pool
        logger.info(
            "postgres_opened",
            dsn=self.dsn,
            schema=self.schema,
            schema_version=self.schema_version,
            max_size=self._max_size,
        )

    async def _too_many_connections_error(
        self, error: asyncpg.TooManyConnectionsError
    ) -> ForgeError:
        """Return the error for a pool whose connections the server rejected as too many.

        When the pool's minimum exceeds the server's connection limit for this user, a retry
        cannot help, so the error is a `ConfigurationError`. Otherwise other clients hold the
        slots, and the error is the retriable one of `translate_error`.
        """
        limit = await self._connection_limit()
        if limit is None or self._min_size <= limit:
            return self.translate_error(error)
        return ConfigurationError(
            f"The connection pool keeps {self._min_size} connections open "
            f"(FORGE_POSTGRES_POOL_MIN_SIZE), but PostgreSQL at {self.dsn} accepts at most "
            f"{limit} connections from this user (max_connections minus the reserved ones). "
            "Lower FORGE_POSTGRES_POOL_MIN_SIZE, or raise max_connections on the server."
        )

    async def _connection_limit(self) -> int | None:
        """Return how many connections the server accepts from this user, or None when no
        connection can be opened to ask it."""
        try:
            connection = await asyncpg.connect(self._dsn, timeout=self._connect_timeout)
        except DRIVER_ERRORS:
            return None
        try:
            limit: int = await connection.fetchval(
                "SELECT current_setting('max_connections')::int - CASE WHEN rolsuper THEN 0 "
                "ELSE current_setting('superuser_reserved_connections')::int "
                "+ coalesce(current_setting('reserved_connections', true)::int, 0) END "
                "FROM pg_roles WHERE rolname = current_user"
            )
        except DRIVER_ERRORS:
            return None
        finally:
            await connection.close(timeout=self._close_timeout)
        return limit

    async def close(self) -> None:
        """Close every connection, waiting at most `close_timeout` for busy ones; idempotent."""
        async with self._open_lock:
            pool, self._pool = self._pool, None
            if pool is None:
                return
            try:
                await asyncio.wait_for(pool.close(), self._close_timeout)
            except TimeoutError:
                logger.warning(
                    "postgres_close_timed_out", dsn=self.dsn, timeout_seconds=self._close_timeout
                )
                pool.terminate()
            except DRIVER_ERRORS as error:
                # The server went away: its connections are gone already, so there is nothing
                # left to close cleanly.
                logger.warning("postgres_close_failed", dsn=self.dsn, error=repr(error))
                pool.terminate()
        logger.info("postgres_closed", dsn=self.dsn, schema=self.schema)

    def _require_pool(self) -> Any:
        if self._pool is None:
            raise NotStartedError(f"{self!r} is not open; call open() first.")
        return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """Lend a pooled connection, outside any explicit transaction.

        Driver errors raised inside the block are translated (see `translate_error`). A
        connection that broke is closed, so the pool opens a new one in its place.

        Raises:
            NotStartedError: the database is not open.
            StorageUnavailableError: no connection could be made, or none was free within
                `acquire_timeout` seconds.
        """
        connection = await self._acquire()
        try:
            yield connection
        except DRIVER_ERRORS as error:
            _discard_if_broken(connection, error)
            raise self.translate_error(error) from error
        finally:
            await self._release(connection)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """Run the block in one transaction on a pooled connection, committed when it exits.

        If the block raises, nothing it wrote is kept. A pooled connection found broken at
        BEGIN, as happens after a server restart, is replaced once without an error, because
        nothing was sent yet. When the connection is lost while the COMMIT is in flight,
        `StorageUnavailableError` is raised although the transaction may have been committed.
        The stores make a retry of such a write safe, because it conflicts or is idempotent.

        Raises:
            NotStartedError: the database is not open.
            StorageUnavailableError: the server is unreachable or the connection was lost.
            StorageFullError: the server's disk is full.
            ConflictError: a unique constraint rejected a write.
        """
        connection, transaction = await self._begin()
        try:
            try:
                yield connection
            except BaseException as error:
                await self._rollback(connection, transaction, error)
                raise
            await transaction.commit()
        except DRIVER_ERRORS as error:
            _discard_if_broken(connection, error)
            raise self.translate_error(error) from error
        finally:
            await self._release(connection)

    async def execute(self, sql: str, *args: Any) -> str:
        """Run one statement on a pooled connection and return its status, like `UPDATE 1`."""
        status: str = await self._run("execute", sql, *args)
        return status

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """Run one query on a pooled connection and return its rows."""
        rows: list[Any] = await self._run("fetch", sql, *args)
        return rows

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        """Run one query on a pooled connection and return its first row, or None."""
        return await self._run("fetchrow", sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """Run one query on a pooled connection and return the first column of its first row."""
        return await self._run("fetchval", sql, *args)

    async def _run(self, method: str, sql: str, *args: Any) -> Any:
        # A statement that the client refused to send, on a connection that broke while idle
        # in the pool, is sent once more on a new connection. Any other failure may have
        # reached the server, so it is raised.
        for attempt in (1, 2):
            connection = await self._acquire()
            try:
                return await getattr(connection, method)(sql, *args)
            except DRIVER_ERRORS as error:
                _discard_if_broken(connection, error)
                if attempt == 2 or not _was_not_sent(error):
                    raise self.translate_error(error) from error
                logger.info("postgres_connection_replaced", dsn=self.dsn, error=repr(error))
            finally:
                await self._release(connection)
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _begin(self) -> tuple[Any, Any]:
        for attempt in (1, 2):
            connection = await self._acquire()
            transaction = connection.transaction()
            try:
                await transaction.start()
            except DRIVER_ERRORS as error:
                _discard_if_broken(connection, error)
                await self._release(connection)
                # BEGIN changes nothing, so it is safe to send again whatever happened to it.
                if attempt == 2 or not _is_connection_error(error):
                    raise self.translate_error(error) from error
                logger.info("postgres_connection_replaced", dsn=self.dsn, error=repr(error))
            except BaseException:
                await self._release(connection)
                raise
            else:
                return connection, transaction
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _rollback(self, connection: Any, transaction: Any, cause: BaseException) -> None:
        """Roll back after the block raised `cause`, which is then raised unchanged."""
        if _is_closed(connection) or _is_connection_error(cause):
            # The server rolls back by itself the transaction of a connection that ended.
            _discard_if_broken(connection, cause)
            return
        try:
            await transaction.rollback()
        except DRIVER_ERRORS as error:
            _discard_if_broken(connection, error)
            logger.warning("postgres_rollback_failed", dsn=self.dsn, error=repr(error))

    async def _acquire(self) -> Any:
        pool = self._require_pool()
        try:
            return await pool.acquire(timeout=self._acquire_timeout)
        except TimeoutError as error:
            raise StorageUnavailableError(
                f"No connection to PostgreSQL at {self.dsn} was free or could be opened within "
                f"{self._acquire_timeout} s (pool max_size={self._max_size}). Retry, raise the "
                f"pool size, or start the server with `scripts/postgres-server start`."
            ) from error
        except DRIVER_ERRORS as error:
            raise self.translate_error(error) from error

    async def _release(self, connection: Any) -> None:
        pool = self._pool
        if pool is None:
            connection.terminate()
            return
        try:
            await pool.release(connection)
        except DRIVER_ERRORS as error:
            # The pool discards a connection it cannot reset and opens a new one later.
            logger.warning("postgres_release_failed", dsn=self.dsn, error=repr(error))

    async def connect_dedicated(self) -> Any:
        """Open a connection outside the pool, with the same schema and timeouts.

        For session-level state that must live exactly as long as one connection, such as the
        outbox relay's advisory lock. The caller must close it.

        Raises:
            StorageUnavailableError: the server cannot be reached.
        """
        self._require_pool()
        try:
            return await asyncpg.connect(
                self._dsn,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                server_settings=self._server_settings,
            )
        except DRIVER_ERRORS as error:
            raise self.translate_error(error) from error


def status_count(status: str) -> int:
    """Return the row count of a command status such as `UPDATE 3` or `INSERT 0 1`."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


def _is_connection_error(error: BaseException) -> bool:
    """Return whether `error` means the connection itself is unusable."""
    if isinstance(error, OSError | asyncpg.PostgresConnectionError):
        return True
    if isinstance(error, asyncpg.PostgresError):
        return error.sqlstate in {"57P01", "57P02", "57P03"}
    if isinstance(error, asyncpg.InterfaceError):
        return "closed" in str(error)
    return isinstance(error, asyncpg.exceptions.InternalClientError)


def _was_not_sent(error: BaseException) -> bool:
    """Return whether asyncpg refused `error`'s statement before sending it to the server.

    asyncpg raises these from its connection checks when the connection is closed, or when its
    protocol is still handling a message the server sent before it went away.
    """
    if isinstance(error, asyncpg.InterfaceError):
        return "connection is closed" in str(error)
    return type(
        error
    ) is asyncpg.exceptions.InternalClientError and "cannot switch to state" in str(error)


def _is_closed(connection: Any) -> bool:
    try:
        return bool(connection.is_closed())
    except asyncpg.InterfaceError:
        # asyncpg hands a pooled connection back to its pool as soon as the connection closes,
        # after which every method of the lent object raises.
        return True


def _discard_if_broken(connection: Any, error: BaseException) -> None:
    """Close a connection that `error` left unusable, so the pool replaces it."""
    if _is_connection_error(error) and not _is_closed(connection):
        connection.terminate()
