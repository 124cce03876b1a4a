"""Kafka consumer of Forge events, with the interface of the embedded consumer.

Records arrive as bytes and are decoded by the shared `Dispatcher`, never inside the Kafka
client. A malformed record (not JSON, unknown type, invalid payload, newer schema, invalid
UTF-8, too large) is therefore parked with the reason instead of breaking the loop.

Guarantees:

- Every record ends handled by every handler, or parked: written to the dead-letter topic
  `forge.dead-letter` with the reason in its headers, and to the `DeadLetterStore` when one is
  given. A partition's offset is committed once per fetched batch, and only up to records in
  one of those two states. A consumer stopped or killed at any point therefore loses nothing,
  and the records after the last commit are delivered again (at least once).
- Records of one partition, and so the events of one resource, are handled one after another
  in offset order. Records of the other partitions of the batch wait meanwhile.
- On a rebalance, the batch in progress is finished (for at most `consumer_stop_timeout_seconds`)
  and its offsets committed before the partitions are given up.
- A handler may run for longer than `max_poll_interval_ms`: while a batch is handled, the
  consumer pauses its partitions and polls every few seconds, so the broker keeps it in the
  group; heartbeats are sent by aiokafka's background task in any case.
- `stop()` returns within `consumer_stop_timeout_seconds`, even while the broker is down.

When the broker cannot be reached, `start()` logs `kafka_broker_unavailable` and returns;
`run()` then connects with a backoff doubling from 0.5 s to 10 s, logging each failed attempt,
until the broker responds or `stop()` is called. Callers that need the broker at once can call
`poll_once()`, which raises `BrokerUnavailableError` instead.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    UnsupportedCodecError,
)

from forge.config import ForgeSettings
from forge.core.events.codec import HEADER_EVENT_TIME
from forge.core.events.dead_letters import DECODE_STAGE, DeadLetter, DeadLetterStore
from forge.core.events.dispatch import (
    Dispatcher,
    HandlerRegistrations,
    HandlerRegistry,
    RetryPolicy,
    check_group_id,
)
from forge.core.events.ports import LogRecord
from forge.exceptions import (
    BrokerUnavailableError,
    ConsumerGroupError,
    ForgeError,
    NotStartedError,
    PublishError,
)
from forge.infrastructure.kafka.admin import check_topics
from forge.infrastructure.kafka.common import (
    CONNECT_TIMEOUT_SECONDS,
    DEAD_LETTER_TOPIC,
    KafkaHeaders,
    describe,
    find_unreadable,
    is_retriable,
    start_client,
    to_log_records,
    unreadable_reason,
)
from forge.infrastructure.kafka.producer import KafkaEventProducer
from forge.logging import get_logger
from forge.models.events import EventType, topic_for

logger = get_logger(__name__)

FETCH_TIMEOUT_MS = 500
"""Maximum wait of one poll for records, which bounds how late the loop notices stop()."""

FETCH_MAX_WAIT_MS = 100
"""Maximum time the broker waits for new records before it responds to a fetch request
(Kafka's `fetch.max.wait.ms`).

The broker handles one connection's requests in order, so the requests for end offsets that
`drain()` sends wait behind such a fetch. With aiokafka's default of 500 ms, the last of them
took 0.42 s of a 3.5 s drain of 200,000 events. A shorter wait means more fetch requests while
the topics are idle: at most 10 a second per broker, instead of 2."""

KEEPALIVE_INTERVAL_SECONDS = 10.0
"""Poll interval while a batch is being handled, far below `max_poll_interval_ms`."""

MAX_POLL_INTERVAL_MS = 300_000
"""aiokafka's default: a member that does not poll for this long leaves the group."""

COMMIT_TIMEOUT_SECONDS = 10.0
"""Maximum wait for one offset commit. A commit that times out is tried again later."""

RECONNECT_BACKOFF_SECONDS = (0.5, 10.0)
"""Initial and maximum wait between attempts to reach the broker or to poll after an error."""

_RETRY_CHECK_INTERVAL_SECONDS = 1.0
_FETCH_OVERHEAD_BYTES = 64 * 1024
_DEAD_LETTER_REASON_CHARS = 2000
_TRUNCATED_VALUE_BYTES = 64 * 1024
_TRUNCATED_KEY_BYTES = 1024
_TRUNCATED_HEADERS_BYTES = 64 * 1024

# Headers added to a record in the dead-letter topic, beside the original record's headers.
HEADER_DLQ_REASON = "dlq_reason"
HEADER_DLQ_ERROR_TYPE = "dlq_error_type"
HEADER_DLQ_HANDLER = "dlq_handler"
HEADER_DLQ_ATTEMPTS = "dlq_attempts"
HEADER_DLQ_GROUP_ID = "dlq_group_id"
HEADER_DLQ_TOPIC = "dlq_original_topic"
HEADER_DLQ_PARTITION = "dlq_original_partition"
HEADER_DLQ_OFFSET = "dlq_original_offset"
HEADER_DLQ_PARKED_AT = "dlq_parked_at"
HEADER_DLQ_VALUE_TRUNCATED = "dlq_value_truncated"
"""Present, with the original size in bytes, when the value was cut to fit the topic."""
HEADER_DLQ_KEY_TRUNCATED = "dlq_key_truncated"
"""Present, with the original size in bytes, when the key was cut to fit the topic."""
HEADER_DLQ_HEADERS_DROPPED = "dlq_headers_dropped"
"""Present, with their count, when the original headers were left out to fit the topic."""

_DLQ_PREFIX = "dlq_"


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Commits finished work before partitions are given up, and logs assignments."""

    def __init__(self, owner: KafkaEventConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._owner._on_partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._owner._on_partitions_assigned(set(assigned))


class KafkaEventConsumer(HandlerRegistrations):
    """One member of a Kafka consumer group that hands events to registered handlers."""

    def __init__(
        self,
        group_id: str,
        *,
        settings: ForgeSettings | None = None,
        dead_letters: DeadLetterStore | None = None,
        retry_policy: RetryPolicy | None = None,
        bootstrap_servers: str | None = None,
    ) -> None:
        """Configure the member; nothing connects before `start()`.

        Args:
            dead_letters: store that also keeps parked records, so that `forge dlq retry`
                can ask for redelivery. Without it, parked records are only in the
                dead-letter topic.
            retry_policy: defaults to the `consumer_*` retry settings.
            bootstrap_servers: overrides `settings.kafka_bootstrap_servers`.
        """
        check_group_id(group_id)
        settings = settings or ForgeSettings()
        if bootstrap_servers and bootstrap_servers != settings.kafka_bootstrap_servers:
            settings = settings.model_copy(update={"kafka_bootstrap_servers": bootstrap_servers})
        self._settings = settings
        self._group_id = group_id
        self._dead_letters = dead_letters
        self._registry = HandlerRegistry()
        self._stopping = asyncio.Event()
        self._dispatcher = Dispatcher(
            group_id,
            self._registry,
            retry_policy or RetryPolicy.from_settings(settings),
            settings.max_event_bytes,
            self._stopping,
        )
        self._listener = _RebalanceListener(self)
        self._topics: list[str] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._dead_letter_producer: KafkaEventProducer | None = None
        self._assigned = asyncio.Event()
        self._uncommitted: dict[TopicPartition, int] = {}
        self._handled_to: dict[TopicPartition, int] = {}
        """Offset after the last record handled or parked, per owned partition."""
        self._commit_task: asyncio.Task[None] | None = None
        self._batch_task: asyncio.Task[None] | None = None
        self._running: asyncio.Task[None] | None = None
        self._started = False
        self._last_retry_check = 0.0
        self.handled_count = 0
        """Records finished, handled or parked, since this object was created."""
        self.parked_count = 0
        """Records parked since this object was created."""

    @property
    def group_id(self) -> str:
        return self._group_id

    @property
    def connected(self) -> bool:
        """Whether the Kafka client is started; False while waiting for the broker."""
        return self._consumer is not None

    @property
    def assignment(self) -> set[tuple[str, int]]:
        """(topic, partition) pairs this member currently owns."""
        if self._consumer is None:
            return set()
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    async def __aenter__(self) -> KafkaEventConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # Lifecycle -----------------------------------------------------------------------------------

    async def start(self, event_types: Sequence[EventType] | None = None) -> None:
        """Subscribe to `event_types`, or to every type a handler is registered for.

        Returns without a connection when the broker cannot be reached; `run()` connects once
        it responds. Calling `start()` on a started consumer does nothing.

        Raises:
            ValueError: there is no event type to consume.
            MissingTopicsError: subscribed topics or the dead-letter topic do not exist and the
                broker does not create them.
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
        self._topics = sorted({topic_for(event_type) for event_type in types})
        self._stopping.clear()
        try:
            await self._connect()
        except BrokerUnavailableError as error:
            logger.warning(
                "kafka_broker_unavailable",
                group_id=self._group_id,
                bootstrap_servers=self._settings.kafka_bootstrap_servers,
                error=str(error),
                next_step="run() connects once the broker responds",
            )
        self._started = True
        logger.info(
            "kafka_consumer_started",
            group_id=self._group_id,
            topics=self._topics,
            connected=self.connected,
        )

    async def run(self) -> None:
        """Handle events until `stop()` is called.

        A retriable error (the broker down, a failed commit or dead-letter write) is logged,
        and the loop goes on after a backoff. Any other error stops the loop and is raised
        here.

        Raises:
            NotStartedError: `start()` was not called.
        """
        self._require_started()
        self._running = asyncio.current_task()
        delay = RECONNECT_BACKOFF_SECONDS[0]
        try:
            while not self._stopping.is_set():
                try:
                    await self.poll_once()
                    delay = RECONNECT_BACKOFF_SECONDS[0]
                except ForgeError as error:
                    if not error.retriable:
                        raise
                    self._log_poll_failure(error, delay)
                    await self._sleep_unless_stopping(delay)
                    delay = min(delay * 2, RECONNECT_BACKOFF_SECONDS[1])
        finally:
            self._running = None

    async def poll_once(self) -> bool:
        """Fetch and handle one batch, and any dead letters waiting for redelivery.

        Waits up to `FETCH_TIMEOUT_MS` for records. Returns whether any record was handled.

        Raises:
            BrokerUnavailableError: the consumer is not connected and the broker cannot be
                reached.
            PublishError, StorageError: parked records could not be written; they are
                delivered again.
            ConsumerGroupError: the broker rejected this member, and retrying cannot help.
        """
        self._require_started()
        consumer = self._consumer or await self._connect()

        worked = False
        now = time.monotonic()
        if self._dead_letters is not None and now - self._last_retry_check > (
            _RETRY_CHECK_INTERVAL_SECONDS
        ):
            self._last_retry_check = now
            worked = await self._redeliver_requested(self._dead_letters)
        if self._uncommitted and not self._committing:
            # Offsets whose commit failed are sent again before the next fetch.
            await self._commit()

        try:
            batches = await consumer.getmany(
                timeout_ms=FETCH_TIMEOUT_MS, max_records=self._settings.consumer_batch_size
            )
        except KafkaError as error:
            raise self._translate(error, "Fetching records") from error
        except Exception as error:
            # aiokafka failed to read a record, for example one with a header name that is
            # not UTF-8, and would fail on it again at every fetch.
            await self._skip_unreadable(consumer, error)
            return True
        if not batches:
            return worked

        per_partition = [to_log_records(batches[tp]) for tp in sorted(batches)]
        # Each event type has its own topic, so Kafka orders one resource's events only within
        # a type. Merging the fetched partitions by event time keeps each partition's order and
        # hands over a resource's created, updated and deleted events in the order they
        # happened, as far as they arrive in the same fetch.
        records = list(heapq.merge(*per_partition, key=_event_time))
        logger.debug("records_fetched", group_id=self._group_id, records=len(records))
        await self._handle_keeping_membership(consumer, records, batches)
        return True

    async def drain(self, timeout: float = 30.0) -> int:
        """Handle every record written so far to this member's partitions.

        Waits for the broker and for the partition assignment first. Returns the number of
        records handled or parked. For tests and command-line tools that consume without
        running a loop.

        Raises:
            TimeoutError: the records were not all handled within `timeout` seconds, or the
                broker did not respond within it.
            BrokerUnavailableError: the broker became unreachable during the drain.
            NotStartedError: `start()` was not called.
        """
        self._require_started()
        deadline = time.monotonic() + timeout
        handled_before = self.handled_count
        self._last_retry_check = 0.0

        consumer = await self._connect_until(deadline)
        while not self._assigned.is_set():
            await self.poll_once()
            self._check_deadline(deadline, timeout, "waiting for the partition assignment")

        targets: dict[TopicPartition, int] = {}
        while True:
            worked = await self.poll_once()
            assignment = consumer.assignment()
            new_partitions = [tp for tp in assignment if tp not in targets]
            if new_partitions:
                targets.update(await consumer.end_offsets(new_partitions))
                continue
            if await _caught_up(consumer, targets, assignment):
                if not worked:
                    break
                # Handlers may have published more records meanwhile. Asking for the end
                # offsets again takes one request, while another poll would wait
                # FETCH_TIMEOUT_MS for records that are not there.
                owned = [tp for tp in targets if tp in assignment]
                targets.update(await consumer.end_offsets(owned))
                if await _caught_up(consumer, targets, assignment):
                    break
            self._check_deadline(deadline, timeout, "handling the records written so far")
        # The last batch's commit may still be in flight.
        await self._commit()
        return self.handled_count - handled_before

    async def stop(self) -> None:
        """Finish or interrupt the batch in progress, commit what is done and leave the group.

        Returns within `consumer_stop_timeout_seconds`, even while the broker is down; a
        handler being retried is interrupted and its record is delivered again on the next
        start. Calling `stop()` again does nothing.
        """
        if not self._started:
            return
        self._stopping.set()
        bound = self._settings.consumer_stop_timeout_seconds
        deadline = time.monotonic() + bound

        # Let the loop finish its batch within part of the bound, keeping the rest for the
        # commit and for leaving the group.
        running = self._running
        if running is not None and running is not asyncio.current_task():
            done, _ = await asyncio.wait({running}, timeout=bound * 0.5)
            if not done:
                logger.warning(
                    "kafka_consumer_stop_timed_out",
                    group_id=self._group_id,
                    waited_seconds=round(bound * 0.5, 3),
                    next_step="interrupting the batch; its uncommitted records are delivered again",
                )
                running.cancel()
                await asyncio.wait({running}, timeout=_remaining(deadline))
            elif not running.cancelled() and running.exception() is not None:
                logger.error(
                    "kafka_consumer_loop_failed",
                    group_id=self._group_id,
                    error=repr(running.exception()),
                )
        batch = self._batch_task
        if batch is not None and not batch.done():
            batch.cancel()
            await asyncio.wait({batch}, timeout=_remaining(deadline))

        consumer, self._consumer = self._consumer, None
        producer, self._dead_letter_producer = self._dead_letter_producer, None
        if consumer is not None:
            await self._commit(consumer, timeout=_remaining(deadline) * 0.5)
            await _close_within(consumer.stop(), _remaining(deadline), "consumer", self._group_id)
        if producer is not None:
            await _close_within(
                producer.stop(), _remaining(deadline), "dead-letter producer", self._group_id
            )
        self._uncommitted.clear()
        self._assigned.clear()
        self._started = False
        logger.info(
            "kafka_consumer_stopped",
            group_id=self._group_id,
            handled=self.handled_count,
            parked=self.parked_count,
        )

    # Connection ----------------------------------------------------------------------------------

    async def _connect(self) -> AIOKafkaConsumer:
        """Start the Kafka client and the dead-letter producer, and subscribe.

        Raises:
            BrokerUnavailableError: the broker did not respond within the connect timeout.
            MissingTopicsError: topics are missing and the broker does not create them.
        """
        settings = self._settings
        bootstrap = settings.kafka_bootstrap_servers
        session_ms = int(settings.consumer_session_timeout_seconds * 1000)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            client_id=settings.kafka_client_id,
            group_id=self._group_id,
            # Offsets are committed by this class after records are handled or parked.
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(session_ms // 3, 100),
            # The broker waits this long for members to rejoin, so it must exceed the time
            # `_on_partitions_revoked` may spend finishing the batch in progress.
            rebalance_timeout_ms=session_ms + int(settings.consumer_stop_timeout_seconds * 1000),
            max_poll_interval_ms=MAX_POLL_INTERVAL_MS,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            # Records of a transaction that its producer aborted were never published; the
            # default, read_uncommitted, hands them over too.
            isolation_level="read_committed",
            # aiokafka 0.14's documentation warns that a consumer can get stuck on a record
            # larger than this.
            max_partition_fetch_bytes=max(
                1024 * 1024, settings.max_event_bytes + _FETCH_OVERHEAD_BYTES
            ),
        )
        producer = KafkaEventProducer(settings=settings, check_topics_on_start=False)
        try:
            await start_client(
                consumer.start(), bootstrap, "Kafka consumer", CONNECT_TIMEOUT_SECONDS
            )
            await check_topics(settings, [*self._topics, DEAD_LETTER_TOPIC])
            await producer.start()
        except BaseException:
            await _close_within(consumer.stop(), COMMIT_TIMEOUT_SECONDS, "consumer", self._group_id)
            await producer.stop()
            raise
        consumer.subscribe(topics=self._topics, listener=self._listener)
        self._consumer = consumer
        self._dead_letter_producer = producer
        logger.info(
            "kafka_consumer_connected",
            group_id=self._group_id,
            bootstrap_servers=bootstrap,
            topics=len(self._topics),
        )
        return consumer

    async def _connect_until(self, deadline: float) -> AIOKafkaConsumer:
        delay = RECONNECT_BACKOFF_SECONDS[0]
        while self._consumer is None:
            try:
                return await self._connect()
            except BrokerUnavailableError as error:
                if time.monotonic() + delay > deadline:
                    raise TimeoutError(f"{error} Gave up waiting for it.") from error
                self._log_poll_failure(error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_BACKOFF_SECONDS[1])
        return self._consumer

    # Handling ------------------------------------------------------------------------------------

    async def _handle_keeping_membership(
        self,
        consumer: AIOKafkaConsumer,
        records: list[LogRecord],
        fetched: Mapping[TopicPartition, list[Any]],
    ) -> None:
        """Handle a batch in a task, polling with paused partitions while it runs.

        `fetched` contains aiokafka's records of the batch by partition, for the dead letters.
        """
        task = asyncio.create_task(self._handle_batch(consumer, records, fetched))
        self._batch_task = task
        paused: list[TopicPartition] = []
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=KEEPALIVE_INTERVAL_SECONDS)
                if done:
                    break
                paused = await self._keep_membership(consumer, paused)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            self._batch_task = None
            owned = consumer.assignment()
            still_owned = [tp for tp in paused if tp in owned]
            if still_owned:
                consumer.resume(*still_owned)
        task.result()

    async def _skip_unreadable(self, consumer: AIOKafkaConsumer, error: Exception) -> None:
        """Handle the records before the one aiokafka could not read, then park that one.

        The record's content cannot be read through aiokafka, so its letter names its topic,
        partition and offset, for reading it with another client.

        Raises:
            ConsumerGroupError: the failing partition could not be found.
        """
        try:
            # aiokafka had already taken records of other partitions in the failed call and
            # moved their positions past them, so every partition goes back to what is handled.
            await self._rewind_to_handled(consumer)
            found = await find_unreadable(consumer, error, FETCH_TIMEOUT_MS)
        except KafkaError as fetch_error:
            raise self._translate(fetch_error, "Fetching records") from fetch_error
        if found is None:
            raise ConsumerGroupError(
                f"Reading records for consumer group {self._group_id!r} failed: "
                f"{describe(error)}. The record could not be found to park it; read the "
                "group's partitions with another client to find it."
            ) from error
        if found.readable:
            fetched = {found.partition: found.readable}
            await self._handle_keeping_membership(consumer, to_log_records(found.readable), fetched)
        if found.offset is None:
            # Read this time: the failure did not come from one record.
            return

        tp, offset = found.partition, found.offset
        letter = DeadLetter(
            group_id=self._group_id,
            topic=tp.topic,
            partition=tp.partition,
            offset=offset,
            key=None,
            value=b"",
            headers={},
            reason=unreadable_reason(tp, offset, found.error),
            error_type=type(found.error).__name__,
            handler=DECODE_STAGE,
            attempts=1,
        )
        logger.warning(
            "event_parked",
            group_id=self._group_id,
            topic=tp.topic,
            partition=tp.partition,
            offset=offset,
            handler=DECODE_STAGE,
            reason=letter.reason,
        )
        await self._park([letter], {})
        consumer.seek(tp, offset + 1)
        self._uncommitted[tp] = offset + 1
        self._handled_to[tp] = offset + 1
        self.handled_count += 1
        self.parked_count += 1
        await self._commit_in_background(consumer)

    async def _rewind_to_handled(self, consumer: AIOKafkaConsumer) -> None:
        """Seek every owned partition to the offset after its last handled record."""
        for tp in consumer.assignment():
            offset = self._handled_to.get(tp)
            if offset is None:
                offset = await consumer.committed(tp)
            if offset is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)

    async def _keep_membership(
        self, consumer: AIOKafkaConsumer, paused: list[TopicPartition]
    ) -> list[TopicPartition]:
        # aiokafka leaves the group when getmany() is not called for max_poll_interval_ms.
        # Polling paused partitions returns no records and proves the member is alive.
        if not paused:
            paused = sorted(consumer.assignment())
            if not paused:
                return paused
            consumer.pause(*paused)
        try:
            await consumer.getmany(*paused, timeout_ms=0)
        except KafkaError as error:
            # The batch goes on, and the next poll after it reports the error if it persists.
            logger.warning(
                "kafka_consumer_keepalive_failed", group_id=self._group_id, error=describe(error)
            )
            return paused
        logger.debug("kafka_consumer_keepalive", group_id=self._group_id, partitions=len(paused))
        return paused

    async def _handle_batch(
        self,
        consumer: AIOKafkaConsumer,
        records: list[LogRecord],
        fetched: Mapping[TopicPartition, list[Any]],
    ) -> None:
        result = await self._dispatcher.dispatch(records)
        letters = result.dead_letters

        # Records from `result.completed` on were interrupted by stop(): they are delivered
        # again, so each partition is finished only up to its first such record.
        first_unfinished: dict[TopicPartition, int] = {}
        for record in records[result.completed :]:
            first_unfinished.setdefault(
                TopicPartition(record.topic, record.partition), record.offset
            )

        park_error: ForgeError | None = None
        if letters:
            try:
                await self._park(letters, fetched)
            except ForgeError as error:
                # A record whose dead letter was not written is neither handled nor parked, so
                # its partition must not be committed past it.
                park_error = error
                for letter in letters:
                    tp = TopicPartition(letter.topic, letter.partition)
                    first_unfinished[tp] = min(
                        first_unfinished.get(tp, letter.offset), letter.offset
                    )
                logger.error(
                    "dead_letters_not_written",
                    group_id=self._group_id,
                    letters=len(letters),
                    error=str(error),
                    next_step="their records are delivered again after a backoff",
                )

        next_offsets: dict[TopicPartition, int] = {}
        if not first_unfinished:
            # Every record was handled or parked, so each partition is done up to its last
            # fetched record. Going through the records cost about 0.5 µs per event.
            finished = len(records)
            for tp, messages in fetched.items():
                if messages:
                    next_offsets[tp] = messages[-1].offset + 1
        else:
            finished = 0
            for record in records:
                tp = TopicPartition(record.topic, record.partition)
                if record.offset < first_unfinished.get(tp, record.offset + 1):
                    next_offsets[tp] = record.offset + 1
                    finished += 1
        self.handled_count += finished
        if park_error is None:
            self.parked_count += len(letters)

        owned = consumer.assignment()
        for tp, offset in first_unfinished.items():
            if tp in owned:
                consumer.seek(tp, offset)
        self._uncommitted.update(next_offsets)
        self._handled_to.update(next_offsets)
        await self._commit_in_background(consumer)
        if park_error is not None:
            raise park_error

    async def _park(
        self, letters: Sequence[DeadLetter], fetched: Mapping[TopicPartition, list[Any]]
    ) -> None:
        """Write letters to the dead-letter topic, then to the store when there is one.

        Raises:
            PublishError: the broker did not acknowledge some dead letters.
            StorageError: the store failed.
        """
        producer = self._dead_letter_producer
        if producer is None:
            raise BrokerUnavailableError(
                "The dead-letter producer is not connected, so the records are delivered again."
            )
        parked_at = datetime.now(UTC).isoformat()
        # Built only here, because most batches park nothing.
        raw_records = {
            (message.topic, message.partition, message.offset): message
            for messages in fetched.values()
            for message in messages
        }
        outgoing = [
            _dead_letter_record(letter, raw_records.get(_position(letter)), parked_at)
            for letter in letters
        ]
        errors = await producer.send_records(outgoing)

        # A record near the broker's size limit no longer fits once the reason headers are
        # added. It is written again with its value cut, and the full value stays in the store.
        too_large = [
            position
            for position, error in errors.items()
            if isinstance(error, MessageSizeTooLargeError | RecordListTooLargeError)
        ]
        if too_large:
            retried = await producer.send_records([_truncated(outgoing[p]) for p in too_large])
            for index, position in enumerate(too_large):
                if index in retried:
                    errors[position] = retried[index]
                else:
                    del errors[position]
        if errors:
            position, error = next(iter(errors.items()))
            failed = PublishError(
                f"{len(errors)} of {len(letters)} dead letter(s) were not written to "
                f"{DEAD_LETTER_TOPIC}; first, for {letters[position].topic} offset "
                f"{letters[position].offset}: {describe(error)}."
            )
            failed.retriable = True
            raise failed
        if self._dead_letters is not None:
            await self._dead_letters.park(letters)
        logger.info("dead_letters_written", group_id=self._group_id, letters=len(letters))

    async def _redeliver_requested(self, store: DeadLetterStore) -> bool:
        letters = await store.claim_retries(self._group_id)
        for letter in letters:
            if letter.id is None:
                continue
            outcome = await self._dispatcher.redeliver(letter)
            if outcome is None:
                await store.mark_resolved(letter.id)
                logger.info(
                    "dead_letter_resolved",
                    group_id=self._group_id,
                    letter_id=letter.id,
                    event_id=letter.event_id,
                )
            else:
                await store.mark_parked(
                    letter.id,
                    outcome.reason,
                    outcome.error_type,
                    outcome.attempts,
                    outcome.extra,
                )
        return bool(letters)

    # Offsets -------------------------------------------------------------------------------------

    @property
    def _committing(self) -> bool:
        return self._commit_task is not None and not self._commit_task.done()

    async def _commit_in_background(
        self, consumer: AIOKafkaConsumer | None = None, timeout: float = COMMIT_TIMEOUT_SECONDS
    ) -> None:
        """Start committing the finished offsets, and return without waiting for the broker.

        The next batch is fetched and handled during the commit's round trip. Awaited, that
        round trip took about 2 µs per event of 500-record batches. Commits stay one at a time
        and in order, because this first waits for the previous one.
        """
        deadline = time.monotonic() + timeout
        await self._finish_commit(timeout)
        # No await between the wait and this line, so no other commit can start in between.
        self._commit_task = asyncio.create_task(
            self._commit_offsets(consumer, timeout=_remaining(deadline))
        )

    async def _finish_commit(self, timeout: float) -> None:
        """Wait until no commit is in flight, cancelling each one still running after `timeout`.

        Several callers may wait for the same commit, and the first one to resume may start
        the next, so this waits again until none is left.
        """
        deadline = time.monotonic() + timeout
        while (task := self._commit_task) is not None:
            if not task.done():
                await asyncio.wait({task}, timeout=max(_remaining(deadline), 0.001))
            if not task.done():
                # Its offsets stay in `_uncommitted`, so the next commit sends them again.
                task.cancel()
                await asyncio.wait({task})
            if self._commit_task is task:
                self._commit_task = None
            if not task.cancelled():
                # `_commit_offsets` handles the broker's errors, so this raises only a bug.
                task.result()

    async def _commit(
        self, consumer: AIOKafkaConsumer | None = None, *, timeout: float = COMMIT_TIMEOUT_SECONDS
    ) -> None:
        """Wait for a commit in flight, then commit the offsets still uncommitted.

        The commit runs as the tracked task, so that a background commit started meanwhile
        waits for it.
        """
        deadline = time.monotonic() + timeout
        await self._commit_in_background(consumer, timeout)
        # The extra 0.1 s lets the commit's own timeout end it, with its log line, before
        # `_finish_commit` would cancel it.
        await self._finish_commit(_remaining(deadline) + 0.1)

    async def _commit_offsets(
        self, consumer: AIOKafkaConsumer | None = None, *, timeout: float = COMMIT_TIMEOUT_SECONDS
    ) -> None:
        """Commit finished offsets of owned partitions; keep them for later if that fails."""
        consumer = consumer or self._consumer
        if consumer is None or not self._uncommitted:
            return
        owned = consumer.assignment()
        offsets = {tp: offset for tp, offset in self._uncommitted.items() if tp in owned}
        lost = [tp for tp in self._uncommitted if tp not in owned]
        for tp in lost:
            del self._uncommitted[tp]
        if lost:
            logger.warning(
                "offsets_not_committed",
                group_id=self._group_id,
                partitions=[f"{tp.topic}:{tp.partition}" for tp in lost],
                reason="partitions were given to another member first",
                next_step="that member handles their uncommitted records again",
            )
        if not offsets:
            return
        try:
            await asyncio.wait_for(consumer.commit(offsets), max(timeout, 0.001))
        except (CommitFailedError, IllegalStateError) as error:
            for tp, offset in offsets.items():
                if self._uncommitted.get(tp) == offset:
                    del self._uncommitted[tp]
            logger.warning(
                "offsets_not_committed",
                group_id=self._group_id,
                partitions=[f"{tp.topic}:{tp.partition}" for tp in offsets],
                reason=describe(error),
                next_step="the member that owns them now handles their records again",
            )
            return
        except (KafkaError, TimeoutError) as error:
            logger.warning(
                "offsets_commit_failed",
                group_id=self._group_id,
                partitions=len(offsets),
                error=describe(error) if isinstance(error, KafkaError) else "timed out",
                next_step="retrying with the next batch",
            )
            return
        for tp, offset in offsets.items():
            if self._uncommitted.get(tp) == offset:
                del self._uncommitted[tp]
        # One line per commit, because a line per partition made up to 66 debug calls per
        # batch, at about 1.7 µs each even when debug is off.
        logger.debug(
            "offsets_committed",
            group_id=self._group_id,
            offsets={f"{tp.topic}:{tp.partition}": offset for tp, offset in offsets.items()},
        )

    async def _on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Finish the batch in progress first: its records belong to these partitions, and
        # the member that gets them next starts from the committed offsets.
        batch = self._batch_task
        if batch is not None and not batch.done():
            bound = self._settings.consumer_stop_timeout_seconds
            done, _ = await asyncio.wait({batch}, timeout=bound)
            if not done:
                logger.warning(
                    "rebalance_wait_timed_out",
                    group_id=self._group_id,
                    waited_seconds=bound,
                    next_step="the next owner may handle the batch in progress again",
                )
        await self._commit()
        self._assigned.clear()
        if not revoked:
            # aiokafka reports an empty revocation before the first assignment.
            return
        logger.info(
            "partitions_revoked",
            group_id=self._group_id,
            partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in revoked),
        )

    def _on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in [tp for tp in self._uncommitted if tp not in assigned]:
            del self._uncommitted[tp]
        # A partition owned again resumes from its committed offset.
        self._handled_to.clear()
        self._assigned.set()
        logger.info(
            "partitions_assigned",
            group_id=self._group_id,
            partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
        )

    # Helpers -------------------------------------------------------------------------------------

    def _require_started(self) -> None:
        if not self._started:
            raise NotStartedError(
                f"Consumer {self._group_id!r} is not started; call `await consumer.start()`."
            )

    def _translate(self, error: KafkaError, action: str) -> ForgeError:
        if is_retriable(error):
            return BrokerUnavailableError(
                f"{action} for consumer group {self._group_id!r} failed: {describe(error)}."
            )
        if isinstance(error, UnsupportedCodecError):
            return ConsumerGroupError(
                f"{action} for consumer group {self._group_id!r} failed: {describe(error)}. "
                "Install cramjam (pip install 'aiokafka[snappy,lz4,zstd]'), which Forge's "
                "dependencies include."
            )
        return ConsumerGroupError(
            f"{action} for consumer group {self._group_id!r} failed: {describe(error)}. Check "
            "the group's access rights and the broker's log."
        )

    def _log_poll_failure(self, error: ForgeError, delay: float) -> None:
        logger.warning(
            "kafka_consumer_poll_failed",
            group_id=self._group_id,
            error=str(error),
            retry_in_seconds=delay,
        )

    def _check_deadline(self, deadline: float, timeout: float, step: str) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"drain() of consumer group {self._group_id!r} timed out after {timeout:g} s "
                f"while {step}."
            )

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass


