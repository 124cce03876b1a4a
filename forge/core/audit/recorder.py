"""The audit recorder: a consumer group that writes every event to the audit trail."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from forge.core.audit.store import AuditStore
from forge.core.events.ports import EventConsumer
from forge.core.privacy import PersonalDataProtector
from forge.logging import get_logger
from forge.models.events import Event, EventType

logger = get_logger(__name__)

AUDIT_GROUP_ID = "forge-audit"


class AuditRecorder:
    """Writes events to an `AuditStore`; recording is idempotent by event id."""

    def __init__(self, store: AuditStore, protector: PersonalDataProtector | None = None) -> None:
        self._store = store
        self._protector = protector
        self.recorded = 0

    def attach(self, consumer: EventConsumer) -> None:
        """Register the recorder on `consumer` for every event type."""
        consumer.register_batch_handler(list(EventType), self.record, name="audit-recorder")

    async def record(self, events: Sequence[Event[Any]]) -> None:
        new = await self._store.record(events)
        self.recorded += new
        logger.debug("audit_recorded", received=len(events), new=new)
        if self._protector is not None:
            # The recorder receives every event, so it is where an anonymization takes effect:
            # the user's key is erased once the event itself is safely recorded.
            # One call for the whole batch, because erasing key by key cost a write transaction
            # per anonymized user.
            await self._protector.forget_many(
                [
                    event.resource_id
                    for event in events
                    if event.type is EventType.USER_ANONYMIZED and event.resource_id is not None
                ]
            )
