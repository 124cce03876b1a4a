"""Wiring: build every component of a Forge process from its settings.

The embedded backend (the default) puts the event log and every store in one SQLite file. The
command line, the HTTP API and the tests all build their components here, so they cannot drift
apart.
"""

from __future__ import annotations

from collections.abc import Callable
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
from forge.exceptions import ConfigurationError, NotStartedError
from forge.infrastructure.sqlite.audit_store import SqliteAuditStore
from forge.infrastructure.sqlite.capsule_store import SqliteCapsuleStore
from forge.infrastructure.sqlite.consumer import SqliteEventConsumer
from forge.infrastructure.sqlite.database import SqliteDatabase
from forge.infrastructure.sqlite.dead_letters import SqliteDeadLetterStore
from forge.infrastructure.sqlite.event_log import SqliteEventLog
from forge.infrastructure.sqlite.subject_keys import SqliteSubjectKeyStore
from forge.logging import get_logger

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
        self._event_source: ResourceEventSource | None = None
        self._reader: EventLogReader | None = None
        self._events: EventService | None = None
        self._capsules: CapsuleService | None = None
        self._replayer: CapsuleReplayer | None = None
        self._protector: PersonalDataProtector | None = None
        self._extra_workers: dict[str, Callable[[], EventConsumer]] = {}

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._started:
            return
        settings = self.settings
        backend = (settings.event_backend, settings.effective_store_backend)
        if backend != (EventBackend.SQLITE, StoreBackend.SQLITE):
            raise ConfigurationError(
                f"FORGE_EVENT_BACKEND={settings.event_backend.value} with "
                f"FORGE_STORE_BACKEND={settings.effective_store_backend.value} is not available "
                "in this version; use the embedded default (sqlite with sqlite)."
            )
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
        self._event_source = event_log
        self._dead_letters = SqliteDeadLetterStore(database)
        self._audit_store = SqliteAuditStore(database)
        self._capsule_store = SqliteCapsuleStore(database)
        self._protector = PersonalDataProtector(SqliteSubjectKeyStore(database))
        self._events = EventService(event_log, protector=self._protector)
        self._capsules = CapsuleService(
            self._capsule_store, max_event_bytes=settings.max_event_bytes
        )
        self._replayer = CapsuleReplayer(event_log, self._capsule_store)
        self._started = True
        logger.info(
            "runtime_started",
            event_backend=settings.event_backend.value,
            store_backend=settings.effective_store_backend.value,
            path=str(settings.sqlite_path),
        )

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._publisher is not None:
            await self._publisher.stop()
        if self._database is not None:
            await self._database.close()
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
    def reader(self) -> EventLogReader:
        reader: EventLogReader = self._require(self._reader, "reader")
        return reader

    @property
    def replayer(self) -> CapsuleReplayer:
        replayer: CapsuleReplayer = self._require(self._replayer, "replayer")
        return replayer

    def consumer(self, group_id: str) -> EventConsumer:
        """Return a new, not yet started consumer in `group_id`."""
        database: SqliteDatabase = self._require(self._database, "consumer")
        return SqliteEventConsumer(
            database, group_id, settings=self.settings, dead_letters=self.dead_letters
        )

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


async def start_publisher_from_settings() -> EventPublisher:
    """Build and start the publisher named by `FORGE_*` settings (for `get_event_service`)."""
    settings = get_settings()
    if settings.event_backend is not EventBackend.SQLITE:
        raise ConfigurationError(
            f"FORGE_EVENT_BACKEND={settings.event_backend.value} is not available in this "
            "version; use sqlite."
        )
    database = SqliteDatabase(
        settings.sqlite_path,
        synchronous=settings.sqlite_synchronous,
        busy_timeout_seconds=settings.sqlite_busy_timeout_seconds,
    )
    event_log = SqliteEventLog(database, max_event_bytes=settings.max_event_bytes)
    await event_log.start()
    return event_log
