"""Fixtures shared by every suite.

`backend` gives the contract tests one object per event backend: "sqlite", the embedded
default, and "kafka", Kafka with PostgreSQL stores. Another backend runs the same tests by
adding a class here and a name to `BACKENDS`. A backend class offers what `SqliteBackend` offers:

- `name`, `settings`; `publisher` (started), `events`, `dead_letters`, `audit_store`,
  `capsule_store`, `capsules` and `replayer`;
- `make_consumer(group_id, **settings_overrides)`: a consumer, not started, with `drain()`;
- `make_audit_consumer()`: the audit recorder's consumer and the recorder;
- `append_raw(topic, value, key=None, headers=None)`: write a record with no validation;
- `open()`, `close()` and `restart()`: the last one as a process restart on the same data;
  `discard()` removes the data after the last `close()`.

The kafka tests carry the `kafka` and `postgres` marks. They use the servers named by
FORGE_KAFKA_BOOTSTRAP_SERVERS and FORGE_POSTGRES_DSN when pytest starts, and fail, never skip,
when those do not respond. `KNOWN_BACKEND_BUGS` lists contract tests that a backend fails today.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from forge.config import EventBackend, ForgeSettings, StoreBackend, get_settings
from forge.core.audit.recorder import AUDIT_GROUP_ID, AuditRecorder
from forge.core.audit.store import AuditStore
from forge.core.capsules.service import CapsuleService
from forge.core.capsules.store import CapsuleStore
from forge.core.events.dead_letters import DeadLetter, DeadLetterStatus, DeadLetterStore
from forge.core.events.ports import EventConsumer, EventPublisher
from forge.core.events.service import EventService, set_event_service
from forge.core.replay.capsules import CapsuleReplayer, ReplayResult
from forge.exceptions import ForgeError
from forge.infrastructure.kafka import consumer as kafka_consumer_module
from forge.infrastructure.kafka.admin import ensure_topics, partition_counts
from forge.infrastructure.kafka.common import event_topics
from forge.infrastructure.kafka.consumer import KafkaEventConsumer
from forge.infrastructure.kafka.producer import KafkaEventProducer
from forge.infrastructure.postgres.database import PostgresDatabase, redact_dsn
from forge.infrastructure.postgres.outbox import PostgresOutbox
from forge.infrastructure.sqlite.consumer import SqliteEventConsumer
from forge.infrastructure.sqlite.database import SqliteDatabase
from forge.infrastructure.sqlite.event_log import SqliteEventLog
from forge.models.events import EventType
from forge.runtime import BrokerConnection, Runtime
from tests.helpers import WAIT_TIMEOUT_SECONDS, make_settings

# Read at import, before `_isolated_environment` removes FORGE_* variables for each test.
KAFKA_BOOTSTRAP_SERVERS = os.environ.get("FORGE_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
POSTGRES_DSN = os.environ.get("FORGE_POSTGRES_DSN", "postgresql://forge@127.0.0.1:54329/forge")
SERVER_WAIT_SECONDS = 10.0
"""How long the kafka backend waits for a server that does not respond."""
KAFKA_FETCH_TIMEOUT_MS = 100
"""Maximum wait of one poll of the kafka backend's consumers (`FETCH_TIMEOUT_MS` is 500)."""


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


class _RuntimeBackend:
    """Components every backend takes from its `Runtime`; subclasses override what differs."""

    _runtime: Runtime | None

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
    def audit_store(self) -> AuditStore:
        return self.runtime.audit_store

    @property
    def capsule_store(self) -> CapsuleStore:
        return self.runtime.capsule_store

    @property
    def capsules(self) -> CapsuleService:
        return self.runtime.capsules

    @property
    def dead_letters(self) -> DeadLetterStore:
        return self.runtime.dead_letters

    @property
    def replayer(self) -> CapsuleReplayer:
        return self.runtime.replayer


class SqliteBackend(_RuntimeBackend):
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

    async def discard(self) -> None:
        """Remove nothing: pytest removes the data folder after the test."""

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


