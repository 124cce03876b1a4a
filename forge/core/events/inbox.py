"""The inbox: effectively-once effects for handlers, on top of at-least-once delivery.

Consumers deliver every event at least once, so a handler may see the same event again after a
crash, a rebalance or an outbox relay that re-sent it. A handler whose effects live in the same
database as the inbox opts in with `Inbox.claim`, or with the `effectively_once` wrapper. The
event id is then recorded for the consumer group in the same transaction as the handler's own
writes, and a redelivered event is skipped. If the handler raises, its writes and the record
are rolled back together, so the next delivery runs it again.

This covers effects inside that one database only. A handler that calls another system must
make that call idempotent itself, for example by passing the event id along.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar, runtime_checkable

from forge.core.events.ports import EventHandler
from forge.logging import get_logger
from forge.models.events import Event

logger = get_logger(__name__)

TransactionT = TypeVar("TransactionT")
TransactionT_co = TypeVar("TransactionT_co", covariant=True)


@runtime_checkable
class Inbox(Protocol[TransactionT_co]):
    """Records which events each consumer group has handled, in the handler's transaction."""

    def claim(
        self, group_id: str, event: Event[Any]
    ) -> AbstractAsyncContextManager[TransactionT_co | None]:
        """Open a transaction that records `event` as handled by `group_id`.

        Yields the transaction for the handler's writes, or None when the group has already
        handled the event. The record and the writes are committed together when the block
        exits, and both are rolled back if it raises.
        """

    async def is_handled(self, group_id: str, event_id: Any) -> bool: ...


def effectively_once(
    inbox: Inbox[TransactionT],
    group_id: str,
    handler: Callable[[Event[Any], TransactionT], Awaitable[None]],
) -> EventHandler:
    """Wrap `handler(event, transaction)` into an event handler that skips redelivered events.

    The returned handler keeps the wrapped one's name, so dead letters name the same handler.
    """

    @functools.wraps(handler)
    async def handle(event: Event[Any]) -> None:
        async with inbox.claim(group_id, event) as transaction:
            if transaction is None:
                logger.debug(
                    "event_already_handled",
                    group_id=group_id,
                    event_id=str(event.id),
                    event_type=event.type.value,
                )
                return
            await handler(event, transaction)

    return handle
