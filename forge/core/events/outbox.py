"""The transactional outbox: events stored with their state change, published afterwards.

A service that writes state to a database also writes the events of that change, as outbox
rows, in the same transaction: both are stored or neither is. `OutboxRelay` then publishes the
rows in the order they were written and marks them published only after the publisher has
acknowledged them. A relay that dies at any point loses nothing: a row not marked published is
sent again, with the same event id. Delivery is therefore at least once, and handlers remove
duplicates by event id (see `forge.core.events.inbox`).

Several relays may run for the same outbox, for availability. Only the one holding the outbox's
leadership publishes; the others stand by and the first of them takes over when it goes away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

from forge.config import ForgeSettings
from forge.core.events.codec import decode_event
from forge.core.events.ports import EventPublisher
from forge.exceptions import BatchPublishError, EventValidationError, ForgeError, NotStartedError
from forge.logging import get_logger
from forge.models.events import Event

logger = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One outbox row: an encoded event waiting to be published."""

    id: int
    topic: str
    key: str | None
    value: bytes
    headers: Mapping[str, str]
    event_id: UUID
    created_at: datetime


@runtime_checkable
class OutboxSession(Protocol):
    """The leadership of an outbox, held by the active relay until `close()`."""

    @property
    def is_alive(self) -> bool:
        """False once the leadership is lost, for example because the connection broke."""

    async def fetch_pending(self, limit: int) -> list[OutboxRecord]:
        """Return up to `limit` rows neither published nor rejected, in write order."""

    async def mark_published(self, ids: Sequence[int]) -> None: ...

    async def reject(self, record_id: int, reason: str) -> None:
        """Park a row that can never be published. It stays in the table with the reason."""

    async def delete_published(self, before: datetime) -> int:
        """Delete rows published before `before`; return how many were deleted."""

    async def close(self) -> None:
        """Give up the leadership; idempotent."""


