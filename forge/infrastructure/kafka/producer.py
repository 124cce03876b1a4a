"""Kafka producer of Forge events.

Each event goes to the topic of its type (`forge.<type value>`), keyed by its resource id so
that one resource's events land in one partition and stay in order. The value is the codec's
JSON and the headers carry the event id, type, schema version and correlation id.

Delivery guarantees, with the settings chosen in `KafkaEventProducer._client_config`:

- `publish` and `publish_batch` return only after the broker acknowledged every event
  (`acks=all`); otherwise they raise, naming the events that were not acknowledged.
- The producer is idempotent, so its internal retries neither duplicate nor reorder events
  within a partition. A caller that retries after an error may still write an event twice,
  because an acknowledgement can be lost after the write. Consumers get at-least-once delivery.

The client is confluent-kafka, which wraps librdkafka. aiokafka, which the consumer uses,
builds each record batch and computes each key's partition in Python on the event loop. With
it, publishing cost about 30 µs of the loop's time per event and stayed near 35,000 events/s
however many callers published at once. librdkafka does that work in C on its own threads,
and picks the same partition for a key as aiokafka and the Java client do (murmur2).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError as ClientError
from confluent_kafka import KafkaException, Producer

from forge.config import ForgeSettings
from forge.core.events.codec import encode_event
from forge.exceptions import (
    BatchPublishError,
    BrokerUnavailableError,
    EventValidationError,
    NotStartedError,
    PublishError,
)
from forge.infrastructure.kafka.admin import check_topics
from forge.infrastructure.kafka.common import (
    CONNECT_TIMEOUT_SECONDS,
    DEAD_LETTER_TOPIC,
    START_BROKER_FIX,
    describe,
    event_topics,
    is_retriable,
)
from forge.logging import get_logger
from forge.models.events import Event

logger = get_logger(__name__)

LINGER_MS = 1
"""Wait before sending a partly filled batch. On 2 cores with a loopback broker, 0 sent so many
small requests that a caller publishing batches of 500 got half the throughput of 1 ms. With
aiokafka, 5 ms raised the p50 latency at 5,000 events/s from about 5 to 13 ms."""

REQUEST_TIMEOUT_MS = 30_000
"""Maximum wait for an acknowledgement, retries included. A publish while the broker is down
fails after it."""

STOP_FLUSH_SECONDS = 10.0
"""Maximum wait in `stop()` for buffered records; the ones still unsent then fail."""

_POLL_SECONDS = 0.1
"""Maximum wait of the delivery thread for a report, and so of `stop()` for that thread."""

_QUEUE_FULL_WAIT_SECONDS = 0.005
"""Pause before producing again when librdkafka's local queue is full."""

_RECORD_OVERHEAD_BYTES = 64 * 1024
"""Room for key, headers and batch framing above `max_event_bytes` in one request."""

_RETRIABLE_CODES = frozenset(
    {
        ClientError._MSG_TIMED_OUT,
        ClientError._TIMED_OUT,
        ClientError._TRANSPORT,
        ClientError._ALL_BROKERS_DOWN,
        ClientError._PURGE_QUEUE,
        ClientError._PURGE_INFLIGHT,
    }
)
"""librdkafka error codes after which the same publish can succeed later. Delivery reports do
not always set the retriable flag for them, so they are listed here."""

_CLIENT_LOGGER = logging.getLogger("forge.kafka.librdkafka")
"""Receives librdkafka's own log lines, which otherwise go to standard error."""


class DeliveryError(Exception):
    """A librdkafka error, for one record or the whole client."""

    def __init__(self, error: ClientError) -> None:
        super().__init__(f"{error.name()}: {error.str()}")
        self.code: int = error.code()
        self.retriable: bool = bool(error.retriable()) or self.code in _RETRIABLE_CODES


