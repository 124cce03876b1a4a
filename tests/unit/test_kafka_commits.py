"""The Kafka consumer's commits, one at a time and in order, against a fake aiokafka client."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition

from forge.config import ForgeSettings
from forge.infrastructure.kafka.consumer import KafkaEventConsumer

PARTITION = TopicPartition("forge.capsule.created", 0)


class _SlowClient:
    """A stand-in for AIOKafkaConsumer whose commits take 50 ms each and are logged."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.active = 0
        self.max_active = 0

    def assignment(self) -> set[TopicPartition]:
        return {PARTITION}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.log.append(("start", offsets[PARTITION]))
        await asyncio.sleep(0.05)
        self.log.append(("end", offsets[PARTITION]))
        self.active -= 1


async def test_batch_and_rebalance_commits_in_turn(tmp_path: Any) -> None:
    consumer = KafkaEventConsumer("group", settings=ForgeSettings(data_dir=tmp_path))
    client: Any = _SlowClient()
    consumer._uncommitted[PARTITION] = 10
    await consumer._commit_in_background(client)
    await asyncio.sleep(0)  # the commit task takes its offsets when it first runs
    consumer._uncommitted[PARTITION] = 20

    # The next batch's commit and a rebalance's commit both wait for the one in flight.
    batch = asyncio.create_task(consumer._commit_in_background(client))
    await asyncio.sleep(0.01)
    revoke = asyncio.create_task(consumer._commit(client))
    await asyncio.gather(batch, revoke)
    await consumer._finish_commit(1.0)

    assert client.max_active == 1
    assert client.log == [("start", 10), ("end", 10), ("start", 20), ("end", 20)]
    assert consumer._uncommitted == {}
    assert consumer._commit_task is None