def _event_time(record: LogRecord) -> int:
    """Return the record's event time in microseconds: from its header, else Kafka's timestamp."""
    header = record.headers.get(HEADER_EVENT_TIME)
    # Only ASCII digits, and at most 19 of them: `isdigit()` also accepts digits such as "²"
    # that `int()` rejects, and `int()` rejects texts over 4,300 digits. A record whose header
    # is invalid falls back to its timestamp, and its value is checked by the decoder.
    if header is not None and len(header) <= 19 and header.isascii() and header.isdigit():
        return int(header)
    if record.timestamp is not None:
        return int(record.timestamp.timestamp() * 1_000_000)
    return 0


def _position(letter: DeadLetter) -> tuple[str, int, int]:
    return (letter.topic, letter.partition, letter.offset)


def _dead_letter_record(
    letter: DeadLetter, raw: Any, parked_at: str
) -> tuple[str, bytes | None, bytes, KafkaHeaders]:
    """Build the dead-letter topic record: original key, value and headers, plus the reason."""
    if raw is not None:
        key: bytes | None = raw.key
        value: bytes = raw.value if raw.value is not None else b""
        original: KafkaHeaders = [(name, data or b"") for name, data in raw.headers or ()]
    else:
        key = letter.key.encode("utf-8") if letter.key is not None else None
        value = letter.value
        original = [(name, data.encode("utf-8")) for name, data in letter.headers.items()]
    reason = letter.reason[:_DEAD_LETTER_REASON_CHARS]
    added = {
        HEADER_DLQ_REASON: reason,
        HEADER_DLQ_ERROR_TYPE: letter.error_type,
        HEADER_DLQ_HANDLER: letter.handler,
        HEADER_DLQ_ATTEMPTS: str(letter.attempts),
        HEADER_DLQ_GROUP_ID: letter.group_id,
        HEADER_DLQ_TOPIC: letter.topic,
        HEADER_DLQ_PARTITION: str(letter.partition),
        HEADER_DLQ_OFFSET: str(letter.offset),
        HEADER_DLQ_PARKED_AT: parked_at,
    }
    # Headers of an earlier parking would contradict the new ones.
    headers = [(name, data) for name, data in original if not name.startswith(_DLQ_PREFIX)]
    headers += [(name, text.encode("utf-8")) for name, text in added.items()]
    return (DEAD_LETTER_TOPIC, key, value, headers)