class _Acknowledgements:
    """Collects the delivery reports of one call's records.

    librdkafka reports on the delivery thread; the call awaits on the event loop. Reports only
    append to lists, which needs no lock, and the last one wakes the loop.
    """

    __slots__ = ("_expected", "_future", "_loop", "failures", "offsets")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[None] = loop.create_future()
        self._expected: int | None = None
        self.failures: list[tuple[int, DeliveryError]] = []
        self.offsets: list[tuple[int, int]] = []

    def report(self, position: int, error: ClientError | None, message: Any) -> None:
        """Record the outcome of the record at `position`; runs on librdkafka's thread."""
        if error is None:
            self.offsets.append((position, message.offset()))
        else:
            self.failures.append((position, DeliveryError(error)))
        expected = self._expected
        if expected is not None and len(self.offsets) + len(self.failures) >= expected:
            self._wake()

    async def wait(self, expected: int) -> None:
        """Return once `expected` records are reported, counting failures to produce."""
        self._expected = expected
        if len(self.offsets) + len(self.failures) < expected:
            await self._future

    def _wake(self) -> None:
        # A closed loop raises RuntimeError; no call is waiting on it then.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_resolve, self._future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


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
            request_timeout_ms: maximum wait for an acknowledgement, retries included, before
                a publish fails.
            check_topics_on_start: check at `start()` that every event topic and the
                dead-letter topic exist, so that a missing topic is reported at once.
        """
        self._settings = settings or ForgeSettings()
        self._bootstrap_servers = bootstrap_servers or self._settings.kafka_bootstrap_servers
        self._compression_type = compression_type
        self._request_timeout_ms = request_timeout_ms
        self._check_topics_on_start = check_topics_on_start
        self._max_event_bytes = self._settings.max_event_bytes
        self._client: Producer | None = None
        self._stop_polling = threading.Event()
        self._poller: threading.Thread | None = None
        self._start_lock = asyncio.Lock()

    @property
    def bootstrap_servers(self) -> str:
        return self._bootstrap_servers

    @property
    def started(self) -> bool:
        return self._client is not None

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
            if self._client is not None:
                return
            client = Producer(self._client_config())
            try:
                await self._check_connection(client)
                if self._check_topics_on_start:
                    await check_topics(
                        self._settings_for_admin(), [*event_topics(), DEAD_LETTER_TOPIC]
                    )
            except BaseException:
                # Nothing was produced; dropping the client closes its connections.
                client.purge()
                raise
            self._stop_polling.clear()
            self._poller = threading.Thread(
                target=_poll_until_set,
                args=(client, self._stop_polling),
                name="forge-kafka-delivery",
                daemon=True,
            )
            self._poller.start()
            self._client = client
            logger.info("kafka_producer_started", bootstrap_servers=self._bootstrap_servers)

    async def stop(self) -> None:
        """Send what is buffered, then close the connection; calling it again does nothing.

        Records still unsent after `STOP_FLUSH_SECONDS` fail, so no caller waits forever.
        """
        async with self._start_lock:
            client, self._client = self._client, None
            if client is None:
                return
            unsent = await asyncio.to_thread(client.flush, STOP_FLUSH_SECONDS)
            if unsent:
                logger.warning("kafka_producer_unsent_at_stop", records=unsent)
                client.purge()
                await asyncio.to_thread(client.flush, STOP_FLUSH_SECONDS)
            self._stop_polling.set()
            if self._poller is not None:
                await asyncio.to_thread(self._poller.join)
                self._poller = None
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
        """Send all events and return once the broker acknowledged each of them.

        The batch is not atomic: valid events are sent even when others are invalid.

        Raises:
            BatchPublishError: some events are invalid or were not acknowledged. `failed` maps
                exactly those event ids to their error, and `acknowledged` counts the others,
                which are durably written.
            NotStartedError: `start()` was not called, or `stop()` was.
        """
        client = self._require_started()
        if not events:
            return

        failed: dict[Any, BaseException] = {}
        sent: list[Event[Any]] = []
        acknowledgements = _Acknowledgements(asyncio.get_running_loop())
        for event in events:
            try:
                encoded = encode_event(event, self._max_event_bytes)
            except EventValidationError as error:
                failed[event.id] = error
                continue
            await self._produce(
                client,
                acknowledgements,
                len(sent),
                encoded.topic,
                encoded.key,
                encoded.value,
                encoded.headers,
            )
            sent.append(event)
        await acknowledgements.wait(len(sent))

        for position, cause in acknowledgements.failures:
            event = sent[position]
            failed[event.id] = _publish_error(
                f"Event {event.id} was not acknowledged by {event.topic}", cause
            )
            logger.error(
                "event_publish_failed",
                event_id=str(event.id),
                topic=event.topic,
                error=describe(cause),
            )
        if failed:
            raise _batch_error(len(events), failed)

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
        client = self._require_started()
        acknowledgements = _Acknowledgements(asyncio.get_running_loop())
        await self._produce(client, acknowledgements, 0, topic, key, value, dict(headers or {}))
        await acknowledgements.wait(1)
        if acknowledgements.failures:
            cause = acknowledgements.failures[0][1]
            raise _publish_error(f"Writing a record to {topic} failed", cause) from cause
        return acknowledgements.offsets[0][1]

    async def send_records(
        self, records: Sequence[tuple[str, bytes | None, bytes, Sequence[tuple[str, bytes]]]]
    ) -> dict[int, BaseException]:
        """Send (topic, key, value, headers) records; return errors by position.

        An empty result means the broker acknowledged every record. Used by the consumer to
        write dead letters.
        """
        client = self._require_started()
        acknowledgements = _Acknowledgements(asyncio.get_running_loop())
        for position, (topic, key, value, headers) in enumerate(records):
            await self._produce(
                client, acknowledgements, position, topic, key, value, list(headers)
            )
        await acknowledgements.wait(len(records))
        return dict(acknowledgements.failures)

    def _require_started(self) -> Producer:
        if self._client is None:
            raise NotStartedError(
                "KafkaEventProducer is not started: call `await producer.start()` or use it as "
                "`async with KafkaEventProducer() as producer:`."
            )
        return self._client

    def _client_config(self) -> dict[str, Any]:
        return {
            "bootstrap.servers": self._bootstrap_servers,
            "client.id": self._settings.kafka_client_id,
            # Idempotence makes the client's own retries safe: without it, acks=all can still
            # duplicate or reorder a batch that is retried after a timeout.
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": LINGER_MS,
            # With Nagle's algorithm a small produce request can wait for the acknowledgement
            # of the previous one; asyncio, and so aiokafka, disables it too.
            "socket.nagle.disable": True,
            "message.max.bytes": self._max_event_bytes + _RECORD_OVERHEAD_BYTES,
            "compression.type": self._compression_type or "none",
            "message.timeout.ms": self._request_timeout_ms,
            "request.timeout.ms": self._request_timeout_ms,
            # Java's default partitioner, which aiokafka uses too: a resource's events keep
            # their partition whichever of these clients wrote them.
            "partitioner": "murmur2_random",
            "logger": _CLIENT_LOGGER,
            "error_cb": _log_client_error,
        }

    async def _check_connection(self, client: Producer) -> None:
        """Fetch the cluster's metadata once, so that `start()` fails when no broker responds."""
        try:
            await asyncio.to_thread(client.list_topics, timeout=CONNECT_TIMEOUT_SECONDS)
        except KafkaException as error:
            cause = DeliveryError(error.args[0])
            raise BrokerUnavailableError(
                f"The Kafka producer cannot reach the Kafka broker at {self._bootstrap_servers} "
                f"({cause}). {START_BROKER_FIX}"
            ) from cause

    async def _produce(
        self,
        client: Producer,
        acknowledgements: _Acknowledgements,
        position: int,
        topic: str,
        key: str | bytes | None,
        value: bytes,
        headers: Any,
    ) -> None:
        """Queue one record, waiting while librdkafka's local queue is full.

        A record librdkafka refuses at once is reported as failed, like a failed delivery.
        """
        report = functools.partial(acknowledgements.report, position)
        while True:
            try:
                client.produce(topic, value, key, headers=headers, on_delivery=report)
                return
            except BufferError:
                await asyncio.sleep(_QUEUE_FULL_WAIT_SECONDS)
            except KafkaException as error:
                acknowledgements.failures.append((position, DeliveryError(error.args[0])))
                return

    def _settings_for_admin(self) -> ForgeSettings:
        if self._bootstrap_servers == self._settings.kafka_bootstrap_servers:
            return self._settings
        return self._settings.model_copy(
            update={"kafka_bootstrap_servers": self._bootstrap_servers}
        )


def _poll_until_set(client: Producer, stop: threading.Event) -> None:
    """Serve librdkafka's delivery reports until `stop` is set; runs on its own thread."""
    while not stop.is_set():
        try:
            client.poll(_POLL_SECONDS)
        except Exception:  # a report callback failed; the others must still be served
            logger.exception("kafka_delivery_report_failed")


def _log_client_error(error: ClientError) -> None:
    logger.warning(
        "kafka_client_error", error=f"{error.name()}: {error.str()}", fatal=error.fatal()
    )


def _publish_error(context: str, error: BaseException) -> PublishError:
    translated = PublishError(f"{context}: {describe(error)}.")
    translated.retriable = is_retriable(error)
    translated.__cause__ = error
    return translated


def _batch_error(total: int, failed: dict[Any, BaseException]) -> BatchPublishError:
    first_id, first_error = next(iter(failed.items()))
    if total == 1:
        message = f"Event {first_id} was not published: {first_error}"
    else:
        message = (
            f"{len(failed)} of {total} events were not published; the other "
            f"{total - len(failed)} were acknowledged. First failure, event {first_id}: "
            f"{first_error}"
        )
    error = BatchPublishError(message, failed, acknowledged=total - len(failed))
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
