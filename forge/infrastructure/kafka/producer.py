"""Kafka producer of Forge events.

Each event goes to the topic of its type (`forge.<type value>`), keyed by its resource id so
that one resource's events land in one partition and stay in order. The value is the codec's
JSON and the headers carry the event id, type, schema version and correlation id.

Delivery guarantees, with the settings chosen in `KafkaEventProducer.__init__`:

- `publish` and `publish_batch` return only after the broker acknowledged every event
  (`acks="all"`); otherwise they raise, naming the events that were not acknowledged.
- The producer is idempotent, so its internal retries neither duplicate nor reorder events
  within a partition. A caller that retries after an error may still write an event twice,
  because an acknowledgement can be lost after the write. Consumers get at-least-once delivery.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    UnknownProducerId,
)
from aiokafka.partitioner import DefaultPartitioner

from forge.config import ForgeSettings
from forge.core.events.codec import encode_value
from forge.exceptions import (
    BatchPublishError,
    BrokerUnavailableError,
    EventValidationError,
    ForgeError,
    NotStartedError,
    PublishError,
)
from forge.infrastructure.kafka.admin import check_topics
from forge.infrastructure.kafka.common import (
    CONNECT_TIMEOUT_SECONDS,
    DEAD_LETTER_TOPIC,
    START_BROKER_FIX,
    KafkaHeaders,
    describe,
    event_kafka_headers,
    event_topics,
    is_retriable,
    start_client,
    to_kafka_headers,
)
from forge.infrastructure.kafka.partitioner import murmur2_many, partition_of_hash
from forge.logging import get_logger
from forge.models.base import uuid_ascii
from forge.models.events import Event, topic_for

logger = get_logger(__name__)

LINGER_MS = 0
"""Wait before sending a partly filled batch. 0 sends at once: sends issued together still
share a request because aiokafka batches what is queued while a request is in flight. In
benchmarks/run (2 cores, loopback broker, 5,000 events/s) 5 ms raised the p50 latency from
about 5 to 13 ms with no gain in throughput."""

MAX_BATCH_BYTES = 256 * 1024
"""Buffer per partition; aiokafka's default of 16 KiB caps throughput with 1 KiB events."""

REQUEST_TIMEOUT_MS = 30_000
"""Maximum wait for an acknowledgement. A publish while the broker is down fails after it."""

_PARTITIONER = DefaultPartitioner()
"""Kafka's default partitioner, as `AIOKafkaProducer.send` uses it; here only for records
without a key, which it spreads at random. Keys go through `partition_of_key`."""

CHUNK_EVENTS = 5_000
"""Largest number of events that `publish_batch` encodes and sends at once. A larger batch goes
in chunks, each acknowledged before the next is sent. In one run on benchmarks/run's mix, a
chunk of 5,000 took 10.8 µs per event. 100,000 events sent at once took 28.6 µs each, because
the garbage collector walked their encoded records again and again, and 10.3 µs in chunks."""

PROBE_TIMEOUT_SECONDS = 5.0
"""Maximum wait of `probe()` for the broker's metadata."""

STOP_TIMEOUT_SECONDS = 10.0
"""Seconds that `stop()` gives aiokafka to send what is queued, before dropping it."""

ACK_GRACE_SECONDS = 5.0
"""Seconds added to `request_timeout_ms` when waiting for acknowledgements, so that aiokafka's
own timeout error comes first when it applies."""

_SEQUENCE_BREAKERS = (
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    InvalidProducerEpoch,
)
"""Broker errors after which the producer's sequence numbers no longer match the broker's."""

_RECORD_OVERHEAD_BYTES = 64 * 1024
"""Room for key, headers and batch framing above `max_event_bytes` in one request."""


class OutgoingRecord(NamedTuple):
    """An event encoded as the Kafka record that carries it."""

    event: Event[Any]
    topic: str
    key: bytes | None
    value: bytes
    headers: KafkaHeaders


