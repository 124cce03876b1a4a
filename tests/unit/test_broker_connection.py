"""BrokerConnection's health follows the outcome of its publishes and of its probes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from forge.exceptions import BrokerUnavailableError, EventValidationError, PublishError
from forge.runtime import BrokerConnection
from tests.helpers import capsule_created


class _Producer:
    """A producer whose next publish raises `error`, or succeeds when it is None."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.probe_error: Exception | None = None
        self.probes = 0
        self.probed = asyncio.Event()

    async def probe(self) -> None:
        self.probes += 1
        self.probed.set()
        if self.probe_error is not None:
            raise self.probe_error

    async def stop(self) -> None:
        return None

    async def publish(self, event: Any) -> None:
        await self.publish_batch([event])

    async def publish_batch(self, events: Sequence[Any]) -> None:
        if self.error is not None:
            raise self.error


async def _connection() -> tuple[BrokerConnection, _Producer]:
    producer = _Producer()

    async def connect() -> None:
        return None

    connection = BrokerConnection(producer, connect)
    await connection.start()
    return connection, producer


async def test_broker_failure_reported_until_publish_succeeds() -> None:
    connection, producer = await _connection()
    timeout = PublishError("no acknowledgement within 35 s; the broker may be down")
    timeout.retriable = True
    producer.error = timeout

    with pytest.raises(PublishError):
        await connection.publish_batch([capsule_created()])

    assert connection.connected is False
    assert connection.last_error is not None
    assert "may be down" in connection.last_error

    producer.error = None
    await connection.publish(capsule_created())

    assert connection.connected is True
    assert connection.last_error is None


async def test_invalid_event_keeps_broker_healthy() -> None:
    connection, producer = await _connection()
    producer.error = EventValidationError("Invalid capsule.created event", [])

    with pytest.raises(EventValidationError):
        await connection.publish(capsule_created())

    assert connection.connected is True
    assert connection.last_error is None


async def _wait_for_probes(producer: _Producer, count: int) -> None:
    async with asyncio.timeout(5):
        while producer.probes < count:
            producer.probed.clear()
            await producer.probed.wait()


async def test_failed_probe_reported_until_recovered() -> None:
    producer = _Producer()

    async def connect() -> None:
        return None

    connection = BrokerConnection(
        producer, connect, probe=producer.probe, probe_interval_seconds=0.01
    )
    await connection.start()
    producer.probe_error = BrokerUnavailableError("The Kafka broker did not respond")
    await _wait_for_probes(producer, 2)

    assert connection.connected is False
    assert connection.last_error == "The Kafka broker did not respond"

    producer.probe_error = None
    await _wait_for_probes(producer, producer.probes + 2)

    assert connection.connected is True
    assert connection.last_error is None
    await connection.stop()