@runtime_checkable
class Outbox(Protocol):
    """Storage of outbox rows in one backend, and the election of the relay that publishes them."""

    async def acquire(self) -> OutboxSession:
        """Wait until the leadership is free, then take it.

        Raises:
            StorageUnavailableError: the database cannot be reached; retry later.
        """

    async def pending_count(self) -> int:
        """Return the number of rows neither published nor rejected."""

    async def rejected_count(self) -> int:
        """Return the number of rejected rows, which wait for `requeue_rejected`."""

    async def requeue_rejected(self, ids: Sequence[int] | None = None) -> int:
        """Make rejected rows (all of them when `ids` is None) pending again; return the count."""


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """Batch size, polling, backoff and cleanup settings of an `OutboxRelay`."""

    batch_size: int = 500
    poll_interval_seconds: float = 0.1
    initial_backoff_seconds: float = 0.2
    max_backoff_seconds: float = 10.0
    stop_timeout_seconds: float = 10.0
    max_event_bytes: int = 1024 * 1024
    retention_seconds: float | None = 7 * 24 * 3600.0
    """Published rows older than this are deleted; None keeps them forever."""
    purge_interval_seconds: float = 600.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        for name in (
            "poll_interval_seconds",
            "initial_backoff_seconds",
            "max_backoff_seconds",
            "stop_timeout_seconds",
            "purge_interval_seconds",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be above 0, got {getattr(self, name)}")
        if self.retention_seconds is not None and self.retention_seconds <= 0:
            raise ValueError(f"retention_seconds must be above 0, got {self.retention_seconds}")

    @classmethod
    def from_settings(cls, settings: ForgeSettings) -> RelaySettings:
        return cls(max_event_bytes=settings.max_event_bytes)


@dataclass(slots=True)
class _BatchOutcome:
    published: int = 0
    full: bool = False
    must_back_off: bool = False


class OutboxRelay:
    """Relay that publishes outbox rows through an `EventPublisher`, in order, at least once.

    Guarantees:
        - A row is marked published only after the publisher acknowledged its event. A relay
          stopped, cancelled or killed before that point sends it again, with the same event id.
        - Rows are sent in id order. Writers append one resource's rows in commit order, so
          each resource's events are published in order. When some events of a batch fail,
          the later events of the same resource are held back and the batch is retried with
          backoff from the first failure.
        - Only the relay holding the outbox's leadership publishes.

    A row whose value cannot be decoded, or whose event the publisher rejects for good (as
    invalid, or as a retry cannot help), is parked with the reason (see
    `Outbox.requeue_rejected`) instead of blocking the relay; the later events of its resource
    are published. Retriable
    errors of the database or the publisher are logged and retried with backoff. Any other
    error stops the relay; `stop()` raises it.

    The publisher must be started by the caller and stay started while the relay runs.
    """

    def __init__(
        self,
        outbox: Outbox,
        publisher: EventPublisher,
        settings: RelaySettings | None = None,
    ) -> None:
        self._outbox = outbox
        self._publisher = publisher
        self._settings = settings or RelaySettings()
        self._session: OutboxSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._failure: BaseException | None = None
        self._last_purge = 0.0
        self.published_count = 0
        self.rejected_count = 0

    async def __aenter__(self) -> OutboxRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def is_active(self) -> bool:
        """True while this relay has the leadership and may publish."""
        return self._session is not None and self._session.is_alive

    async def start(self) -> None:
        """Start the relay loop in the background; calling it while running does nothing.

        Raises:
            Exception: the error that stopped an earlier loop, if `stop()` has not raised it.
        """
        if self.is_running:
            return
        if self._task is not None:
            await self.stop()
        self._stopping.clear()
        self._failure = None
        self._task = asyncio.create_task(self._run(), name="forge-outbox-relay")
        logger.info("outbox_relay_started", batch_size=self._settings.batch_size)

    async def wait(self) -> None:
        """Wait until the loop ends, which it does only after `stop()` or on an error.

        For a supervisor that runs the relay like a consumer. An error is raised either here or
        by `stop()`, not by both.

        Raises:
            NotStartedError: the relay is not started.
            Exception: the error that stopped the loop.
        """
        task = self._task
        if task is None:
            raise NotStartedError("OutboxRelay is not started; call start() first.")
        await asyncio.wait({task})
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    async def stop(self) -> None:
        """Stop the loop and give up the leadership; calling it twice is fine.

        A batch being published may finish within `stop_timeout_seconds`. After that the loop
        is cancelled, and the next active relay sends the rows of that batch again.

        Raises:
            Exception: the error that stopped the loop earlier, if any.
        """
        task, self._task = self._task, None
        if task is not None:
            self._stopping.set()
            # The loop keeps its own errors in `_failure`, so waiting here raises nothing,
            # even when the task was cancelled from outside.
            done, _ = await asyncio.wait({task}, timeout=self._settings.stop_timeout_seconds)
            if not done:
                logger.warning(
                    "outbox_relay_stop_timed_out",
                    timeout_seconds=self._settings.stop_timeout_seconds,
                )
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            logger.info("outbox_relay_stopped", published=self.published_count)
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    # The loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._settings.initial_backoff_seconds
        try:
            while not self._stopping.is_set():
                try:
                    if self._session is None or not self._session.is_alive:
                        await self._release()
                        self._session = await self._acquire_unless_stopping()
                        if self._session is None:
                            break
                        logger.info("outbox_relay_active")
                    outcome = await self._relay_batch(self._session)
                except ForgeError as error:
                    if not error.retriable:
                        raise
                    # The database went away or failed: a new leadership is acquired once it
                    # is back, and another relay may have taken over meanwhile.
                    logger.warning(
                        "outbox_relay_storage_failed",
                        error=str(error),
                        retry_in_seconds=backoff,
                    )
                    await self._release()
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, self._settings.max_backoff_seconds)
                    continue

                if outcome.must_back_off:
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, self._settings.max_backoff_seconds)
                    continue
                backoff = self._settings.initial_backoff_seconds
                if not outcome.full:
                    await self._sleep(self._settings.poll_interval_seconds)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._failure = error
            logger.error(
                "outbox_relay_failed",
                error=repr(error),
                next_step="the relay stopped; fix the cause and start it again",
            )
        finally:
            await self._release()

    async def _relay_batch(self, session: OutboxSession) -> _BatchOutcome:
        await self._purge_if_due(session)
        records = await session.fetch_pending(self._settings.batch_size)
        if not records:
            return _BatchOutcome()
        full = len(records) == self._settings.batch_size

        batch: list[tuple[OutboxRecord, Event[Any]]] = []
        for record in records:
            event = await self._decode(session, record)
            if event is not None:
                batch.append((record, event))
        if not batch:
            return _BatchOutcome(full=full)

        try:
            await self._publisher.publish_batch([event for _, event in batch])
        except BatchPublishError as error:
            return await self._handle_partial_failure(session, batch, error, full)
        except ForgeError as error:
            if not error.retriable:
                raise
            logger.warning(
                "outbox_publish_failed",
                events=len(batch),
                first_id=batch[0][0].id,
                error=str(error),
            )
            return _BatchOutcome(must_back_off=True)

        # Marking comes only after the acknowledgement: a crash in between sends the batch
        # again, which consumers absorb by event id, instead of losing it.
        await session.mark_published([record.id for record, _ in batch])
        self.published_count += len(batch)
        logger.debug(
            "outbox_published",
            events=len(batch),
            first_id=batch[0][0].id,
            last_id=batch[-1][0].id,
        )
        return _BatchOutcome(published=len(batch), full=full)

    async def _decode(self, session: OutboxSession, record: OutboxRecord) -> Event[Any] | None:
        try:
            event = decode_event(record.value, self._settings.max_event_bytes, record.headers)
        except EventValidationError as error:
            await self._reject(session, record, str(error))
            return None
        mismatch = [
            f"{name} {row_value!r} of the row differs from the event's {event_value!r}"
            for name, row_value, event_value in (
                ("event_id", str(record.event_id), str(event.id)),
                ("topic", record.topic, event.topic),
                ("key", record.key, event.key),
            )
            if row_value != event_value
        ]
        if mismatch:
            # The publisher routes by the event, so a row that disagrees with its own value was
            # not written by `encode_event`, and consumers would get it in another topic or key.
            await self._reject(
                session, record, f"The {', '.join(mismatch)}; rewrite the row with encode_event."
            )
            return None
        if event.to_json() != record.value:
            # The publisher re-encodes the event. The id and the content are the same, but the
            # bytes differ, for example because an upcaster changed an older schema version.
            logger.warning("outbox_event_reencoded", outbox_id=record.id, event_id=str(event.id))
        return event

    async def _handle_partial_failure(
        self,
        session: OutboxSession,
        batch: Sequence[tuple[OutboxRecord, Event[Any]]],
        error: BatchPublishError,
        full: bool,
    ) -> _BatchOutcome:
        failed = {str(event_id): reason for event_id, reason in error.failed.items()}
        if not failed:
            # The publisher named no event, so none of them can be trusted as acknowledged.
            failed = {str(event.id): error for _, event in batch}

        # Per resource, only the events before its first failure count as published. A later
        # event of that resource is sent again after the failed one, so that the last copy a
        # consumer receives of each event keeps the resource's order.
        held_keys: set[str | None] = set()
        acknowledged: list[int] = []
        retry = 0
        for record, event in batch:
            reason = failed.get(str(event.id))
            if isinstance(reason, EventValidationError) or (
                isinstance(reason, ForgeError) and not reason.retriable
            ):
                # Retrying cannot help, for example when the broker rejects the event as too
                # large for the topic, and the later events of its resource would be sent
                # again at every retry.
                await self._reject(session, record, f"The publisher rejected the event: {reason}")
            elif reason is not None:
                held_keys.add(record.key)
                retry += 1
            elif record.key in held_keys:
                retry += 1
            else:
                acknowledged.append(record.id)

        if acknowledged:
            await session.mark_published(acknowledged)
            self.published_count += len(acknowledged)
        first_reason = next(iter(failed.values()))
        logger.warning(
            "outbox_publish_failed",
            events=len(batch),
            acknowledged=len(acknowledged),
            held_back=retry,
            first_id=batch[0][0].id,
            error=str(first_reason) or repr(first_reason),
        )
        return _BatchOutcome(published=len(acknowledged), full=full, must_back_off=retry > 0)

    async def _reject(self, session: OutboxSession, record: OutboxRecord, reason: str) -> None:
        await session.reject(record.id, reason)
        self.rejected_count += 1
        logger.error(
            "outbox_row_rejected",
            outbox_id=record.id,
            event_id=str(record.event_id),
            topic=record.topic,
            reason=reason[:500],
            next_step="the row is parked in the outbox; fix the cause and requeue it",
        )

    async def _purge_if_due(self, session: OutboxSession) -> None:
        retention = self._settings.retention_seconds
        now = time.monotonic()
        if retention is None or now - self._last_purge < self._settings.purge_interval_seconds:
            return
        self._last_purge = now
        deleted = await session.delete_published(datetime.now(UTC) - timedelta(seconds=retention))
        if deleted:
            logger.info("outbox_purged", deleted=deleted, retention_seconds=retention)

    # Helpers -------------------------------------------------------------------------------

    async def _release(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        try:
            await session.close()
        except ForgeError as error:
            # The leadership ends with the connection, so a failed close leaves nothing held.
            logger.warning("outbox_relay_release_failed", error=str(error))
        logger.info("outbox_relay_released")

    async def _acquire_unless_stopping(self) -> OutboxSession | None:
        """Wait for the leadership, or return None as soon as stop is requested."""
        acquiring = asyncio.ensure_future(self._outbox.acquire())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not acquiring.done():
                # Waiting lets the cancelled acquire close its connection before going on.
                acquiring.cancel()
                await asyncio.gather(acquiring, return_exceptions=True)
        if acquiring.cancelled():
            return None
        session = acquiring.result()
        if self._stopping.is_set():
            await session.close()
            return None
        return session

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass
