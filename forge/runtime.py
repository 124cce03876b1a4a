"""Wiring: build every component of a Forge process from its settings.

The embedded backend (the default) puts the event log and every store in one SQLite file. The
command line, the HTTP API and the tests all build their components here, so they cannot drift
apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from forge.config import EventBackend, ForgeSettings, StoreBackend, get_settings
from forge.core.audit.recorder import AUDIT_GROUP_ID, AuditRecorder
from forge.core.audit.store import AuditStore
from forge.core.capsules.service import CapsuleService
from forge.core.capsules.store import CapsuleStore
from forge.core.events.dead_letters import DeadLetterStore
from forge.core.events.ports import EventConsumer, EventLogReader, EventPublisher
from forge.core.events.service import EventService
from forge.core.privacy import PersonalDataProtector
from forge.core.replay.capsules import CapsuleReplayer, ResourceEventSource
from forge.exceptions import (
    BrokerUnavailableError,
    ConfigurationError,
    ForgeError,
    NotStartedError,
    PublishError,
)
from forge.infrastructure.sqlite.audit_store import SqliteAuditStore
from forge.infrastructure.sqlite.capsule_store import SqliteCapsuleStore
from forge.infrastructure.sqlite.consumer import SqliteEventConsumer
from forge.infrastructure.sqlite.database import SqliteDatabase
from forge.infrastructure.sqlite.dead_letters import SqliteDeadLetterStore
from forge.infrastructure.sqlite.event_log import SqliteEventLog
from forge.infrastructure.sqlite.subject_keys import SqliteSubjectKeyStore
from forge.logging import get_logger
from forge.models.events import Event

logger = get_logger(__name__)


class Runtime:
    """The components of one process: publisher, stores, services and consumer factory.

    Use it as an async context manager; `stop()` twice is fine.
    """

    def __init__(self, settings: ForgeSettings | None = None) -> None:
        self.settings = settings or get_settings()
        self._started = False
        self._database: SqliteDatabase | None = None
        self._publisher: EventPublisher | None = None
        self._dead_letters: DeadLetterStore | None = None
        self._audit_store: AuditStore | None = None
        self._capsule_store: CapsuleStore | None = None
        self._reader: EventLogReader | None = None
        self._events: EventService | None = None
        self._capsules: CapsuleService | None = None
        self._replayer: CapsuleReplayer | None = None
        self._protector: PersonalDataProtector | None = None
        self._extra_workers: dict[str, Callable[[], EventConsumer]] = {}
        self._consumer_factory: Callable[[str], EventConsumer] | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._broker: BrokerConnection | None = None
        self._outbox: Any = None

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the stores and the publisher named by the settings.

        Raises:
            ConfigurationError: the backend combination is not supported, or a Kafka topic is
                missing while the broker does not create topics.
            BrokerUnavailableError, StorageUnavailableError: a server cannot be reached.
        """
        if self._started:
            return
        settings = self.settings
        backend = (settings.event_backend, settings.effective_store_backend)
        if backend == (EventBackend.SQLITE, StoreBackend.SQLITE):
            await self._start_embedded()
        elif backend == (EventBackend.KAFKA, StoreBackend.POSTGRES):
            await self._start_distributed()
        else:
            raise ConfigurationError(
                f"FORGE_EVENT_BACKEND={settings.event_backend.value} with "
                f"FORGE_STORE_BACKEND={settings.effective_store_backend.value} is not supported: "
                "a state change and its event must share one database. Use sqlite with sqlite "
                "(the embedded default) or kafka with postgres."
            )
        self._started = True
        logger.info(
            "runtime_started",
            event_backend=settings.event_backend.value,
            store_backend=settings.effective_store_backend.value,
        )

    async def _start_embedded(self) -> None:
        settings = self.settings
        database = SqliteDatabase(
            settings.sqlite_path,
            synchronous=settings.sqlite_synchronous,
            busy_timeout_seconds=settings.sqlite_busy_timeout_seconds,
        )
        await database.open()
        event_log = SqliteEventLog(database, max_event_bytes=settings.max_event_bytes)
        await event_log.start()

        self._database = database
        self._publisher = event_log
        self._reader = event_log
        self._dead_letters = SqliteDeadLetterStore(database)
        self._audit_store = SqliteAuditStore(database)
        self._capsule_store = SqliteCapsuleStore(database)
        self._protector = PersonalDataProtector(SqliteSubjectKeyStore(database))
        # The embedded log is written in the same transaction as the state, so replay reads
        # it directly: it is complete even before the audit recorder has caught up.
        self._wire_services(event_log, replay_source=event_log)
        self._consumer_factory = lambda group_id: SqliteEventConsumer(
            database, group_id, settings=settings, dead_letters=self.dead_letters
        )

    async def _start_distributed(self) -> None:
        # Imported here so that the embedded default needs neither aiokafka nor asyncpg.
        from forge.core.events.outbox import OutboxRelay, RelaySettings
        from forge.infrastructure.kafka.admin import check_topics
        from forge.infrastructure.kafka.consumer import KafkaEventConsumer
        from forge.infrastructure.kafka.producer import KafkaEventProducer
        from forge.infrastructure.kafka.reader import KafkaEventLogReader
        from forge.infrastructure.postgres.audit_store import PostgresAuditStore
        from forge.infrastructure.postgres.capsule_store import PostgresCapsuleStore
        from forge.infrastructure.postgres.database import PostgresDatabase
        from forge.infrastructure.postgres.dead_letters import PostgresDeadLetterStore
        from forge.infrastructure.postgres.outbox import PostgresOutbox
        from forge.infrastructure.postgres.subject_keys import PostgresSubjectKeyStore

        settings = self.settings
        database = PostgresDatabase.from_settings(settings)
        await _retry_while_unavailable(database.open, settings.postgres_startup_timeout_seconds)
        producer = KafkaEventProducer(settings=settings)
        # Capsule writes, queries and dead-letter commands need only PostgreSQL, so a broker
        # that is down does not hold the process up: the producer connects in the background.
        connection = BrokerConnection(
            producer,
            lambda: _start_producer(producer, settings, check_topics),
            settings.kafka_startup_timeout_seconds,
            probe=producer.probe,
        )
        await connection.start()
        outbox = PostgresOutbox(database)

        self._broker = connection
        self._outbox = outbox
        self._closers.extend([connection.stop, database.close])
        self._publisher = connection
        self._reader = KafkaEventLogReader(settings=settings)
        self._dead_letters = PostgresDeadLetterStore(database)
        self._audit_store = PostgresAuditStore(database)
        self._capsule_store = PostgresCapsuleStore(database, outbox)
        self._protector = PersonalDataProtector(PostgresSubjectKeyStore(database))
        # Kafka topics cannot be read by key, so replay reads a resource's events from the
        # audit trail. Events the recorder has not reached yet are not in the rebuild.
        self._wire_services(connection, replay_source=self._audit_store)
        self._consumer_factory = lambda group_id: KafkaEventConsumer(
            group_id, settings=settings, dead_letters=self.dead_letters
        )
        self._extra_workers["outbox-relay"] = lambda: _RelayWorker(
            OutboxRelay(outbox, connection, RelaySettings.from_settings(settings)), connection
        )

    def _wire_services(self, publisher: EventPublisher, replay_source: ResourceEventSource) -> None:
        if self._capsule_store is None:
            raise NotStartedError("the capsule store must be built before the services")
        settings = self.settings
        self._events = EventService(publisher, protector=self._protector)
        self._capsules = CapsuleService(
            self._capsule_store, max_event_bytes=settings.max_event_bytes
        )
        self._replayer = CapsuleReplayer(replay_source, self._capsule_store)

    async def stop(self) -> None:
        """Stop the publisher and close the stores; calling it twice is fine."""
        if not self._started:
            return
        self._started = False
        if self._publisher is not None and self._database is not None:
            await self._publisher.stop()
        if self._database is not None:
            await self._database.close()
        for close in reversed(self._closers):
            await close()
        self._closers.clear()
        logger.info("runtime_stopped")

    def _require(self, component: Any, name: str) -> Any:
        if not self._started or component is None:
            raise NotStartedError(f"Runtime is not started; call start() before using {name}")
        return component

    @property
    def publisher(self) -> EventPublisher:
        publisher: EventPublisher = self._require(self._publisher, "publisher")
        return publisher

    @property
    def protector(self) -> PersonalDataProtector:
        protector: PersonalDataProtector = self._require(self._protector, "protector")
        return protector

    @property
    def events(self) -> EventService:
        service: EventService = self._require(self._events, "events")
        return service

    @property
    def capsules(self) -> CapsuleService:
        service: CapsuleService = self._require(self._capsules, "capsules")
        return service

    @property
    def capsule_store(self) -> CapsuleStore:
        store: CapsuleStore = self._require(self._capsule_store, "capsule_store")
        return store

    @property
    def audit_store(self) -> AuditStore:
        store: AuditStore = self._require(self._audit_store, "audit_store")
        return store

    @property
    def dead_letters(self) -> DeadLetterStore:
        store: DeadLetterStore = self._require(self._dead_letters, "dead_letters")
        return store

    @property
    def outbox(self) -> Any:
        """The PostgreSQL outbox of the Kafka backend (a `PostgresOutbox`).

        Raises:
            ConfigurationError: the embedded backend runs, which writes events directly to its
                log and has no outbox.
        """
        self._require(self._audit_store, "outbox")
        if self._outbox is None:
            raise ConfigurationError(
                "The outbox exists only with Kafka and PostgreSQL (FORGE_EVENT_BACKEND=kafka); "
                "the embedded backend writes events directly to its log."
            )
        return self._outbox

    @property
    def reader(self) -> EventLogReader:
        reader: EventLogReader = self._require(self._reader, "reader")
        return reader

    @property
    def replayer(self) -> CapsuleReplayer:
        replayer: CapsuleReplayer = self._require(self._replayer, "replayer")
        return replayer

    def consumer(self, group_id: str) -> EventConsumer:
        """Return a new, not yet started consumer in `group_id`."""
        factory: Callable[[str], EventConsumer] = self._require(self._consumer_factory, "consumer")
        return factory(group_id)

    async def health(self) -> dict[str, Any]:
        """Return what a health check reports beyond the workers: broker and outbox state."""
        details: dict[str, Any] = {}
        if self._broker is not None:
            details["broker_connected"] = self._broker.connected
            details["broker_error"] = self._broker.last_error
        if self._outbox is not None:
            details["outbox_pending"] = await self._outbox.pending_count()
            details["outbox_rejected"] = await self._outbox.rejected_count()
        return details

    def worker_factories(self) -> dict[str, Callable[[], EventConsumer]]:
        """Return the consumers a server runs beside the API, by worker name."""
        workers: dict[str, Callable[[], EventConsumer]] = {
            "audit-recorder": lambda: self.audit_consumer()[0]
        }
        workers.update(self._extra_workers)
        return workers

    def audit_consumer(self) -> tuple[EventConsumer, AuditRecorder]:
        """Return the audit recorder's consumer (group `forge-audit`), not yet started."""
        consumer = self.consumer(AUDIT_GROUP_ID)
        recorder = AuditRecorder(self.audit_store, self.protector)
        recorder.attach(consumer)
        return consumer, recorder


