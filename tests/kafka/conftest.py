"""Fixtures of the Kafka suite: a real broker, its topics, and a fresh consumer group per test.

The broker must be running (`scripts/kafka-broker start`); the suite fails, never skips, when it
does not respond. Topics are shared by all tests, so every test uses new consumer groups whose
committed offsets start at the end of the topics: earlier records, of this run or of earlier
runs, never reach them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from forge.config import ForgeSettings
from forge.core.events.ports import LogRecord
from forge.exceptions import BrokerUnavailableError
from forge.infrastructure.kafka.admin import ensure_topics, partition_counts
from forge.infrastructure.kafka.common import DEAD_LETTER_TOPIC
from forge.infrastructure.kafka.reader import KafkaEventLogReader
from tests.helpers import make_settings
from tests.processes import ENVIRONMENT_AT_START

# Read at import, before the root conftest removes FORGE_* variables for each test.
BOOTSTRAP_SERVERS = os.environ.get("FORGE_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
REPOSITORY = Path(__file__).resolve().parents[2]
BROKER_SCRIPT = REPOSITORY / "scripts" / "kafka-broker"
BROKER_START_TIMEOUT_SECONDS = 120.0


def kafka_settings(data_dir: Path, **overrides: Any) -> ForgeSettings:
    """Return test settings for the suite's broker: tiny backoffs, three attempts."""
    values: dict[str, Any] = {"kafka_bootstrap_servers": BOOTSTRAP_SERVERS}
    values.update(overrides)
    return make_settings(data_dir, **values)


@pytest.fixture(scope="session")
def kafka_broker() -> str:
    """Check once that the broker responds and that Forge's topics exist; return its address."""
    settings = ForgeSettings(kafka_bootstrap_servers=BOOTSTRAP_SERVERS)
    try:
        asyncio.run(ensure_topics(settings))
    except BrokerUnavailableError as error:
        pytest.fail(
            f"The Kafka tests need a running broker, then run them again. {error}",
            pytrace=False,
        )
    return BOOTSTRAP_SERVERS


@pytest.fixture(autouse=True)
def _needs_broker(kafka_broker: str) -> None:
    """Make every test of the suite depend on the broker check."""


@pytest.fixture
def settings(tmp_path: Path) -> ForgeSettings:
    return kafka_settings(tmp_path / "data")


@pytest.fixture
def group_id(request: pytest.FixtureRequest) -> str:
    """Return a consumer group id used by no other test or run."""
    return f"test-{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"


async def start_group_at_end(settings: ForgeSettings, group_id: str, topics: Sequence[str]) -> None:
    """Commit the current end offsets of `topics` for `group_id`, so it skips older records."""
    partitions = await partition_counts(settings, topics)
    tps = [TopicPartition(topic, p) for topic in topics for p in range(partitions[topic])]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.commit(dict(ends))
    finally:
        await consumer.stop()


async def end_offsets(settings: ForgeSettings, topics: Sequence[str]) -> dict[TopicPartition, int]:
    """Return the next offset of every partition of `topics`."""
    partitions = await partition_counts(settings, topics)
    tps = [TopicPartition(topic, p) for topic in topics for p in range(partitions[topic])]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


async def dead_letters_of(settings: ForgeSettings, group_id: str) -> list[LogRecord]:
    """Return the records of the dead-letter topic parked by `group_id`."""
    reader = KafkaEventLogReader(settings=settings)
    return [
        record
        async for record in reader.read(topics=[DEAD_LETTER_TOPIC])
        if record.headers.get("dlq_group_id") == group_id
    ]


def run_broker_script(*args: str, timeout: float = BROKER_START_TIMEOUT_SECONDS) -> str:
    """Run `scripts/kafka-broker ARGS` and return its output; fail the test if it fails."""
    completed = subprocess.run(
        [str(BROKER_SCRIPT), *args],
        env=ENVIRONMENT_AT_START,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if completed.returncode != 0:
        pytest.fail(
            f"scripts/kafka-broker {' '.join(args)} exited with {completed.returncode}:\n"
            f"{completed.stdout}\n{completed.stderr}"
        )
    return completed.stdout


def broker_is_running() -> bool:
    return (
        subprocess.run(
            [str(BROKER_SCRIPT), "status"],
            env=ENVIRONMENT_AT_START,
            capture_output=True,
            timeout=30,
            check=False,
        ).returncode
        == 0
    )


@pytest.fixture
def broker_restored() -> Iterator[None]:
    """Start the broker again after a test that stopped it, whatever the test's outcome."""
    yield
    if not broker_is_running():
        run_broker_script("start")


_UNREADABLE_RECORD_WRITER = """
import asyncio, sys
from aiokafka import AIOKafkaProducer

class NotUtf8(str):
    def encode(self, *args, **kwargs):
        return b"\\xff\\xfename"

async def main():
    producer = AIOKafkaProducer(bootstrap_servers=sys.argv[1])
    await producer.start()
    try:
        await producer.send_and_wait(
            sys.argv[2], sys.argv[3].encode(), key=sys.argv[4].encode(),
            headers=[(NotUtf8("x"), b"v")],
        )
    finally:
        await producer.stop()

asyncio.run(main())
"""


async def write_unreadable_record(
    settings: ForgeSettings, topic: str, value: bytes, key: str
) -> None:
    """Write a record whose header name is not UTF-8, which aiokafka cannot read back.

    Kafka's Java client cannot write one, but librdkafka can. aiokafka's C extension encodes
    header names itself, so the writer runs in a process with the extension off, where the
    header name's own `encode()` is called.
    """
    writer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _UNREADABLE_RECORD_WRITER,
        settings.kafka_bootstrap_servers,
        topic,
        value.decode(),
        key,
        env={**os.environ, "AIOKAFKA_NO_EXTENSIONS": "1"},
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(writer.communicate(), 60)
    assert writer.returncode == 0, stderr.decode()