class KafkaBackend(_RuntimeBackend):
    """The distributed backend: Kafka for events, PostgreSQL for the stores, built by `Runtime`.

    It is what `forge serve` runs with FORGE_EVENT_BACKEND=kafka, on the servers named by
    FORGE_KAFKA_BOOTSTRAP_SERVERS and FORGE_POSTGRES_DSN. The topics are shared with every other
    test and run, so each test gets:

    - its own PostgreSQL schema (FORGE_POSTGRES_SCHEMA), dropped by `discard()`.
    - its own consumer groups: a test's group `search` is the Kafka group `<prefix>search`, with
      a prefix unique to the backend. `dead_letters` takes and shows the test's group names,
      while consumers write to the runtime's store under the Kafka group ids.
    - group offsets that start at the end of the topics as they were when the backend was first
      opened. They are committed before the group's first member starts, so records written
      before the test never reach it.

    NOTE: records that another process writes to the shared topics after the backend opened do
    reach the test's groups, so test runs in parallel on one broker can break exact counts.

    While the backend is open an outbox relay publishes the capsule events written to the
    PostgreSQL outbox, as `forge serve` does. Capsule events reach Kafka after their
    transaction, so the `drain()` of consumers made here first waits until the outbox has no
    pending row: it then handles the events of every change made before the call, as on the
    embedded backend.

    Replay on Kafka reads the audit trail, which the audit recorder fills in the background
    (README, "At scale"). `replayer` therefore lets a recorder of the backend's own group catch
    up with the log before each replay, as the recorder of a running server would have.
    """

    name = "kafka"

    def __init__(self, settings: ForgeSettings) -> None:
        unique = uuid4().hex[:12]
        self.settings = ForgeSettings(
            **{
                **settings.model_dump(),
                "event_backend": EventBackend.KAFKA,
                "store_backend": StoreBackend.POSTGRES,
                "kafka_bootstrap_servers": KAFKA_BOOTSTRAP_SERVERS,
                "kafka_startup_timeout_seconds": SERVER_WAIT_SECONDS,
                "postgres_dsn": POSTGRES_DSN,
                "postgres_schema": f"contract_{unique}",
            }
        )
        self.group_prefix = f"contract-{unique}-"
        self._runtime: Runtime | None = None
        self._relay: EventConsumer | None = None
        self._database: PostgresDatabase | None = None
        self._outbox: PostgresOutbox | None = None
        self._consumers: list[EventConsumer] = []
        self._audit_catch_up: KafkaEventConsumer | None = None
        self._start_offsets: dict[TopicPartition, int] | None = None
        self._positioned_groups: set[str] = set()

    async def open(self) -> None:
        """Start the runtime and the outbox relay, on the schema and groups of earlier opens."""
        try:
            if self._start_offsets is None:
                self._start_offsets = await self._end_offsets()
            self._runtime = Runtime(self.settings)
            await self._runtime.start()
            # A pool of its own, as a second process would have, to count pending outbox rows.
            self._database = PostgresDatabase(
                self.settings.postgres_dsn,
                schema=self.settings.postgres_schema,
                min_size=1,
                max_size=2,
            )
            await self._database.open()
            self._outbox = PostgresOutbox(self._database)
            self._relay = self._runtime.worker_factories()["outbox-relay"]()
            await self._relay.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop every consumer made here, the relay, then the runtime, as a clean exit does."""
        for consumer in self._consumers:
            await consumer.stop()
        self._consumers.clear()
        if self._audit_catch_up is not None:
            await self._audit_catch_up.stop()
            self._audit_catch_up = None
        try:
            if self._relay is not None:
                # Raises the error that stopped the relay, if any.
                await self._relay.stop()
        finally:
            self._relay = None
            if self._runtime is not None:
                await self._runtime.stop()
                self._runtime = None
            if self._database is not None:
                await self._database.close()
                self._database = None
            self._outbox = None

    async def restart(self) -> None:
        """Close everything and open again on the same schema and groups, as a restarted process."""
        await self.close()
        await self.open()

    async def discard(self) -> None:
        """Drop the test's schema after `close()`. Its consumer groups stay in the broker."""
        connection = await asyncpg.connect(POSTGRES_DSN, timeout=SERVER_WAIT_SECONDS)
        try:
            await connection.execute(
                f'DROP SCHEMA IF EXISTS "{self.settings.postgres_schema}" CASCADE'
            )
        finally:
            await connection.close()

    @property
    def dead_letters(self) -> DeadLetterStore:
        return _DeadLettersByTestGroup(self.runtime.dead_letters, self.group_prefix)

    @property
    def replayer(self) -> Any:
        return _ReplayerAfterAuditCatchUp(self, self.runtime.replayer)

    def kafka_group_id(self, group_id: str) -> str:
        """Return the Kafka group id of the test's group `group_id`."""
        return f"{self.group_prefix}{group_id}"

    def make_consumer(self, group_id: str, **settings_overrides: Any) -> EventConsumer:
        """Return a consumer of `group_id`, not yet started, which is stopped when the test ends."""
        settings = self.settings
        if settings_overrides:
            settings = ForgeSettings(**{**settings.model_dump(), **settings_overrides})
        consumer = _TestGroupConsumer(self, group_id, settings)
        self._consumers.append(consumer)
        return consumer

    def make_audit_consumer(self) -> tuple[EventConsumer, AuditRecorder]:
        """Return the audit recorder's consumer, not started, and the recorder.

        As `Runtime.audit_consumer()` builds them, but in the test's own `forge-audit` group.
        """
        consumer = self.make_consumer(AUDIT_GROUP_ID)
        recorder = AuditRecorder(self.runtime.audit_store, self.runtime.protector)
        recorder.attach(consumer)
        return consumer, recorder

    async def append_raw(
        self,
        topic: str,
        value: bytes,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> int:
        """Write a record without validation, as a faulty producer would; return its offset."""
        connection = self.runtime.publisher
        assert isinstance(connection, BrokerConnection)
        await connection.wait_connected()
        producer = connection.producer
        assert isinstance(producer, KafkaEventProducer)
        return await producer.append_raw(topic, value, key=key, headers=headers)

    async def wait_for_outbox(self, seconds: float = WAIT_TIMEOUT_SECONDS) -> None:
        """Wait until the relay has published every outbox row and Kafka acknowledged it."""
        assert self._outbox is not None, "backend is not open"
        deadline = time.monotonic() + seconds
        while (pending := await self._outbox.pending_count()) > 0:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"Timed out after {seconds} s waiting for the outbox relay: {pending} "
                    "outbox row(s) are still pending. Check its log lines (outbox_relay_*)."
                )
            await asyncio.sleep(0.01)

    async def catch_up_audit(self) -> None:
        """Let the backend's audit recorder record every event written so far."""
        if self._audit_catch_up is None:
            consumer = _TestGroupConsumer(self, AUDIT_CATCH_UP_GROUP, self.settings)
            AuditRecorder(self.runtime.audit_store, self.runtime.protector).attach(consumer)
            await consumer.start()
            self._audit_catch_up = consumer
        await self._audit_catch_up.drain()

    async def start_group_at_opening_offsets(self, kafka_group_id: str) -> None:
        """Commit the end offsets of the first open for a group that has no offsets yet."""
        if kafka_group_id in self._positioned_groups:
            return
        assert self._start_offsets is not None, "backend is not open"
        client = AIOKafkaConsumer(
            bootstrap_servers=KAFKA_BOOTSTRAP_SERVERS,
            group_id=kafka_group_id,
            enable_auto_commit=False,
        )
        await client.start()
        try:
            client.assign(list(self._start_offsets))
            await client.commit(dict(self._start_offsets))
        finally:
            await client.stop()
        self._positioned_groups.add(kafka_group_id)

    async def _end_offsets(self) -> dict[TopicPartition, int]:
        """Return the next offset of every partition of every event topic."""
        topics = event_topics()
        counts = await partition_counts(self.settings, topics)
        missing = sorted(set(topics) - set(counts))
        assert not missing, f"topics missing on {KAFKA_BOOTSTRAP_SERVERS}: {missing}"
        partitions = [TopicPartition(topic, p) for topic in topics for p in range(counts[topic])]
        client = AIOKafkaConsumer(bootstrap_servers=KAFKA_BOOTSTRAP_SERVERS)
        await client.start()
        try:
            # With the partitions assigned first, aiokafka loads every topic's metadata at
            # once. Otherwise it loads one topic per retry, which took 2.2 s for 22 topics.
            client.assign(partitions)
            return dict(await client.end_offsets(partitions))
        finally:
            await client.stop()


