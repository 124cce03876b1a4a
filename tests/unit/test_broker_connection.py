"""BrokerConnection's health follows the outcome of its publishes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from forge.exceptions import EventValidationError, PublishError
from forge.runtime import BrokerConnection
from tests.helpers import capsule_created


class _Producer:
    """A producer whose next publish raises `error`, or succeeds when it is None."""

    def __init__(self) -> None:
        self.error: Exception | None = None

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
