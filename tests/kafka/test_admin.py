"""Topic creation and checking against the real broker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from forge.config import ForgeSettings
from forge.exceptions import ConfigurationError
from forge.infrastructure.kafka.admin import (
    MissingTopicsError,
    admin_client,
    check_topics,
    ensure_topics,
    forge_topics,
    partition_counts,
)
from forge.models.events import EventType, topic_for
from tests.kafka.conftest import kafka_settings

pytestmark = pytest.mark.kafka


@pytest.fixture
async def scratch_topics(tmp_path: Path) -> AsyncIterator[list[str]]:
    """Two topic names used by no one else; deleted after the test if they were created."""
    names = [f"forge-test.{uuid.uuid4().hex[:12]}" for _ in range(2)]
    yield names
    async with admin_client(kafka_settings(tmp_path)) as client:
        existing = set(await client.list_topics())
        created = [name for name in names if name in existing]
        if created:
            await client.delete_topics(created)


def test_forge_topics_cover_every_event_type() -> None:
    topics = forge_topics()

    assert len(topics) == len(EventType) + 1
    assert set(topics) == {topic_for(t) for t in EventType} | {"forge.dead-letter"}


async def test_ensure_topics_is_idempotent(tmp_path: Path, scratch_topics: list[str]) -> None:
    settings = kafka_settings(tmp_path, kafka_topic_partitions=2)

    first = await ensure_topics(settings, scratch_topics)
    second = await ensure_topics(settings, scratch_topics)

    assert sorted(first.created) == sorted(scratch_topics)
    assert first.existing == []
    assert second.created == []
    assert sorted(second.existing) == sorted(scratch_topics)
    assert await partition_counts(settings, scratch_topics) == dict.fromkeys(scratch_topics, 2)


async def test_ensure_topics_reports_partition_mismatch(
    tmp_path: Path, scratch_topics: list[str]
) -> None:
    await ensure_topics(kafka_settings(tmp_path, kafka_topic_partitions=1), scratch_topics)

    report = await ensure_topics(kafka_settings(tmp_path, kafka_topic_partitions=3), scratch_topics)

    assert report.partition_mismatches == dict.fromkeys(scratch_topics, 1)


async def test_ensure_topics_rejected_names_topic(
    tmp_path: Path, scratch_topics: list[str]
) -> None:
    settings = kafka_settings(tmp_path, kafka_replication_factor=3)

    with pytest.raises(ConfigurationError) as caught:
        await ensure_topics(settings, scratch_topics[:1])

    assert scratch_topics[0] in str(caught.value)
    assert "FORGE_KAFKA_REPLICATION_FACTOR" in str(caught.value)


async def test_check_topics_lists_missing_and_fix(
    tmp_path: Path, scratch_topics: list[str]
) -> None:
    settings: ForgeSettings = kafka_settings(tmp_path)

    with pytest.raises(MissingTopicsError) as caught:
        await check_topics(settings, [topic_for(EventType.VOTE_CAST), *scratch_topics])

    assert sorted(caught.value.missing) == sorted(scratch_topics)
    message = str(caught.value)
    for name in scratch_topics:
        assert name in message
    assert topic_for(EventType.VOTE_CAST) not in message
    assert message.endswith("Run `forge kafka topics ensure` to create them.")


async def test_check_topics_accepts_forge_topics(tmp_path: Path) -> None:
    await check_topics(kafka_settings(tmp_path))