def _truncated(
    record: tuple[str, bytes | None, bytes, KafkaHeaders],
) -> tuple[str, bytes | None, bytes, KafkaHeaders]:
    """Return the dead-letter record cut to fit the topic: value, key and original headers.

    Each part that is cut gets a header with its original size, or count for the headers.
    The reason headers are kept, and the store keeps the whole record.
    """
    topic, key, value, headers = record
    added = [(HEADER_DLQ_VALUE_TRUNCATED, str(len(value)).encode())]
    if key is not None and len(key) > _TRUNCATED_KEY_BYTES:
        added.append((HEADER_DLQ_KEY_TRUNCATED, str(len(key)).encode()))
        key = key[:_TRUNCATED_KEY_BYTES]
    reasons = [(name, data) for name, data in headers if name.startswith(_DLQ_PREFIX)]
    original = [(name, data) for name, data in headers if not name.startswith(_DLQ_PREFIX)]
    if sum(len(name) + len(data) for name, data in original) > _TRUNCATED_HEADERS_BYTES:
        added.append((HEADER_DLQ_HEADERS_DROPPED, str(len(original)).encode()))
        original = []
    return (topic, key, value[:_TRUNCATED_VALUE_BYTES], [*original, *reasons, *added])


async def _caught_up(
    consumer: AIOKafkaConsumer, targets: Mapping[TopicPartition, int], owned: set[TopicPartition]
) -> bool:
    """Return whether the consumer's position in each owned partition has reached its target."""
    for tp, end in targets.items():
        if tp in owned and await consumer.position(tp) < end:
            return False
    return True


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


