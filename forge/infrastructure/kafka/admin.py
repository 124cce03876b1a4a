"""Creation and checking of Forge's Kafka topics.

Forge uses one topic per event type (`forge.<type value>`) and the dead-letter topic
`forge.dead-letter`. `ensure_topics` creates the missing ones with the configured partitions and
replication factor. Producers and consumers call `check_topics` at start-up, so that a missing
topic is reported with the fix instead of a client waiting on metadata that never comes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from forge.config import ForgeSettings
from forge.exceptions import BrokerUnavailableError, ConfigurationError
from forge.infrastructure.kafka.common import (
    CONNECT_TIMEOUT_SECONDS,
    DEAD_LETTER_TOPIC,
    describe,
    event_topics,
    start_client,
)
from forge.logging import get_logger

logger = get_logger(__name__)

_ADMIN_REQUEST_TIMEOUT_MS = 15_000
_VISIBLE_TIMEOUT_SECONDS = 10.0
_ENSURE_TOPICS_FIX = "Run `forge kafka topics ensure` to create them."


class MissingTopicsError(ConfigurationError):
    """Topics Forge needs do not exist and the broker does not create topics on demand."""

    def __init__(self, message: str, missing: Sequence[str]) -> None:
        super().__init__(message)
        self.missing = tuple(missing)


@dataclass(frozen=True, slots=True)
class TopicReport:
    """Outcome of `ensure_topics`: topics created, topics already there, partition mismatches."""

    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    partition_mismatches: dict[str, int] = field(default_factory=dict)
    """Existing topics whose partition count differs from the setting, with their count."""


def forge_topics() -> list[str]:
    """Return every topic Forge uses: one per event type, then the dead-letter topic."""
    return [*event_topics(), DEAD_LETTER_TOPIC]


@asynccontextmanager
async def admin_client(settings: ForgeSettings) -> AsyncIterator[AIOKafkaAdminClient]:
    """Yield a started admin client for `settings.kafka_bootstrap_servers`, closed on exit.

    Raises:
        BrokerUnavailableError: the broker did not respond within the connect timeout.
    """
    client = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=f"{settings.kafka_client_id}-admin",
        request_timeout_ms=_ADMIN_REQUEST_TIMEOUT_MS,
    )
    try:
        await start_client(
            client.start(),
            settings.kafka_bootstrap_servers,
            "Kafka admin client",
            CONNECT_TIMEOUT_SECONDS,
        )
        yield client
    finally:
        await client.close()


async def ensure_topics(
    settings: ForgeSettings | None = None, topics: Sequence[str] | None = None
) -> TopicReport:
    """Create Forge's topics that are missing; existing topics are left as they are.

    Creates `topics`, or every event topic and the dead-letter topic when None, with
    `kafka_topic_partitions` partitions and `kafka_replication_factor` replicas. Safe to run
    again and concurrently: a topic created meanwhile by someone else counts as existing.

    Raises:
        BrokerUnavailableError: the broker cannot be reached.
        ConfigurationError: the broker rejected a topic, for example because the replication
            factor exceeds the number of brokers. The message names the topic and the reason.
    """
    settings = settings or ForgeSettings()
    requested = sorted(set(topics if topics is not None else forge_topics()))
    async with admin_client(settings) as client:
        partitions = await _partition_counts(client, requested)
        missing = [topic for topic in requested if topic not in partitions]
        created: list[str] = []
        if missing:
            created = await _create(client, settings, missing)
            # Metadata reaches every broker a moment after creation. Waiting for it lets
            # callers use the topics at once, and gives the partition count of topics that
            # someone else created meanwhile.
            partitions.update(await _wait_until_visible(client, missing))

    existing = [topic for topic in requested if topic not in created]
    mismatches = {
        topic: count
        for topic, count in partitions.items()
        if topic not in created and count != settings.kafka_topic_partitions
    }
    for topic, count in mismatches.items():
        # Kafka can add partitions but not remove them. Adding them moves keys to other
        # partitions, which breaks per-resource order, so a mismatch is reported, not changed.
        logger.warning(
            "topic_partitions_differ",
            topic=topic,
            partitions=count,
            configured_partitions=settings.kafka_topic_partitions,
        )
    logger.info("topics_ensured", created=len(created), existing=len(existing))
    return TopicReport(created, existing, mismatches)


async def check_topics(
    settings: ForgeSettings | None = None, topics: Sequence[str] | None = None
) -> None:
    """Check that `topics` (every Forge topic when None) exist on the broker.

    A missing topic is accepted, with a warning, when the broker creates topics on demand
    (`auto.create.topics.enable=true`); such topics get the broker's default partition count.

    Raises:
        MissingTopicsError: some topics are missing and the broker does not create them. The
            message lists them and the fix.
        BrokerUnavailableError: the broker cannot be reached.
    """
    settings = settings or ForgeSettings()
    requested = sorted(set(topics if topics is not None else forge_topics()))
    async with admin_client(settings) as client:
        partitions = await _partition_counts(client, requested)
        missing = [topic for topic in requested if topic not in partitions]
        if not missing:
            return
        if await _broker_creates_topics(client):
            logger.warning("topics_missing_auto_create", topics=missing)
            return
    listed = ", ".join(missing[:10]) + (
        f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    )
    raise MissingTopicsError(
        f"{len(missing)} Kafka topic(s) do not exist on {settings.kafka_bootstrap_servers} and "
        f"the broker does not create topics on demand: {listed}. {_ENSURE_TOPICS_FIX}",
        missing,
    )


async def partition_counts(
    settings: ForgeSettings | None = None, topics: Sequence[str] | None = None
) -> dict[str, int]:
    """Return the partition count of each of `topics` (every Forge topic when None) that exists.

    Raises:
        BrokerUnavailableError: the broker cannot be reached.
    """
    settings = settings or ForgeSettings()
    async with admin_client(settings) as client:
        return await _partition_counts(
            client, list(topics if topics is not None else forge_topics())
        )


async def _partition_counts(client: AIOKafkaAdminClient, topics: Sequence[str]) -> dict[str, int]:
    """Return the partition count of each of `topics` that exists."""
    try:
        described: list[dict[str, Any]] = await client.describe_topics(list(topics))
    except KafkaError as error:
        raise BrokerUnavailableError(
            f"Describing topics on the Kafka broker failed: {describe(error)}. Retry once the "
            "broker is healthy."
        ) from error
    return {
        item["topic"]: len(item["partitions"])
        for item in described
        if item["error_code"] == 0 and item["partitions"]
    }


async def _wait_until_visible(client: AIOKafkaAdminClient, topics: Sequence[str]) -> dict[str, int]:
    deadline = time.monotonic() + _VISIBLE_TIMEOUT_SECONDS
    while True:
        partitions = await _partition_counts(client, topics)
        if len(partitions) == len(topics):
            return partitions
        if time.monotonic() > deadline:
            logger.warning(
                "topics_not_visible_yet",
                topics=[topic for topic in topics if topic not in partitions],
                waited_seconds=_VISIBLE_TIMEOUT_SECONDS,
            )
            return partitions
        await asyncio.sleep(0.1)


async def _create(
    client: AIOKafkaAdminClient, settings: ForgeSettings, topics: Sequence[str]
) -> list[str]:
    new_topics = [
        NewTopic(topic, settings.kafka_topic_partitions, settings.kafka_replication_factor)
        for topic in topics
    ]
    try:
        response = await client.create_topics(new_topics, timeout_ms=_ADMIN_REQUEST_TIMEOUT_MS)
    except KafkaError as error:
        raise BrokerUnavailableError(
            f"Creating {len(topics)} topic(s) failed: {describe(error)}. Retry once the broker "
            "is healthy."
        ) from error

    created: list[str] = []
    problems: list[str] = []
    for item in response.to_object()["topic_errors"]:
        topic, code = item["topic"], item["error_code"]
        if code == 0:
            created.append(topic)
            logger.info(
                "topic_created",
                topic=topic,
                partitions=settings.kafka_topic_partitions,
                replication_factor=settings.kafka_replication_factor,
            )
        elif for_code(code) is not TopicAlreadyExistsError:
            problems.append(f"{topic}: {item['error_message'] or for_code(code).__name__}")
    if problems:
        raise ConfigurationError(
            f"The broker rejected {len(problems)} topic(s): {'; '.join(problems)}. Check "
            "FORGE_KAFKA_TOPIC_PARTITIONS and FORGE_KAFKA_REPLICATION_FACTOR against the broker."
        )
    return created


async def _broker_creates_topics(client: AIOKafkaAdminClient) -> bool:
    """Return whether the broker has `auto.create.topics.enable=true`; False when unknown."""
    try:
        cluster = await client.describe_cluster()
        node_id = str(cluster["brokers"][0]["node_id"])
        responses = await client.describe_configs(
            [
                ConfigResource(
                    ConfigResourceType.BROKER,
                    node_id,
                    configs={"auto.create.topics.enable": None},
                )
            ]
        )
        for response in responses:
            for resource in response.to_object()["resources"]:
                for entry in resource["config_entries"]:
                    if entry["config_names"] == "auto.create.topics.enable":
                        return bool(entry["config_value"] == "true")
    except (KafkaError, LookupError) as error:
        logger.warning("broker_config_unknown", error=describe(error))
    return False


__all__ = [
    "DEAD_LETTER_TOPIC",
    "MissingTopicsError",
    "TopicReport",
    "admin_client",
    "check_topics",
    "ensure_topics",
    "forge_topics",
    "partition_counts",
]