AUDIT_CATCH_UP_GROUP = "replay-audit-catch-up"
"""The test group of the recorder that `KafkaBackend.replayer` lets catch up."""


class _TestGroupConsumer(KafkaEventConsumer):
    """A Kafka consumer in the test's group `group_id`, as `KafkaBackend` describes.

    `start()` first commits the backend's opening offsets for a new group, and `drain()` first
    waits until the outbox relay has published every pending row.
    """

    def __init__(self, backend: KafkaBackend, group_id: str, settings: ForgeSettings) -> None:
        super().__init__(
            backend.kafka_group_id(group_id),
            settings=settings,
            dead_letters=backend.runtime.dead_letters,
        )
        self._backend = backend

    async def start(self, event_types: Sequence[EventType] | None = None) -> None:
        await self._backend.start_group_at_opening_offsets(self.group_id)
        await super().start(event_types)

    async def drain(self, timeout: float = 30.0) -> int:
        await self._backend.wait_for_outbox()
        return await super().drain(timeout)


class _DeadLettersByTestGroup:
    """The runtime's dead-letter store, taking and showing the test's group names.

    Letters are stored under Kafka group ids, which are the test's names with the backend's
    prefix. The schema contains only this test's letters.
    """

    def __init__(self, store: DeadLetterStore, prefix: str) -> None:
        self._store = store
        self._prefix = prefix

    def _kafka(self, group_id: str) -> str:
        return f"{self._prefix}{group_id}"

    def _shown(self, letters: builtins.list[DeadLetter]) -> builtins.list[DeadLetter]:
        return [
            dataclasses.replace(letter, group_id=letter.group_id.removeprefix(self._prefix))
            for letter in letters
        ]

    async def park(self, letters: Sequence[DeadLetter]) -> None:
        await self._store.park(
            [
                dataclasses.replace(letter, group_id=self._kafka(letter.group_id))
                for letter in letters
            ]
        )

    async def list(
        self,
        *,
        group_id: str | None = None,
        status: DeadLetterStatus | None = None,
        limit: int = 100,
    ) -> builtins.list[DeadLetter]:
        kafka_group = self._kafka(group_id) if group_id is not None else None
        return self._shown(await self._store.list(group_id=kafka_group, status=status, limit=limit))

    async def request_retry(
        self, ids: Sequence[int] | None = None, *, group_id: str | None = None
    ) -> int:
        kafka_group = self._kafka(group_id) if group_id is not None else None
        return await self._store.request_retry(ids, group_id=kafka_group)

    async def claim_retries(self, group_id: str, limit: int = 100) -> builtins.list[DeadLetter]:
        return self._shown(await self._store.claim_retries(self._kafka(group_id), limit))

    async def mark_resolved(self, letter_id: int) -> None:
        await self._store.mark_resolved(letter_id)

    async def mark_parked(
        self,
        letter_id: int,
        reason: str,
        error_type: str,
        attempts: int,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        await self._store.mark_parked(letter_id, reason, error_type, attempts, extra)


class _ReplayerAfterAuditCatchUp:
    """The runtime's `CapsuleReplayer`, called once the backend's audit recorder caught up."""

    def __init__(self, backend: KafkaBackend, replayer: CapsuleReplayer) -> None:
        self._backend = backend
        self._replayer = replayer

    async def replay(self, capsule_id: UUID, *, at: datetime | None = None) -> ReplayResult:
        await self._backend.catch_up_audit()
        return await self._replayer.replay(capsule_id, at=at)


BACKENDS: dict[str, type[SqliteBackend] | type[KafkaBackend]] = {
    "sqlite": SqliteBackend,
    "kafka": KafkaBackend,
}
BACKEND_MARKS: dict[str, tuple[pytest.MarkDecorator, ...]] = {
    "kafka": (pytest.mark.kafka, pytest.mark.postgres),
}

KNOWN_BACKEND_BUGS: dict[tuple[str, str], str] = {}
"""Contract tests that a backend fails today, by (backend, test name), with the reason.

They run and are expected to fail with an AssertionError (strict xfail), so a missing server
still shows as an error, and a fixed bug fails the test until its entry is removed here.
"""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "backend" not in callspec.params:
            continue
        name = getattr(item, "originalname", item.name)
        reason = KNOWN_BACKEND_BUGS.get((str(callspec.params["backend"]), name))
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=reason, raises=AssertionError, strict=True))