async def _close_within(closing: Any, seconds: float, what: str, group_id: str) -> None:
    """Await a client's stop() for at most `seconds`; log instead of raising."""
    try:
        await asyncio.wait_for(closing, max(seconds, 0.001))
    except TimeoutError:
        logger.warning(
            "kafka_client_close_timed_out",
            group_id=group_id,
            client=what,
            waited_seconds=round(seconds, 3),
            next_step="connections are dropped without leaving the group; the broker "
            "removes this member after its session timeout",
        )
    except (KafkaError, OSError) as error:
        logger.warning(
            "kafka_client_close_failed", group_id=group_id, client=what, error=describe(error)
        )
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        # aiokafka 0.14's consumer stop() re-raises the CancelledError of fetch tasks it
        # cancels itself, which happens while the broker is unreachable.
        logger.warning(
            "kafka_client_close_failed",
            group_id=group_id,
            client=what,
            error="CancelledError raised by the client while closing",
        )


__all__ = [
    "HEADER_DLQ_ATTEMPTS",
    "HEADER_DLQ_ERROR_TYPE",
    "HEADER_DLQ_HEADERS_DROPPED",
    "HEADER_DLQ_GROUP_ID",
    "HEADER_DLQ_HANDLER",
    "HEADER_DLQ_KEY_TRUNCATED",
    "HEADER_DLQ_OFFSET",
    "HEADER_DLQ_PARKED_AT",
    "HEADER_DLQ_PARTITION",
    "HEADER_DLQ_REASON",
    "HEADER_DLQ_TOPIC",
    "HEADER_DLQ_VALUE_TRUNCATED",
    "KafkaEventConsumer",
]
