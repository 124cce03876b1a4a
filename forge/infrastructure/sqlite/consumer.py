"""Consumer of the embedded event log, with the interface of the Kafka consumer.

A consumer group keeps one committed position (the next offset to handle) per topic. Positions
are committed after every fetched batch, and only for records that were handled or parked, so
a consumer stopped or killed at any point handles from where it left off on restart: nothing is
skipped, and at most the last uncommitted batch is delivered again.

The embedded log supports one active member per consumer group. A second process that starts
the same group gets `ConsumerGroupError`; use distinct groups or the Kafka backend to spread a
group over processes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from forge.config import ForgeSettings
from forge.core.events.dead_letters import DeadLetterStore
from forge.core.events.dispatch import (
    Dispatcher,
    HandlerRegistrations,
    HandlerRegistry,
    RetryPolicy,
    check_group_id,
)
from forge.core.events.ports import LogRecord
from forge.exceptions import ConsumerGroupError, ForgeError, NotStartedError
from forge.infrastructure.sqlite.database import SqliteDatabase
from forge.infrastructure.sqlite.dead_letters import SqliteDeadLetterStore
from forge.infrastructure.sqlite.event_log import fetch_pending, max_seq, rows_to_records
from forge.logging import get_logger
from forge.models.events import EventType, topic_for

logger = get_logger(__name__)

_RETRY_CHECK_INTERVAL_SECONDS = 1.0


class SqliteEventConsumer(HandlerRegistrations):
    """One member of a consumer group on the embedded event log."""

    def __init__(
        self,
        database: SqliteDatabase,
        group_id: str,
        *,
        settings: ForgeSettings | None = None,
        dead_letters: DeadLetterStore | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        check_group_id(group_id)
        settings = settings or ForgeSettings()
        self._database = database
        self._group_id = group_id
        self._settings = settings
        self._dead_letters = dead_letters or SqliteDeadLetterStore(database)
        self._registry = HandlerRegistry()
        self._stopping = asyncio.Event()
        self._dispatcher = Dispatcher(
            group_id,
            self._registry,
            retry_policy or RetryPolicy.from_settings(settings),
            settings.max_event_bytes,
            self._stopping,
        )
        self._member_id = uuid.uuid4().hex
        self._topics: list[str] = []
        self._positions: dict[str, int] = {}
        self._cursor = 0
        self._started = False
        self._running: asyncio.Task[None] | None = None
        self._last_heartbeat = 0.0
        self._last_retry_check = 0.0
        self.handled_count = 0
        self.parked_count = 0

    @property
    def group_id(self) -> str:
        return self._group_id

    @property
    def positions(self) -> dict[str, int]:
        """Committed position (next offset to handle) per subscribed topic."""
        return dict(self._positions)

    async def __aenter__(self) -> SqliteEventConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self, event_types: Sequence[EventType] | None = None) -> None:
        """Join the consumer group and load its positions.

        Subscribes to `event_types`, or to every type a handler is registered for.

        Raises:
            ConsumerGroupError: another live process is a member of this group.
        """
        if self._started:
            return
        types = (
            list(event_types)
            if event_types is not None
            else sorted(self._registry.event_types, key=lambda item: item.value)
        )
        if not types:
            raise ValueError(
                f"Consumer group {self._group_id!r} has no event types to consume; register a "
                "handler or pass event_types to start()."
            )
        await self._database.open()
        self._topics = [topic_for(event_type) for event_type in types]
        await self._database.write(self._join)
        self._positions, self._cursor = await self._database.read(self._load_positions)
        self._stopping.clear()
        self._started = True
        logger.info(
            "consumer_started",
            group_id=self._group_id,
            topics=len(self._topics),
            member_id=self._member_id,
        )

    async def run(self) -> None:
        """Handle events until `stop()` is called.

        A storage error that may pass (a locked or full disk) is logged and retried after a
        pause; any other error stops the loop and is raised here.
        """
        if not self._started:
            raise NotStartedError(f"Consumer {self._group_id!r} is not started; call start()")
        self._running = asyncio.current_task()
        pause = self._settings.consumer_poll_interval_seconds
        try:
            while not self._stopping.is_set():
                try:
                    worked = await self.poll_once()
                    pause = self._settings.consumer_poll_interval_seconds
                except ForgeError as error:
                    if not error.retriable:
                        raise
                    pause = min(max(pause * 2, 0.1), 5.0)
                    logger.warning(
                        "consumer_poll_failed",
                        group_id=self._group_id,
                        error=str(error),
                        retry_in_seconds=pause,
                    )
                    worked = False
                if not worked:
                    await self._wait(pause)
        finally:
            self._running = None

    async def poll_once(self) -> bool:
        """Fetch and handle one batch, and any dead letters waiting for redelivery.

        Returns whether any record was handled, so that callers know whether to wait.
        """
        now = time.monotonic()
        if now - self._last_heartbeat > self._settings.consumer_session_timeout_seconds / 3:
            await self._database.write(self._heartbeat)
            self._last_heartbeat = now
        worked = False
        if now - self._last_retry_check > _RETRY_CHECK_INTERVAL_SECONDS:
            self._last_retry_check = now
            worked = await self._redeliver_requested()
        return await self._handle_batch() or worked

    async def drain(self, timeout: float = 30.0) -> int:
        """Handle everything appended so far; return the number of records handled or parked.

        For tests and command-line tools that consume without running a loop.
        """
        if not self._started:
            raise NotStartedError(f"Consumer {self._group_id!r} is not started; call start()")
        handled_before = self.handled_count
        deadline = time.monotonic() + timeout
        self._last_retry_check = 0.0
        # A stop during a retry wait leaves the batch unfinished; polling on would call the
        # handler again at once, without backoff, until the deadline.
        while not self._stopping.is_set() and await self.poll_once():
            if time.monotonic() > deadline:
                raise TimeoutError(f"drain() of {self._group_id!r} took over {timeout} s")
        return self.handled_count - handled_before

    async def stop(self) -> None:
        """Stop the loop, keep the committed positions and leave the group; idempotent.

        A handler being retried is interrupted; its event is not committed and is delivered
        again on the next start.
        """
        if not self._started:
            return
        self._stopping.set()
        running = self._running
        if running is not None and running is not asyncio.current_task():
            try:
                await asyncio.wait_for(
                    asyncio.shield(running), self._settings.consumer_stop_timeout_seconds
                )
            except TimeoutError:
                logger.warning("consumer_stop_timed_out", group_id=self._group_id)
                running.cancel()
            except Exception as error:
                logger.error("consumer_loop_failed", group_id=self._group_id, error=repr(error))
        self._started = False
        try:
            await self._database.write(self._leave)
        except ForgeError as error:
            logger.warning("consumer_leave_failed", group_id=self._group_id, error=str(error))
        logger.info("consumer_stopped", group_id=self._group_id)

    # Handling ----------------------------------------------------------------------------------

    async def _handle_batch(self) -> bool:
        batch_size = self._settings.consumer_batch_size
        positions, cursor = dict(self._positions), self._cursor
        rows = await self._database.read(
            lambda connection: fetch_pending(connection, positions, cursor, batch_size)
        )
        if not rows:
            return False
        last_seq = rows[-1][0]
        records = rows_to_records(rows)
        # Records below the committed position were handled before a restart.
        pending = [record for record in records if record.offset >= self._positions[record.topic]]
        if not pending:
            self._cursor = last_seq
            return True

        result = await self._dispatcher.dispatch(pending)
        if result.dead_letters:
            await self._dead_letters.park(result.dead_letters)
            self.parked_count += len(result.dead_letters)
        done = pending[: result.completed]
        self.handled_count += len(done)

        # The positions are committed only now, after every record up to here was handled
        # or parked durably: a crash before this line delivers the batch again.
        advanced = self._advance(done)
        if advanced:
            await self._database.write(lambda connection: self._commit(connection, advanced))
        if result.completed == len(pending):
            self._cursor = last_seq
        else:
            seq_by_record = {(row[1], row[2]): row[0] for row in rows}
            interrupted = pending[result.completed]
            self._cursor = seq_by_record[(interrupted.topic, interrupted.offset)] - 1
        return True

    def _advance(self, done: Sequence[LogRecord]) -> dict[str, int]:
        advanced: dict[str, int] = {}
        for record in done:
            advanced[record.topic] = record.offset + 1
        self._positions.update(advanced)
        return advanced

    async def _redeliver_requested(self) -> bool:
        letters = await self._dead_letters.claim_retries(self._group_id)
        for letter in letters:
            if letter.id is None:
                continue
            outcome = await self._dispatcher.redeliver(letter)
            if outcome is None:
                await self._dead_letters.mark_resolved(letter.id)
                logger.info(
                    "dead_letter_resolved",
                    group_id=self._group_id,
                    letter_id=letter.id,
                    event_id=letter.event_id,
                )
            else:
                await self._dead_letters.mark_parked(
                    letter.id,
                    outcome.reason,
                    outcome.error_type,
                    outcome.attempts,
                    outcome.extra,
                )
        return bool(letters)

    async def _wait(self, seconds: float) -> None:
        appended = asyncio.ensure_future(self._database.wait_for_append(seconds))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({appended, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            appended.cancel()
            stopping.cancel()

    # Group membership and positions, run in the database thread ---------------------------------

    def _join(self, connection: sqlite3.Connection) -> None:
        row = connection.execute(
            "SELECT member_id, pid, hostname, heartbeat_at FROM consumer_members "
            "WHERE group_id = ?",
            (self._group_id,),
        ).fetchone()
        if (
            row is not None
            and row[0] != self._member_id
            and _member_is_alive(row, self._settings.consumer_session_timeout_seconds)
        ):
            raise ConsumerGroupError(
                f"Consumer group {self._group_id!r} already has an active member (pid {row[1]} "
                f"on {row[2]}) on {self._database.path}. The embedded event log allows one "
                "process per consumer group: stop that process, use another group id, or start "
                "a second server with `forge serve --no-workers` so that only one runs the "
                "workers. To share a group between processes, run on Kafka."
            )
        connection.execute(
            "INSERT INTO consumer_members (group_id, member_id, pid, hostname, heartbeat_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (group_id) DO UPDATE SET "
            "member_id = excluded.member_id, pid = excluded.pid, hostname = excluded.hostname, "
            "heartbeat_at = excluded.heartbeat_at",
            (self._group_id, self._member_id, os.getpid(), socket.gethostname(), time.time()),
        )

    def _heartbeat(self, connection: sqlite3.Connection) -> None:
        updated = connection.execute(
            "UPDATE consumer_members SET heartbeat_at = ? WHERE group_id = ? AND member_id = ?",
            (time.time(), self._group_id, self._member_id),
        ).rowcount
        if updated == 0:
            # Another process took the group over after this one was silent too long; two
            # members would handle the same events, so this one must stop.
            raise ConsumerGroupError(
                f"This process lost its membership of consumer group {self._group_id!r} after "
                "missing heartbeats; restart it once the other member has stopped."
            )

    def _leave(self, connection: sqlite3.Connection) -> None:
        connection.execute(
            "DELETE FROM consumer_members WHERE group_id = ? AND member_id = ?",
            (self._group_id, self._member_id),
        )

    def _load_positions(self, connection: sqlite3.Connection) -> tuple[dict[str, int], int]:
        rows = connection.execute(
            "SELECT topic, next_offset FROM consumer_positions WHERE group_id = ?",
            (self._group_id,),
        ).fetchall()
        committed = dict(rows)
        positions = {topic: committed.get(topic, 0) for topic in self._topics}

        # Start reading just before the oldest record not yet handled in any topic.
        pending_seqs = []
        for topic, offset in positions.items():
            found = connection.execute(
                "SELECT seq FROM event_log WHERE topic = ? AND log_offset >= ? "
                "ORDER BY log_offset LIMIT 1",
                (topic, offset),
            ).fetchone()
            if found is not None:
                pending_seqs.append(found[0])
        cursor = min(pending_seqs) - 1 if pending_seqs else max_seq(connection)
        return positions, cursor

    def _commit(self, connection: sqlite3.Connection, advanced: dict[str, int]) -> None:
        committed_at = datetime.now(UTC).isoformat()
        connection.executemany(
            "INSERT INTO consumer_positions (group_id, topic, next_offset, committed_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (group_id, topic) DO UPDATE SET "
            "next_offset = excluded.next_offset, committed_at = excluded.committed_at",
            [(self._group_id, topic, offset, committed_at) for topic, offset in advanced.items()],
        )


def _member_is_alive(row: tuple[Any, ...], session_timeout: float) -> bool:
    _, pid, hostname, heartbeat_at = row
    if time.time() - heartbeat_at > session_timeout:
        return False
    if hostname == socket.gethostname():
        # On this machine a dead process is known at once, without waiting for the timeout.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True