async def _start_producer(producer: Any, settings: ForgeSettings, check_topics: Any) -> None:
    await check_topics(settings)
    await producer.start()


async def _retry_while_unavailable(
    action: Callable[[], Awaitable[None]], timeout_seconds: float
) -> None:
    """Run `action` until it succeeds, retrying retriable Forge errors for `timeout_seconds`.

    A process started while the broker or database is down then waits for it, logging each
    attempt, instead of exiting at once.
    """
    deadline = time.monotonic() + timeout_seconds
    delay = 0.5
    while True:
        try:
            await action()
            return
        except ForgeError as error:
            if not error.retriable or time.monotonic() + delay > deadline:
                raise
            logger.warning("startup_waiting", error=str(error), retry_in_seconds=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


PROBE_INTERVAL_SECONDS = 10.0
"""Seconds between the metadata requests a broker connection sends for the health check."""


class BrokerConnection:
    """An `EventPublisher` whose Kafka producer connects in the background until it succeeds.

    `start()` tries once; if the broker cannot be reached it keeps trying, with backoff and a
    log line each time, without holding the caller up. Publishing waits for the connection at
    most `publish_wait_seconds`, then raises `BrokerUnavailableError`.
    """

    def __init__(
        self,
        producer: Any,
        connect: Callable[[], Awaitable[None]],
        publish_wait_seconds: float = 10.0,
        probe: Callable[[], Awaitable[None]] | None = None,
        probe_interval_seconds: float = PROBE_INTERVAL_SECONDS,
    ) -> None:
        self._producer = producer
        self._connect = connect
        self._publish_wait_seconds = publish_wait_seconds
        self._probe = probe
        self._probe_interval_seconds = probe_interval_seconds
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._broker_failing = False
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        """Whether the producer is started, and neither its last publish nor the last probe
        failed for the broker."""
        return self._ready.is_set() and not self._broker_failing

    @property
    def producer(self) -> Any:
        """The wrapped `KafkaEventProducer`, for raw writes once connected."""
        return self._producer

    async def start(self) -> None:
        try:
            await self._connect()
        except ForgeError as error:
            if not error.retriable:
                raise
            self.last_error = str(error)
            logger.warning("kafka_unavailable_at_start", error=str(error))
            self._task = asyncio.create_task(self._reconnect(), name="forge-kafka-connect")
            return
        self._ready.set()
        self._start_probing()

    async def _reconnect(self) -> None:
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            try:
                await self._connect()
            except ForgeError as error:
                self.last_error = str(error)
                delay = min(delay * 2, 10.0)
                logger.warning("kafka_connect_retry", error=str(error), retry_in_seconds=delay)
                continue
            self.last_error = None
            self._ready.set()
            self._start_probing()
            logger.info("kafka_connected")
            return

    def _start_probing(self) -> None:
        if self._probe is not None and self._probe_task is None:
            self._probe_task = asyncio.create_task(self._probing(), name="forge-kafka-probe")

    async def _probing(self) -> None:
        """Request the broker's metadata now and then, so that the health check notices an
        outage while nothing is published."""
        assert self._probe is not None
        while True:
            await asyncio.sleep(self._probe_interval_seconds)
            try:
                await self._probe()
            except ForgeError as error:
                self._broker_failed(error)
                continue
            self._broker_responded()

    async def wait_connected(self, stopping: asyncio.Event | None = None) -> bool:
        """Wait until connected, or until `stopping` is set; return whether connected."""
        if self._ready.is_set():
            return True
        waiters = {asyncio.ensure_future(self._ready.wait())}
        if stopping is not None:
            waiters.add(asyncio.ensure_future(stopping.wait()))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return self._ready.is_set()

    async def _require(self) -> None:
        if self._ready.is_set():
            return
        try:
            await asyncio.wait_for(self._ready.wait(), self._publish_wait_seconds)
        except TimeoutError:
            raise BrokerUnavailableError(
                f"Not connected to the Kafka broker ({self.last_error}). Nothing was published; "
                "retry once the broker is up."
            ) from None

    async def publish(self, event: Event[Any]) -> None:
        await self._require()
        await self._tracking(self._producer.publish(event))

    async def publish_batch(self, events: Sequence[Event[Any]]) -> None:
        await self._require()
        await self._tracking(self._producer.publish_batch(events))

    async def _tracking(self, publishing: Awaitable[None]) -> None:
        """Await a publish, and keep `connected` and `last_error` in step with its outcome."""
        try:
            await publishing
        except PublishError as error:
            if error.retriable:
                # The broker failed, not the events: the health check reports it.
                self._broker_failed(error)
            raise
        self._broker_responded()

    def _broker_failed(self, error: ForgeError) -> None:
        if not self._broker_failing:
            logger.warning("kafka_broker_failing", error=str(error))
        self._broker_failing = True
        self.last_error = str(error)

    def _broker_responded(self) -> None:
        if self._broker_failing:
            self._broker_failing = False
            self.last_error = None
            logger.info("kafka_broker_responding_again")

    async def stop(self) -> None:
        for task in (self._task, self._probe_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._probe_task = None
        await self._producer.stop()


class _RelayWorker:
    """Lets the server supervise an `OutboxRelay` like a consumer: start, run, stop."""

    def __init__(self, relay: Any, connection: BrokerConnection) -> None:
        self._relay = relay
        self._connection = connection
        self._stopping = asyncio.Event()

    def register_handler(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("the outbox relay has no handlers")

    def register_batch_handler(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("the outbox relay has no handlers")

    async def start(self, event_types: Sequence[Any] | None = None) -> None:
        # While the broker is down, capsule writes keep adding rows to the outbox, and the
        # relay publishes them once it has started.
        if not await self._connection.wait_connected(self._stopping):
            return
        await self._relay.start()

    async def run(self) -> None:
        if not self._connection.connected:
            await self._stopping.wait()
            return
        # Raises the error that stopped the relay, so that the supervisor logs and restarts it.
        await self._relay.wait()

    async def drain(self, timeout: float = 30.0) -> int:
        raise NotImplementedError("the outbox relay runs until stopped; it cannot drain")

    async def stop(self) -> None:
        self._stopping.set()
        if self._relay.is_running:
            await self._relay.stop()
