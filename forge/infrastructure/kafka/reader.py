"""Reader of Kafka topics outside any consumer group, for `forge events tail`.

The reader assigns itself every partition of the requested topics and commits nothing, so it
neither takes partitions from a consumer group nor moves its offsets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from forge.config import ForgeSettings
from forge.core.events.ports import LogRecord
from forge.exceptions import BrokerUnavailableError
from forge.infrastructure.kafka.admin import partition_counts
from forge.infrastructure.kafka.common import (
    CONNECT_TIMEOUT_SECONDS,
    UnreadableRecord,
    describe,
    event_topics,
    find_unreadable,
    start_client,
    to_log_record,
    unreadable_reason,
)
from forge.infrastructure.kafka.consumer import FETCH_TIMEOUT_MS
from forge.logging import get_logger
from forge.models.events import EventType

logger = get_logger(__name__)


class KafkaEventLogReader:
    """Reads records of Forge's event topics without joining a consumer group."""

    def __init__(
        self,
        *,
        settings: ForgeSettings | None = None,
        bootstrap_servers: str | None = None,
        batch_size: int = 500,
    ) -> None:
        settings = settings or ForgeSettings()
        if bootstrap_servers and bootstrap_servers != settings.kafka_bootstrap_servers:
            settings = settings.model_copy(update={"kafka_bootstrap_servers": bootstrap_servers})
        self._settings = settings
        self._bootstrap_servers = settings.kafka_bootstrap_servers
        self._batch_size = batch_size

    async def read(
        self,
        event_types: Sequence[EventType] | None = None,
        *,
        from_beginning: bool = True,
        follow: bool = False,
        topics: Sequence[str] | None = None,
    ) -> AsyncIterator[LogRecord]:
        """Yield records of `event_types` (every event topic when None).

        Records of one partition come in offset order; partitions are interleaved. Without
        `follow`, iteration ends at the end offsets read when it began; with `follow`, it
        waits for new records until the caller stops iterating. `topics` names other topics
        to read, such as the dead-letter topic, instead of event types. Topics that do not
        exist are skipped with a warning.

        Raises:
            BrokerUnavailableError: the broker cannot be reached.
        """
        names = list(topics) if topics is not None else event_topics(event_types)
        counts = await partition_counts(self._settings, names)
        for topic in names:
            if topic not in counts:
                logger.warning(
                    "topic_not_found",
                    topic=topic,
                    next_step="run `forge kafka topics ensure` to create Forge's topics",
                )
        partitions = [
            TopicPartition(topic, partition)
            for topic in names
            for partition in range(counts.get(topic, 0))
        ]
        if not partitions:
            return

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap_servers,
            client_id=f"{self._settings.kafka_client_id}-reader",
            group_id=None,
            enable_auto_commit=False,
            max_partition_fetch_bytes=max(1024 * 1024, self._settings.max_event_bytes + 65536),
        )
        try:
            await start_client(
                consumer.start(), self._bootstrap_servers, "Kafka reader", CONNECT_TIMEOUT_SECONDS
            )
            consumer.assign(partitions)
            if from_beginning:
                await consumer.seek_to_beginning(*partitions)
            else:
                await consumer.seek_to_end(*partitions)
            ends = {} if follow else await consumer.end_offsets(partitions)
            # Offset after the last record yielded, per partition, to rewind to after a record
            # that aiokafka could not read.
            read_to = {tp: await consumer.position(tp) for tp in partitions}

            while True:
                if not follow and await _reached(consumer, ends):
                    return
                try:
                    batches = await consumer.getmany(
                        timeout_ms=FETCH_TIMEOUT_MS, max_records=self._batch_size
                    )
                except KafkaError as error:
                    raise BrokerUnavailableError(
                        f"Reading topics from {self._bootstrap_servers} failed: {describe(error)}."
                    ) from error
                except Exception as error:
                    # A record that aiokafka cannot parse would fail every later fetch too.
                    # aiokafka had already taken records of other partitions in the failed
                    # call and moved their positions past them.
                    for tp, offset in read_to.items():
                        consumer.seek(tp, offset)
                    found = await _skip_unreadable(consumer, error)
                    batches = {found.partition: found.readable}
                    if found.offset is not None:
                        # Past the skipped record, which the position is already.
                        read_to[found.partition] = found.offset + 1
                for tp in sorted(batches):
                    for message in batches[tp]:
                        read_to[tp] = max(read_to[tp], message.offset + 1)
                        if not follow and message.offset >= ends[tp]:
                            continue
                        yield to_log_record(message)
        finally:
            await consumer.stop()


async def _skip_unreadable(consumer: AIOKafkaConsumer, error: Exception) -> UnreadableRecord:
    """Log and skip the record that aiokafka could not read; return it, and the records of
    its partition before it.

    Raises:
        BrokerUnavailableError: a fetch failed, or the record could not be found.
    """
    try:
        found = await find_unreadable(consumer, error, FETCH_TIMEOUT_MS)
    except KafkaError as fetch_error:
        raise BrokerUnavailableError(f"Reading topics failed: {describe(fetch_error)}.") from (
            fetch_error
        )
    if found is None:
        raise BrokerUnavailableError(
            f"Reading topics failed: {describe(error)}. The record could not be found to skip "
            "it; read the topics with another client."
        ) from error
    if found.offset is not None:
        logger.warning(
            "kafka_record_unreadable",
            topic=found.partition.topic,
            partition=found.partition.partition,
            offset=found.offset,
            reason=unreadable_reason(found.partition, found.offset, found.error),
        )
        consumer.seek(found.partition, found.offset + 1)
    return found


async def _reached(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True


__all__ = ["KafkaEventLogReader"]
