"""One SQLite file holding the embedded event log and every store.

All statements run on one connection in one dedicated thread, so the event loop never blocks on
disk and the connection is never shared between threads. Several processes may open the same
file: SQLite's WAL mode lets them read while one writes, and `busy_timeout` makes a writer wait
for another process's write instead of failing at once.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from forge.exceptions import (
    NotStartedError,
    StorageError,
    StorageFullError,
    StorageUnavailableError,
)
from forge.infrastructure.sqlite.schema import migrate
from forge.logging import get_logger

logger = get_logger(__name__)

T = TypeVar("T")


def translate_error(error: sqlite3.Error, path: Path) -> StorageError:
    """Map a sqlite3 error to Forge's storage errors, naming the file and the fix."""
    message = str(error)
    lowered = message.lower()
    # SQLite reports a full disk as SQLITE_FULL, but can also report it as a disk I/O error
    # when the WAL file cannot grow; both mean nothing of the write was kept.
    if (
        "disk is full" in lowered
        or "disk i/o error" in lowered
        or "database or disk is full" in lowered
    ):
        return StorageFullError(
            f"Writing to {path} failed: {message}. Nothing of this write was stored; free disk "
            "space on that file system, then retry."
        )
    if "locked" in lowered or "busy" in lowered:
        return StorageUnavailableError(
            f"{path} stayed locked by another writer longer than the busy timeout ({message}). "
            "Retry, or raise FORGE_SQLITE_BUSY_TIMEOUT_SECONDS."
        )
    if "unable to open" in lowered or "readonly" in lowered or "read-only" in lowered:
        return StorageUnavailableError(
            f"Cannot open {path} for writing ({message}). Check that the folder exists and is "
            "writable, or point FORGE_DATA_DIR elsewhere."
        )
    return StorageError(f"SQLite operation on {path} failed: {message}")


class SqliteDatabase:
    """An open SQLite database, used as an async context manager or with `open()`/`close()`."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "FULL",
        busy_timeout_seconds: float = 10.0,
    ) -> None:
        self.path = Path(path)
        self._synchronous = synchronous
        self._busy_timeout_ms = int(busy_timeout_seconds * 1000)
        self._executor: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None
        self._append_waiters: set[asyncio.Future[None]] = set()

    async def __aenter__(self) -> SqliteDatabase:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def is_open(self) -> bool:
        return self._connection is not None

    async def open(self) -> None:
        """Open the file, creating it and its folder, and bring the schema up to date."""
        if self._connection is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forge-sqlite")
        try:
            self._connection = await self._submit(self._connect)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        logger.debug("sqlite_opened", path=str(self.path))

    async def close(self) -> None:
        """Close the connection; calling it twice is fine."""
        if self._connection is None or self._executor is None:
            return
        connection, self._connection = self._connection, None
        executor, self._executor = self._executor, None
        await asyncio.get_running_loop().run_in_executor(executor, connection.close)
        executor.shutdown(wait=True)

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageUnavailableError(
                f"Cannot create the data folder {self.path.parent} ({error}). Point "
                "FORGE_DATA_DIR at a writable folder."
            ) from error
        try:
            connection = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=0
            )
            connection.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute(f"PRAGMA synchronous = {self._synchronous}")
            connection.execute("PRAGMA foreign_keys = ON")
            migrate(connection)
        except sqlite3.Error as error:
            raise translate_error(error, self.path) from error
        return connection

    async def _submit(self, function: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise NotStartedError(f"SQLite database {self.path} is not open; call open() first")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def read(self, function: Callable[[sqlite3.Connection], T]) -> T:
        """Run `function(connection)` outside any explicit transaction."""
        return await self._submit(self._run_read, function)

    async def write(self, function: Callable[[sqlite3.Connection], T]) -> T:
        """Run `function(connection)` in one write transaction, committed when it returns.

        The transaction starts with BEGIN IMMEDIATE, so it holds the write lock from the start
        and cannot fail half-way because another process wrote first. If `function` raises,
        nothing it wrote is kept.
        """
        return await self._submit(self._run_write, function)

    def notify_appended(self) -> None:
        """Wake this process's consumers waiting in `wait_for_append`."""
        waiters, self._append_waiters = self._append_waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for_append(self, timeout: float) -> None:
        """Wait until this process appends to the event log, or `timeout` seconds pass.

        Appends by other processes are not signalled; consumers see them on their next poll.
        """
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._append_waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            pass
        finally:
            self._append_waiters.discard(waiter)

    def _run_read(self, function: Callable[[sqlite3.Connection], T]) -> T:
        connection = self._require_connection()
        try:
            return function(connection)
        except sqlite3.Error as error:
            raise translate_error(error, self.path) from error

    def _run_write(self, function: Callable[[sqlite3.Connection], T]) -> T:
        connection = self._require_connection()
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise translate_error(error, self.path) from error
        try:
            result = function(connection)
            connection.execute("COMMIT")
        except BaseException as error:
            if connection.in_transaction:
                try:
                    connection.execute("ROLLBACK")
                except sqlite3.Error:
                    logger.exception("sqlite_rollback_failed", path=str(self.path))
            if isinstance(error, sqlite3.Error):
                raise translate_error(error, self.path) from error
            raise
        return result

    def _require_connection(self) -> sqlite3.Connection:
        if self._connection is None:
            raise NotStartedError(f"SQLite database {self.path} is not open; call open() first")
        return self._connection
