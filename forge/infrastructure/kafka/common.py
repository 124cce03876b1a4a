"""Topic names, header conversion and error translation shared by the Kafka modules."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from forge.core.audit.store import to_microseconds
from forge.core.events.codec import (
    HEADER_CORRELATION_ID,
    HEADER_EVENT_ID,
    HEADER_EVENT_TIME,
    HEADER_EVENT_TYPE,
    HEADER_SCHEMA_VERSION,
)
from forge.core.events.ports import LogRecord
from forge.exceptions import BrokerUnavailableError
from forge.models.base import uuid_ascii
from forge.models.events import TOPIC_PREFIX, Event, EventType, topic_for

DEAD_LETTER_TOPIC = f"{TOPIC_PREFIX}.dead-letter"
"""Topic of records a consumer group could not decode or handle, with the reason in headers."""

CONNECT_TIMEOUT_SECONDS = 10.0
"""Maximum wait for the first connection to the broker before `BrokerUnavailableError`."""

START_BROKER_FIX = (
    "Start the broker (`scripts/kafka-broker start` for a local one), or set "
    "FORGE_KAFKA_BOOTSTRAP_SERVERS to the address of a running broker."
)

KafkaHeaders = list[tuple[str, bytes]]


def event_topics(event_types: Iterable[EventType] | None = None) -> list[str]:
    """Return the topics of `event_types` (all event types when None), sorted."""
    types = EventType if event_types is None else event_types
    return sorted({topic_for(event_type) for event_type in types})


def to_kafka_headers(headers: Mapping[str, str]) -> KafkaHeaders:
    """Convert Forge's string headers to Kafka's (name, bytes) pairs."""
    return [(name, value.encode("utf-8")) for name, value in headers.items()]


_TYPE_BYTES = {event_type: event_type.value.encode() for event_type in EventType}


def event_kafka_headers(event: Event[Any]) -> KafkaHeaders:
    """Return `to_kafka_headers(event_headers(event))`, built without the dict of strings.

    The producer needs them for every event: 0.83 µs against 1.39 µs through the dict, on
    benchmarks/run's mix. A unit test compares both for every event type.
    """
    headers = [
        (HEADER_EVENT_ID, uuid_ascii(event.id)),
        (HEADER_EVENT_TYPE, _TYPE_BYTES[event.type]),
        (HEADER_SCHEMA_VERSION, b"%d" % event.schema_version),
        (HEADER_EVENT_TIME, b"%d" % to_microseconds(event.timestamp)),
    ]
    if event.correlation_id is not None:
        headers.append((HEADER_CORRELATION_ID, uuid_ascii(event.correlation_id)))
    return headers


def from_kafka_headers(headers: Sequence[tuple[str, bytes]] | None) -> dict[str, str]:
    """Convert Kafka headers to strings; the last of repeated names wins.

    Bytes that are not UTF-8 become U+FFFD, so that a faulty producer's header cannot stop the
    record from reaching the decoder, which parks it if the value is broken too.
    """
    if not headers:
        return {}
    try:
        return {name: value.decode("utf-8", "replace") for name, value in headers}
    except AttributeError:
        # A header without a value (None) is rare, so it is handled outside the comprehension.
        return {
            name: value.decode("utf-8", "replace") if value is not None else ""
            for name, value in headers
        }


def is_retriable(error: BaseException) -> bool:
    """Return whether the same Kafka call may succeed later without a change by the caller."""
    if isinstance(error, KafkaTimeoutError | KafkaConnectionError | asyncio.TimeoutError):
        return True
    return bool(getattr(error, "retriable", False))


def describe(error: BaseException) -> str:
    """Return a one-line description of a Kafka error: its class name and message."""
    message = str(error)
    name = type(error).__name__
    if not message:
        return name
    # aiokafka's errors already start their message with the class name.
    return message if message.startswith(name) else f"{name}: {message}"


async def start_client(
    start: Awaitable[Any], bootstrap_servers: str, what: str, timeout: float
) -> None:
    """Await an aiokafka client's `start()`, translating failures to `BrokerUnavailableError`.

    Raises:
        BrokerUnavailableError: no broker responded at `bootstrap_servers` within `timeout`
            seconds. The message names the address and the fix.
    """
    try:
        await asyncio.wait_for(start, timeout)
    except (KafkaError, OSError, TimeoutError) as error:
        reason = (
            f"no response within {timeout:g} s"
            if isinstance(error, TimeoutError)
            else describe(error)
        )
        raise BrokerUnavailableError(
            f"The {what} cannot reach the Kafka broker at {bootstrap_servers} ({reason}). "
            f"{START_BROKER_FIX}"
        ) from error


def to_log_record(message: Any) -> LogRecord:
    """Convert an aiokafka `ConsumerRecord` to a `LogRecord`, leaving the value undecoded."""
    return to_log_records((message,))[0]


def to_log_records(messages: Iterable[Any]) -> list[LogRecord]:
    """Convert aiokafka `ConsumerRecord`s to `LogRecord`s, leaving the values undecoded.

    Records with the same timestamp in milliseconds share one `datetime`, because building it
    took about a third of the 1.4 µs per record, and the records of one producer batch often
    share their millisecond.
    """
    times: dict[int, datetime | None] = {}
    records: list[LogRecord] = []
    for message in messages:
        key: bytes | None = message.key
        value: bytes | None = message.value
        timestamp: int | None = message.timestamp
        when = times.get(timestamp) if timestamp is not None else None
        if when is None and timestamp is not None:
            when = times[timestamp] = _record_time(timestamp)
        # Positional arguments, because with keywords the record took twice as long to build.
        records.append(
            LogRecord(
                message.topic,
                message.partition,
                message.offset,
                key.decode("utf-8", "replace") if key is not None else None,
                # A record without value (a tombstone) is not an event; the decoder parks it.
                value if value is not None else b"",
                from_kafka_headers(message.headers),
                when,
            )
        )
    return records


class UnreadableRecord(NamedTuple):
    """The outcome of `find_unreadable`."""

    partition: TopicPartition
    readable: list[Any]
    """aiokafka records of the partition before the unreadable one, to be handled first."""
    offset: int | None
    """Offset of the unreadable record; None when the partition was read without failure."""
    error: BaseException


async def find_unreadable(
    consumer: Any, error: BaseException, timeout_ms: int
) -> UnreadableRecord | None:
    """Find the record that made aiokafka's `getmany` raise `error`, one that it cannot parse.

    Reads the failing partition one record per fetch up to the failure, so that the position
    is then the unreadable record's offset. The caller handles the records read before it and
    seeks past it. Returns None when `error` does not show the partition.

    Raises:
        KafkaError: a fetch failed.
    """
    tp = _failing_partition(error)
    if tp is None or tp not in consumer.assignment():
        return None
    readable: list[Any] = []
    while True:
        try:
            fetched = await consumer.getmany(tp, timeout_ms=timeout_ms, max_records=1)
        except KafkaError:
            raise
        except Exception as record_error:
            return UnreadableRecord(tp, readable, await consumer.position(tp), record_error)
        if not fetched.get(tp):
            return UnreadableRecord(tp, readable, None, error)
        readable.extend(fetched[tp])


def unreadable_reason(tp: TopicPartition, offset: int, error: BaseException) -> str:
    """Return the dead-letter reason, or log message, for a record that aiokafka cannot read."""
    return (
        f"The Kafka client could not read record {offset} of {tp.topic} partition "
        f"{tp.partition}, or a record before it in the same record batch: {describe(error)}. "
        "It was skipped; read it with another client, such as kafka-console-consumer with "
        "--partition and --offset."
    )


def _failing_partition(error: BaseException) -> TopicPartition | None:
    """Return the partition whose records aiokafka was reading when `error` was raised.

    NOTE: aiokafka does not name the partition in such errors, so this reads the local
    variable `tp` of the innermost frame that has one. aiokafka 0.14's fetcher names the
    partition it unpacks so, and with other versions this may return None.
    """
    found: TopicPartition | None = None
    trace = error.__traceback__
    while trace is not None:
        candidate = trace.tb_frame.f_locals.get("tp")
        if isinstance(candidate, TopicPartition):
            found = candidate
        trace = trace.tb_next
    return found


def _record_time(timestamp: int) -> datetime | None:
    """Return a Kafka timestamp in milliseconds as a UTC datetime, or None when it has none.

    A producer sets the timestamp of its records, so it may be beyond what `datetime` can
    represent.
    """
    if timestamp < 0:
        return None
    try:
        return datetime.fromtimestamp(timestamp / 1000, UTC)
    except (OverflowError, ValueError, OSError):
        return None