_server_problems: list[str] | None = None
"""Problems found by `_require_distributed_servers`, once per session, or None before it ran."""


async def _require_distributed_servers() -> None:
    """Fail, never skip, unless the Kafka broker and PostgreSQL respond (checked once)."""
    global _server_problems
    if _server_problems is None:
        _server_problems = await _check_distributed_servers()
    if _server_problems:
        pytest.fail(
            "The contract tests of the kafka backend need a running Kafka broker and "
            "PostgreSQL server. " + " ".join(_server_problems),
            pytrace=False,
        )


async def _check_distributed_servers() -> list[str]:
    """Return what is wrong with the Kafka broker and the PostgreSQL server, if anything."""
    problems: list[str] = []
    try:
        await ensure_topics(ForgeSettings(kafka_bootstrap_servers=KAFKA_BOOTSTRAP_SERVERS))
    except ForgeError as error:
        # Forge's message names the address and how to start a broker.
        problems.append(f"Kafka: {error}")
    try:
        connection = await asyncpg.connect(POSTGRES_DSN, timeout=SERVER_WAIT_SECONDS)
        await connection.close()
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        problems.append(
            f"PostgreSQL at {redact_dsn(POSTGRES_DSN)}: {error!r}. Start it with "
            "`scripts/postgres-server start`, or set FORGE_POSTGRES_DSN to a running server."
        )
    return problems


@pytest.fixture(
    params=[pytest.param(name, marks=BACKEND_MARKS.get(name, ())) for name in sorted(BACKENDS)]
)
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Any]:
    """An open backend on fresh data (folder, schema, groups), closed when the test ends."""
    name = str(request.param)
    if name == "kafka":
        await _require_distributed_servers()
        # drain() ends with a poll that finds no record and so waits the whole timeout. With
        # 500 ms, each drain took about a second.
        monkeypatch.setattr(kafka_consumer_module, "FETCH_TIMEOUT_MS", KAFKA_FETCH_TIMEOUT_MS)
    opened = BACKENDS[name](make_settings(tmp_path / "data"))
    try:
        await opened.open()
        yield opened
    finally:
        await opened.close()
        await opened.discard()
