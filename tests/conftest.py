"""Fixtures shared by every suite.

`backend` gives the contract tests one object per event backend, so that a Kafka or PostgreSQL
backend runs the same tests by adding a class here and a name to `BACKENDS`. A backend class
offers what `SqliteBackend` offers:

- `settings`; `publisher` (started), `events`, `dead_letters`, `audit_store`, `capsule_store`,
  `capsules` and `replayer`;
- `make_consumer(group_id, **settings_overrides)`: a consumer, not started, with `drain()`;
- `make_audit_consumer()`: the audit recorder's consumer and the recorder;
- `append_raw(topic, value, key=None, headers=None)`: write a record with no validation;
- `open()`, `close()` and `restart()`: the last one as a process restart on the same data.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from forge.config import ForgeSettings, get_settings
from forge.core.audit.recorder import AuditRecorder
from forge.core.audit.store import AuditStore
from forge.core.capsules.service import CapsuleService
from forge.core.capsules.store import CapsuleStore
from forge.core.events.dead_letters import DeadLetterStore
from forge.core.events.ports import EventConsumer, EventPublisher
from forge.core.events.service import EventService, set_event_service
from forge.core.replay.capsules import CapsuleReplayer
from forge.infrastructure.sqlite.consumer import SqliteEventConsumer
from forge.infrastructure.sqlite.database import SqliteDatabase
from forge.infrastructure.sqlite.event_log import SqliteEventLog
from forge.runtime import Runtime
from tests.helpers import make_settings


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep FORGE_* variables of the shell and the process-wide event service out of tests."""
    for name in list(os.environ):
        if name.startswith("FORGE_"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
    set_event_service(None)


class SqliteBackend:
    """The embedded backend: event log and stores in one SQLite file, built by `Runtime`.

    Consumers with setting overrides use a second connection to the same file, as a second
    process would.
    """

    name = "sqlite"

    def __init__(self, settings: ForgeSettings) -> None:
        self.settings = settings
        self._runtime: Runtime | None = None
        self._database: SqliteDatabase | None = None
        self._consumers: list[EventConsumer] = []

    async def open(self) -> None:
        self._runtime = Runtime(self.settings)
        await self._runtime.start()
        self._database = SqliteDatabase(
            self.settings.sqlite_path,
            synchronous=self.settings.sqlite_synchronous,
            busy_timeout_seconds=self.settings.sqlite_busy_timeout_seconds,
        )
        await self._database.open()

    async def close(self) -> None:
        """Stop every consumer made here, then the runtime, as a clean process exit does."""
        for consumer in self._consumers:
            await consumer.stop()
        self._consumers.clear()
        if self._runtime is not None:
            await self._runtime.stop()
        if self._database is not None:
            await self._database.close()

    async def restart(self) -> None:
        """Close everything and open the same data folder again, as a restarted process."""
        await self.close()
        await self.open()

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None, "backend is not open"
        return self._runtime

    @property
    def publisher(self) -> EventPublisher:
        return self.runtime.publisher

    @property
    def events(self) -> EventService:
        return self.runtime.events

    @property
    def dead_letters(self) -> DeadLetterStore:
        return self.runtime.dead_letters

    @property
    def audit_store(self) -> AuditStore:
        return self.runtime.audit_store

    @property
    def capsule_store(self) -> CapsuleStore:
        return self.runtime.capsule_store

    @property
    def capsules(self) -> CapsuleService:
        return self.runtime.capsules

    @property
    def replayer(self) -> CapsuleReplayer:
        return self.runtime.replayer

    def make_consumer(self, group_id: str, **settings_overrides: Any) -> EventConsumer:
        """Return a consumer of `group_id`, not yet started, which is stopped when the test ends."""
        consumer: EventConsumer
        if settings_overrides:
            assert self._database is not None, "backend is not open"
            settings = ForgeSettings(**{**self.settings.model_dump(), **settings_overrides})
            consumer = SqliteEventConsumer(
                self._database, group_id, settings=settings, dead_letters=self.dead_letters
            )
        else:
            consumer = self.runtime.consumer(group_id)
        self._consumers.append(consumer)
        return consumer

    def make_audit_consumer(self) -> tuple[EventConsumer, AuditRecorder]:
        """Return the audit recorder's consumer, not started, and the recorder."""
        consumer, recorder = self.runtime.audit_consumer()
        self._consumers.append(consumer)
        return consumer, recorder

    async def append_raw(
        self,
        topic: str,
        value: bytes,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> int:
        """Append a record without validation, as a faulty producer would, and return its offset."""
        event_log = self.runtime.publisher
        assert isinstance(event_log, SqliteEventLog)
        return await event_log.append_raw(topic, value, key=key, headers=headers)


BACKENDS = {"sqlite": SqliteBackend}


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """An open backend on a fresh data folder, closed when the test ends."""
    opened = BACKENDS[request.param](make_settings(tmp_path / "data"))
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()