def to_record(event: Event[Any], max_bytes: int) -> OutgoingRecord:
    """Encode `event` as its Kafka record; raise `EventTooLargeError` when over `max_bytes`.

    The record carries the value, key and headers that `encode_event` gives, as bytes, built
    without its strings: 2.5 µs per event against 3.4 µs on benchmarks/run's mix.
    """
    return OutgoingRecord(
        event,
        topic_for(event.type),
        uuid_ascii(event.resource_id) if event.resource_id is not None else None,
        encode_value(event, max_bytes),
        event_kafka_headers(event),
    )


class KafkaEventProducer:
    """Publishes events to Kafka with idempotent, fully acknowledged writes.

    Use as `async with KafkaEventProducer() as producer:` or call `start()` and `stop()`.
    """

    TOPIC_PREFIX = "forge"

    def __init__(
        self,
        bootstrap_servers: str | None = None,
        *,
        settings: ForgeSettings | None = None,
        compression_type: str | None = None,
        request_timeout_ms: int = REQUEST_TIMEOUT_MS,
        check_topics_on_start: bool = True,
    ) -> None:
        """Configure the producer; nothing connects before `start()`.

        Args:
            bootstrap_servers: overrides `settings.kafka_bootstrap_servers`.
            compression_type: None, "gzip", "snappy", "lz4" or "zstd". Compression costs CPU
                and pays off for large or repetitive events.
            request_timeout_ms: maximum wait for an acknowledgement before a publish fails.
            check_topics_on_start: check at `start()` that every event topic and the
                dead-letter topic exist, so that a missing topic is reported at once.
        """
        self._settings = settings or ForgeSettings()
        self._bootstrap_servers = bootstrap_servers or self._settings.kafka_bootstrap_servers
        self._compression_type = compression_type
        self._request_timeout_ms = request_timeout_ms
        self._check_topics_on_start = check_topics_on_start
        self._max_event_bytes = self._settings.max_event_bytes
        self._producer: AIOKafkaProducer | None = None
        self._start_lock = asyncio.Lock()

    @property
    def bootstrap_servers(self) -> str:
        return self._bootstrap_servers

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def __aenter__(self) -> KafkaEventProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect to the broker; calling it again, even concurrently, starts one client.

        Raises:
            BrokerUnavailableError: no broker responded within the connect timeout.
            MissingTopicsError: event topics are missing and the broker does not create them.
        """
        async with self._start_lock:
            if self._producer is not None:
                return
            producer = self._new_client()
            try:
                await start_client(
                    producer.start(),
                    self._bootstrap_servers,
                    "Kafka producer",
                    CONNECT_TIMEOUT_SECONDS,
                )
                if self._check_topics_on_start:
                    await check_topics(
                        self._settings_for_admin(), [*event_topics(), DEAD_LETTER_TOPIC]
                    )
            except BaseException:
                await producer.stop()
                raise
            self._producer = producer
            logger.info("kafka_producer_started", bootstrap_servers=self._bootstrap_servers)

    async def stop(self) -> None:
        """Send what is buffered, then close the connection; calling it again does nothing."""
        async with self._start_lock:
            producer, self._producer = self._producer, None
            if producer is None:
                return
            await _stop_client(producer, self._bootstrap_servers)
            logger.info("kafka_producer_stopped", bootstrap_servers=self._bootstrap_servers)

    async def publish(self, event: Event[Any]) -> None:
        """Return once the broker acknowledged the event.

        Raises:
            EventValidationError: the event is invalid, for example `EventTooLargeError` when
                it is over `max_event_bytes`; retrying cannot help. Nothing was sent.
            BatchPublishError: the broker did not acknowledge the event; `failed` maps its id
                to the cause. It is a `PublishError`, retriable when the cause is.
            NotStartedError: `start()` was not called, or `stop()` was.
        """
        try:
            await self.publish_batch([event])
        except BatchPublishError as error:
            # As the embedded log does: an invalid event is reported as itself.
            invalid = error.failed.get(event.id)
            if isinstance(invalid, EventValidationError):
                raise invalid from error
            raise

    async def publish_batch(self, events: Sequence[Event[Any]]) -> None:
        """Send the events and return once the broker acknowledged each of them.

        They are sent concurrently, in chunks of `CHUNK_EVENTS`, each chunk acknowledged before
        the next is sent. The batch is not atomic: valid events are sent even when others are
        invalid. After a chunk that the broker failed to acknowledge for a reason that may pass
        (it is down, or timed out), the later chunks are not sent and are reported failed.

        Raises:
            BatchPublishError: some events are invalid or were not acknowledged. `failed` maps
                exactly those event ids to their error, and `acknowledged` counts the others,
                which are durably written.
            NotStartedError: `start()` was not called, or `stop()` was.
        """
        producer = self._require_started()
        if not events:
            return

        failed: dict[Any, BaseException] = {}
        for start in range(0, len(events), CHUNK_EVENTS):
            chunk = events[start : start + CHUNK_EVENTS]
            outgoing: list[OutgoingRecord] = []
            for event in chunk:
                try:
                    outgoing.append(to_record(event, self._max_event_bytes))
                except EventValidationError as error:
                    failed[event.id] = error
            not_sent = await self._send_all(producer, outgoing)
            failed.update(not_sent)
            producer = await self._renew_after(
                producer, [error.__cause__ for error in not_sent.values()]
            )
            cause = next((error for error in not_sent.values() if error.retriable), None)
            if cause is not None:
                # The broker is down or timed out, so each further chunk would wait out the
                # request timeout too. The rest is reported as not sent, to be retried.
                for event in events[start + CHUNK_EVENTS :]:
                    failed[event.id] = _not_sent(event, cause)
                break
        if failed:
            raise _batch_error(events, failed)

    async def probe(self) -> None:
        """Request the broker's metadata, to learn whether the broker responds.

        Raises:
            BrokerUnavailableError: no broker responded within `PROBE_TIMEOUT_SECONDS`.
            NotStartedError: `start()` was not called, or `stop()` was.
        """
        producer = self._require_started()
        try:
            await asyncio.wait_for(producer.client.fetch_all_metadata(), PROBE_TIMEOUT_SECONDS)
        except (KafkaError, TimeoutError) as error:
            reason = describe(error) if isinstance(error, KafkaError) else "timed out"
            raise BrokerUnavailableError(
                f"The Kafka broker at {self._bootstrap_servers} did not respond to a metadata "
                f"request ({reason}). {START_BROKER_FIX}"
            ) from error

    async def append_raw(
        self,
        topic: str,
        value: bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> int:
        """Write a record as given, without validation; return its offset once acknowledged.

        This is for integrations that write foreign records and for tests: consumers park a
        malformed value with the reason.

        Raises:
            PublishError: the broker did not acknowledge the record.
        """
        producer = self._require_started()
        try:
            future = await producer.send(
                topic,
                value=value,
                key=key.encode("utf-8") if key is not None else None,
                headers=to_kafka_headers(headers or {}),
            )
            metadata = await future
        except KafkaError as error:
            raise _publish_error(f"Writing a record to {topic} failed", error) from error
        return int(metadata.offset)

    async def send_records(
        self, records: Sequence[tuple[str, bytes | None, bytes, Sequence[tuple[str, bytes]]]]
    ) -> dict[int, BaseException]:
        """Send (topic, key, value, headers) records concurrently; return errors by position.

        An empty result means the broker acknowledged every record. Used by the consumer to
        write dead letters.
        """
        producer = self._require_started()
        futures: list[tuple[int, asyncio.Future[Any]]] = []
        errors: dict[int, BaseException] = {}
        for position, (topic, key, value, headers) in enumerate(records):
            try:
                futures.append(
                    (position, await producer.send(topic, value=value, key=key, headers=headers))
                )
            except KafkaError as error:
                errors[position] = error
        results = await self._acknowledgements([future for _, future in futures])
        for (position, _), result in zip(futures, results, strict=True):
            if isinstance(result, BaseException):
                errors[position] = result
        await self._renew_after(producer, errors.values())
        return errors

    def _new_client(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self._bootstrap_servers,
            client_id=self._settings.kafka_client_id,
            # Idempotence makes the producer's own retries safe: without it, acks="all" can
            # still duplicate or reorder a batch that is retried after a timeout.
            enable_idempotence=True,
            acks="all",
            linger_ms=LINGER_MS,
            max_batch_size=MAX_BATCH_BYTES,
            max_request_size=self._max_event_bytes + _RECORD_OVERHEAD_BYTES,
            compression_type=self._compression_type,
            request_timeout_ms=self._request_timeout_ms,
        )

    async def _renew_after(
        self, producer: AIOKafkaProducer, errors: Iterable[BaseException | None]
    ) -> AIOKafkaProducer:
        """Replace `producer` with a new client if one of the Kafka `errors` broke its sequence
        numbers.

        After the broker rejects a batch, for example as too large, aiokafka keeps counting
        the batch's sequence numbers, and the broker then rejects every later batch of that
        partition as out of order, until the producer id changes. A new client gets a new id.
        Returns the client to use from now on.
        """
        cause = next((error for error in errors if isinstance(error, _SEQUENCE_BREAKERS)), None)
        if cause is None:
            return producer
        async with self._start_lock:
            if self._producer is not producer:
                # Stopped, or already renewed by a concurrent call.
                return self._require_started()
            renewed = self._new_client()
            try:
                await start_client(
                    renewed.start(),
                    self._bootstrap_servers,
                    "Kafka producer",
                    CONNECT_TIMEOUT_SECONDS,
                )
            except ForgeError as error:
                # This call goes on with the old client. The next publish that fails out of
                # order tries again.
                await renewed.stop()
                logger.warning(
                    "kafka_producer_not_renewed",
                    bootstrap_servers=self._bootstrap_servers,
                    error=str(error),
                    next_step="the next publish that fails out of order tries again",
                )
                return producer
            self._producer = renewed
        logger.warning(
            "kafka_producer_renewed",
            bootstrap_servers=self._bootstrap_servers,
            reason=describe(cause),
            next_step="later batches are sent with a new producer id",
        )
        await _stop_client(producer, self._bootstrap_servers)
        return renewed

    def _require_started(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise NotStartedError(
                "KafkaEventProducer is not started: call `await producer.start()` or use it as "
                "`async with KafkaEventProducer() as producer:`."
            )
        return self._producer

    def _settings_for_admin(self) -> ForgeSettings:
        if self._bootstrap_servers == self._settings.kafka_bootstrap_servers:
            return self._settings
        return self._settings.model_copy(
            update={"kafka_bootstrap_servers": self._bootstrap_servers}
        )

    async def _send_all(
        self, producer: AIOKafkaProducer, outgoing: Sequence[OutgoingRecord]
    ) -> dict[Any, PublishError]:
        """Send every record in per-partition batches, then await all acknowledgements together.

        Records are grouped by the partition the default partitioner picks for their key (the
        same murmur2 choice `send()` makes), in their original order, and handed to aiokafka
        as ready-made batches: `send()` per record cost about 19 µs of Python each.
        """
        failed: dict[Any, PublishError] = {}
        by_partition: dict[tuple[str, int], list[OutgoingRecord]] = {}
        # Asked once per topic and call, not per record: each ask is a coroutine and a sort.
        # A topic whose partitions could not be learned is kept with the error, so that its
        # other records fail at once instead of each waiting again.
        partitions_of: dict[str, list[int] | BaseException] = {}
        # aiokafka waits up to request_timeout_ms for each topic it has no metadata for, so
        # the topics of one call share one such wait.
        metadata_deadline = time.monotonic() + self._request_timeout_ms / 1000
        hashes = iter(murmur2_many([item.key for item in outgoing if item.key is not None]))
        for item in outgoing:
            hashed = next(hashes) if item.key is not None else None
            partitions = partitions_of.get(item.topic)
            if partitions is None:
                partitions = await _partitions_until(producer, item.topic, metadata_deadline)
                partitions_of[item.topic] = partitions
            if isinstance(partitions, BaseException):
                # aiokafka's wait for the topic's partitions ends with the same error whether
                # the topic is missing or no broker responded.
                failed[item.event.id] = _publish_error(
                    f"Event {item.event.id} was not sent to {item.topic}, because its "
                    "partitions are unknown: the topic is missing (create it with `forge kafka "
                    "topics ensure`) or the broker is down",
                    partitions,
                )
                continue
            if hashed is None:
                partition = int(_PARTITIONER(None, partitions, partitions))
            else:
                partition = partition_of_hash(hashed, partitions)
            by_partition.setdefault((item.topic, partition), []).append(item)

        pending: list[tuple[list[OutgoingRecord], asyncio.Future[Any]]] = []
        for (topic, partition), items in by_partition.items():
            batch = producer.create_batch()
            members: list[OutgoingRecord] = []
            for item in items:
                key, value, headers = item.key, item.value, item.headers
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    # The batch is full: send it and start the next one with this record.
                    pending.append(
                        (members, await self._send_batch(producer, batch, topic, partition))
                    )
                    batch = producer.create_batch()
                    members = []
                    batch.append(key=key, value=value, timestamp=None, headers=headers)
                members.append(item)
            if members:
                pending.append((members, await self._send_batch(producer, batch, topic, partition)))

        results = await self._acknowledgements([future for _, future in pending])
        for (members, _), result in zip(pending, results, strict=True):
            for item in members:
                if isinstance(result, BaseException):
                    failed[item.event.id] = _publish_error(
                        f"Event {item.event.id} was not acknowledged by {item.topic}", result
                    )
                    logger.error(
                        "event_publish_failed",
                        event_id=str(item.event.id),
                        topic=item.topic,
                        error=describe(result),
                    )
        return failed

    async def _acknowledgements(
        self, futures: list[asyncio.Future[Any]]
    ) -> list[Any | BaseException]:
        """Wait for every future; return each result or exception, in order.

        aiokafka expires a queued batch only when its partition has no known leader, so while
        the broker is down with its leader still known, the futures never complete. After
        `request_timeout_ms` and `ACK_GRACE_SECONDS`, those still waiting get a retriable
        `KafkaTimeoutError`. Their batches stay queued and may still be written later.
        """
        if not futures:
            return []
        timeout = self._request_timeout_ms / 1000 + ACK_GRACE_SECONDS
        _, waiting = await asyncio.wait(futures, timeout=timeout)
        timed_out = KafkaTimeoutError(
            f"no acknowledgement within {timeout:g} s; the broker at {self._bootstrap_servers} "
            "may be down, and the event may still be written once it is back"
        )
        results: list[Any | BaseException] = []
        for future in futures:
            if future in waiting:
                results.append(timed_out)
            elif future.cancelled():
                results.append(asyncio.CancelledError())
            else:
                error = future.exception()
                results.append(error if error is not None else future.result())
        return results

    @staticmethod
    async def _send_batch(
        producer: AIOKafkaProducer, batch: Any, topic: str, partition: int
    ) -> asyncio.Future[Any]:
        try:
            future: asyncio.Future[Any] = await producer.send_batch(
                batch, topic, partition=partition
            )
        except KafkaError as error:
            # Report the failure through the future, like a failed acknowledgement.
            future = asyncio.get_running_loop().create_future()
            future.set_exception(error)
        return future


async def _partitions_until(
    producer: AIOKafkaProducer, topic: str, deadline: float
) -> list[int] | BaseException:
    """Return the sorted partitions of `topic`, or the error if they are unknown at `deadline`."""
    known: set[int] | None = producer.client.cluster.partitions_for_topic(topic)
    if known is not None:
        # A known topic returns without the timeout's task, because every call looks up each
        # of its topics.
        return sorted(known)
    try:
        partitions: set[int] = await asyncio.wait_for(
            producer.partitions_for(topic), max(deadline - time.monotonic(), 0.001)
        )
    except TimeoutError:
        timed_out: BaseException = KafkaTimeoutError(
            f"no metadata for {topic} within the request timeout"
        )
        return timed_out
    except KafkaError as error:
        failure: BaseException = error
        return failure
    return sorted(partitions)


def _publish_error(context: str, error: BaseException) -> PublishError:
    translated = PublishError(f"{context}: {describe(error)}.")
    # A batch rejected as out of order followed a failed batch of its partition. The producer
    # then gets a new id, so sending it again succeeds.
    translated.retriable = is_retriable(error) or isinstance(error, OutOfOrderSequenceNumber)
    translated.__cause__ = error
    return translated


async def _stop_client(producer: AIOKafkaProducer, bootstrap_servers: str) -> None:
    """Stop an aiokafka producer, dropping what it cannot send within `STOP_TIMEOUT_SECONDS`."""
    stopping = asyncio.ensure_future(producer.stop())
    done, _ = await asyncio.wait({stopping}, timeout=STOP_TIMEOUT_SECONDS)
    if not done:
        # aiokafka's stop() waits until every queued batch is sent, forever while the broker
        # is down. Ending its sender task lets it close. The publish calls of those batches
        # fail, or have failed, when their acknowledgement times out.
        logger.warning(
            "kafka_producer_stop_timed_out",
            bootstrap_servers=bootstrap_servers,
            timeout_seconds=STOP_TIMEOUT_SECONDS,
            next_step="unsent batches are dropped; their publish calls raise",
        )
        # NOTE: aiokafka has no public way to abandon queued batches, so this reads its private
        # `_sender` (checked against aiokafka 0.14.0).
        producer._sender.sender_task.cancel()
        await asyncio.wait({stopping})
    try:
        stopping.result()
    except KafkaError as error:
        logger.warning("kafka_producer_stop_failed", error=describe(error))


def _not_sent(event: Event[Any], cause: BaseException) -> PublishError:
    error = PublishError(
        f"Event {event.id} was not sent, because an earlier part of its batch failed: {cause}"
    )
    error.retriable = True
    error.__cause__ = cause
    return error


def _batch_error(
    events: Sequence[Event[Any]], failed: dict[Any, BaseException]
) -> BatchPublishError:
    first_id, first_error = next(iter(failed.items()))
    total = len(events)
    # Counted by position: a batch may hold one event id several times.
    not_published = sum(1 for event in events if event.id in failed)
    if total == 1:
        message = f"Event {first_id} was not published: {first_error}"
    else:
        message = (
            f"{not_published} of {total} events were not published; the other "
            f"{total - not_published} were acknowledged. First failure, event {first_id}: "
            f"{first_error}"
        )
    error = BatchPublishError(message, failed, acknowledged=total - not_published)
    # Retrying helps only when every failure was the broker's, not an invalid event.
    error.retriable = all(getattr(cause, "retriable", False) for cause in failed.values())
    return error


# Process-wide producer ---------------------------------------------------------------------------

_producer: KafkaEventProducer | None = None
_producer_loop: asyncio.AbstractEventLoop | None = None
_singleton_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _singleton_lock() -> asyncio.Lock:
    # One lock per event loop: an asyncio.Lock used from a second loop raises RuntimeError.
    loop = asyncio.get_running_loop()
    lock = _singleton_locks.get(loop)
    if lock is None:
        lock = _singleton_locks[loop] = asyncio.Lock()
    return lock


async def get_event_producer() -> KafkaEventProducer:
    """Return the process-wide producer, started; concurrent first calls start only one.

    Raises:
        BrokerUnavailableError: the broker cannot be reached; the next call tries again.
        MissingTopicsError: event topics are missing and the broker does not create them.
    """
    global _producer, _producer_loop
    async with _singleton_lock():
        loop = asyncio.get_running_loop()
        if _producer is not None and _producer_loop is not loop:
            # A producer's connections belong to the loop that started it; that loop is gone.
            logger.warning("kafka_producer_replaced", reason="started on another event loop")
            _producer = None
        if _producer is None:
            producer = KafkaEventProducer()
            await producer.start()
            _producer, _producer_loop = producer, loop
        return _producer


async def shutdown_event_producer() -> None:
    """Stop the process-wide producer after sending what it buffered; safe to call twice."""
    global _producer, _producer_loop
    async with _singleton_lock():
        producer, _producer, _producer_loop = _producer, None, None
    if producer is not None:
        await producer.stop()


__all__ = [
    "KafkaEventProducer",
    "get_event_producer",
    "shutdown_event_producer",
]
