"""Event service: the one place services publish events through.

Each event type has a typed method (`capsule_created`, `vote_cast`, ...) that builds the event
with its class's `create` factory and publishes it. Events published inside a handler, or inside
`correlation_scope`, get their correlation and causation ids from that context.

Services that change state should not call these methods after their own write: that loses the
event when the process dies in between. They write the state and the event in one transaction
through their store (see `forge.core.capsules.service`); this service is for events that
accompany no state change of their own, and for publishing from handlers and integrations.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar
from uuid import UUID

from forge.core.events.context import stamp
from forge.core.events.ports import EventPublisher
from forge.core.privacy import PersonalDataProtector
from forge.exceptions import (
    EventValidationError,
    FieldProblem,
    NotStartedError,
    PublishError,
    StorageError,
)
from forge.logging import get_logger
from forge.models.events import (
    CapsuleCreatedEvent,
    CapsuleDeletedEvent,
    CapsuleSearchedEvent,
    CapsuleUpdatedEvent,
    ConfigChangedEvent,
    ErrorOccurredEvent,
    Event,
    ImmuneResponseEvent,
    OverlayActivatedEvent,
    OverlayInvokedEvent,
    OverlayQuarantinedEvent,
    OverlayRegisteredEvent,
    ProposalActivatedEvent,
    ProposalClosedEvent,
    ProposalCreatedEvent,
    ProposalExecutedEvent,
    UserAnonymizedEvent,
    UserAuthenticatedEvent,
    UserLogoutEvent,
    UserRegisteredEvent,
    UserTrustChangedEvent,
    VoteCastEvent,
    VoteUpdatedEvent,
)

logger = get_logger(__name__)

EventT = TypeVar("EventT", bound=Event[Any])
PublisherFactory = Callable[[], Awaitable[EventPublisher]]


def _reject_repeated_ids(events: Sequence[Event[Any]]) -> None:
    """Raise `EventValidationError` if two events of a batch have the same id.

    Both would be written, and a batch error, which names failed events by id, could not say
    which of the two failed.
    """
    if len({event.id for event in events}) == len(events):
        return
    seen: set[UUID] = set()
    for event in events:
        if event.id in seen:
            raise EventValidationError(
                f"Event id {event.id} appears twice in the batch; nothing was published. "
                "Give each event its own id (create() does), or publish it once.",
                [FieldProblem("id", event.id, "repeated in the batch")],
            )
        seen.add(event.id)


@contextmanager
def _sealing_errors_as_publish_errors() -> Iterator[None]:
    """Turn a storage error of the subject keys into the `PublishError` that callers catch."""
    try:
        yield
    except StorageError as error:
        failed = PublishError(
            f"The keys that seal the events' personal data could not be read or stored, so "
            f"nothing was published: {error}"
        )
        failed.retriable = error.retriable
        raise failed from error


class EventService:
    """Centralized event publishing with a typed method per event type.

    Give it a started publisher, or a factory that builds and starts one on first use; the
    factory is called once even when the first publishes race.
    """

    def __init__(
        self,
        publisher: EventPublisher | None = None,
        *,
        publisher_factory: PublisherFactory | None = None,
        protector: PersonalDataProtector | None = None,
    ) -> None:
        if publisher is None and publisher_factory is None:
            raise ValueError("EventService needs a publisher or a publisher_factory")
        self._publisher = publisher
        self._factory = publisher_factory
        self._protector = protector
        self._lock = asyncio.Lock()

    async def initialize(self) -> EventPublisher:
        """Build and start the publisher if it is not there yet; safe to call concurrently."""
        if self._publisher is not None:
            return self._publisher
        async with self._lock:
            if self._publisher is None and self._factory is not None:
                self._publisher = await self._factory()
            if self._publisher is None:
                raise NotStartedError("EventService has no publisher; pass one or a factory")
            return self._publisher

    async def publish(self, event: Event[Any]) -> Event[Any]:
        """Publish one event; return it as published: with correlation ids from the context,
        and personal fields sealed when a protector is configured.

        Raises:
            PublishError: the event was not durably accepted, also when the keys that seal its
                personal data could not be read or stored.
            EventValidationError: the event is invalid, for example over the size limit.
        """
        publisher = await self.initialize()
        event = await self._prepare(event)
        await publisher.publish(event)
        return event

    async def publish_many(self, events: Sequence[Event[Any]]) -> list[Event[Any]]:
        """Publish events together; all are accepted or `BatchPublishError` names the failed.

        Raises:
            EventValidationError: two events have the same id; nothing was published.
            PublishError: the keys that seal personal data could not be read or stored;
                nothing was published.
            BatchPublishError: some events were not accepted; it names them.
        """
        publisher = await self.initialize()
        prepared = [stamp(event) for event in events]
        _reject_repeated_ids(prepared)
        if self._protector is not None:
            # One key lookup for the whole batch, because sealing event by event cost a write
            # transaction per event with personal data.
            with _sealing_errors_as_publish_errors():
                prepared = await self._protector.seal_many(prepared)
        await publisher.publish_batch(prepared)
        return prepared

    async def _prepare(self, event: Event[Any]) -> Event[Any]:
        # Personal data is sealed here, before the event reaches any log or broker, so that
        # erasing the subject's key later makes every copy unreadable.
        event = stamp(event)
        if self._protector is not None and event.data.personal_fields():
            with _sealing_errors_as_publish_errors():
                event = await self._protector.seal(event)
        return event

    async def close(self) -> None:
        """Stop the publisher if this service started it."""
        if self._factory is not None and self._publisher is not None:
            await self._publisher.stop()
            self._publisher = None

    async def _emit(self, event: EventT) -> EventT:
        published = await self.publish(event)
        return published  # type: ignore[return-value]

    # Capsule Events ------------------------------------------------------------------------------
    async def capsule_created(
        self,
        capsule_id: UUID,
        owner_id: UUID,
        capsule_type: str,
        parent_id: UUID | None = None,
        correlation_id: UUID | None = None,
        *,
        title: str = "",
        content: str = "",
        version: str = "1",
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> CapsuleCreatedEvent:
        """Publish a `capsule.created` event and return it."""
        return await self._emit(
            CapsuleCreatedEvent.create(
                capsule_id=capsule_id,
                owner_id=owner_id,
                capsule_type=capsule_type,
                parent_id=parent_id,
                correlation_id=correlation_id,
                title=title,
                content=content,
                version=version,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    async def capsule_updated(
        self,
        capsule_id: UUID,
        actor_id: UUID,
        old_version: str,
        new_version: str,
        fields_changed: list[str],
        correlation_id: UUID | None = None,
        *,
        changes: Mapping[str, Any] | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> CapsuleUpdatedEvent:
        """Publish a `capsule.updated` event and return it."""
        return await self._emit(
            CapsuleUpdatedEvent.create(
                capsule_id=capsule_id,
                actor_id=actor_id,
                old_version=old_version,
                new_version=new_version,
                fields_changed=fields_changed,
                correlation_id=correlation_id,
                changes=changes,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    async def capsule_deleted(
        self,
        capsule_id: UUID,
        actor_id: UUID,
        *,
        version: str | None = None,
        reason: str | None = None,
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> CapsuleDeletedEvent:
        """Publish a `capsule.deleted` event and return it."""
        return await self._emit(
            CapsuleDeletedEvent.create(
                capsule_id=capsule_id,
                actor_id=actor_id,
                version=version,
                reason=reason,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    async def capsule_searched(
        self,
        actor_id: UUID | None,
        query: str,
        result_count: int,
        *,
        filters: Mapping[str, Any] | None = None,
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> CapsuleSearchedEvent:
        """Publish a `capsule.searched` event and return it."""
        return await self._emit(
            CapsuleSearchedEvent.create(
                actor_id=actor_id,
                query=query,
                result_count=result_count,
                filters=filters,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    # User Events ---------------------------------------------------------------------------------
    async def user_registered(
        self,
        user_id: UUID,
        username: str,
        *,
        trust_level: str = "standard",
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> UserRegisteredEvent:
        """Publish a `user.registered` event and return it."""
        return await self._emit(
            UserRegisteredEvent.create(
                user_id=user_id,
                username=username,
                trust_level=trust_level,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    async def user_authenticated(
        self,
        user_id: UUID,
        ip_address: str,
        user_agent: str | None = None,
        *,
        method: str = "password",
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> UserAuthenticatedEvent:
        """Publish a `user.authenticated` event and return it."""
        return await self._emit(
            UserAuthenticatedEvent.create(
                user_id=user_id,
                ip_address=ip_address,
                user_agent=user_agent,
                method=method,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    async def user_logout(
        self,
        user_id: UUID,
        *,
        session_id: UUID | None = None,
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> UserLogoutEvent:
        """Publish a `user.logout` event and return it."""
        return await self._emit(
            UserLogoutEvent.create(
                user_id=user_id,
                session_id=session_id,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    async def user_trust_changed(
        self,
        user_id: UUID,
        actor_id: UUID | None,
        old_trust: str,
        new_trust: str,
        reason: str,
        *,
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> UserTrustChangedEvent:
        """Publish a `user.trust_changed` event and return it."""
        return await self._emit(
            UserTrustChangedEvent.create(
                user_id=user_id,
                actor_id=actor_id,
                old_trust=old_trust,
                new_trust=new_trust,
                reason=reason,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    async def user_anonymized(
        self,
        user_id: UUID,
        actor_id: UUID | None = None,
        *,
        reason: str = "user request",
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> UserAnonymizedEvent:
        """Publish a `user.anonymized` event and return it."""
        return await self._emit(
            UserAnonymizedEvent.create(
                user_id=user_id,
                actor_id=actor_id,
                reason=reason,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    # Governance Events ---------------------------------------------------------------------------
    async def proposal_created(
        self,
        proposal_id: UUID,
        proposer_id: UUID,
        proposal_type: str,
        title: str,
        *,
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ProposalCreatedEvent:
        """Publish a `proposal.created` event and return it."""
        return await self._emit(
            ProposalCreatedEvent.create(
                proposal_id=proposal_id,
                proposer_id=proposer_id,
                proposal_type=proposal_type,
                title=title,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    async def proposal_activated(
        self,
        proposal_id: UUID,
        actor_id: UUID | None = None,
        *,
        voting_starts_at: Any = None,
        voting_ends_at: Any = None,
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ProposalActivatedEvent:
        """Publish a `proposal.activated` event and return it."""
        return await self._emit(
            ProposalActivatedEvent.create(
                proposal_id=proposal_id,
                actor_id=actor_id,
                voting_starts_at=voting_starts_at,
                voting_ends_at=voting_ends_at,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    async def proposal_closed(
        self,
        proposal_id: UUID,
        outcome: str,
        *,
        votes_for: float = 0.0,
        votes_against: float = 0.0,
        votes_abstain: float = 0.0,
        actor_id: UUID | None = None,
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ProposalClosedEvent:
        """Publish a `proposal.closed` event and return it."""
        return await self._emit(
            ProposalClosedEvent.create(
                proposal_id=proposal_id,
                outcome=outcome,
                votes_for=votes_for,
                votes_against=votes_against,
                votes_abstain=votes_abstain,
                actor_id=actor_id,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    async def proposal_executed(
        self,
        proposal_id: UUID,
        success: bool,
        *,
        details: str = "",
        actor_id: UUID | None = None,
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ProposalExecutedEvent:
        """Publish a `proposal.executed` event and return it."""
        return await self._emit(
            ProposalExecutedEvent.create(
                proposal_id=proposal_id,
                success=success,
                details=details,
                actor_id=actor_id,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    async def vote_cast(
        self,
        vote_id: UUID,
        proposal_id: UUID,
        voter_id: UUID,
        decision: str,
        weight: float,
        *,
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> VoteCastEvent:
        """Publish a `vote.cast` event and return it."""
        return await self._emit(
            VoteCastEvent.create(
                vote_id=vote_id,
                proposal_id=proposal_id,
                voter_id=voter_id,
                decision=decision,
                weight=weight,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    async def vote_updated(
        self,
        vote_id: UUID,
        proposal_id: UUID,
        voter_id: UUID,
        old_decision: str,
        new_decision: str,
        weight: float,
        *,
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> VoteUpdatedEvent:
        """Publish a `vote.updated` event and return it."""
        return await self._emit(
            VoteUpdatedEvent.create(
                vote_id=vote_id,
                proposal_id=proposal_id,
                voter_id=voter_id,
                old_decision=old_decision,
                new_decision=new_decision,
                weight=weight,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    # Overlay Events ------------------------------------------------------------------------------
    async def overlay_registered(
        self,
        overlay_id: UUID,
        overlay_name: str,
        version: str,
        *,
        capabilities: list[str] | None = None,
        actor_id: UUID | None = None,
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> OverlayRegisteredEvent:
        """Publish a `overlay.registered` event and return it."""
        return await self._emit(
            OverlayRegisteredEvent.create(
                overlay_id=overlay_id,
                overlay_name=overlay_name,
                version=version,
                capabilities=capabilities,
                actor_id=actor_id,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    async def overlay_activated(
        self,
        overlay_id: UUID,
        overlay_name: str,
        *,
        actor_id: UUID | None = None,
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> OverlayActivatedEvent:
        """Publish a `overlay.activated` event and return it."""
        return await self._emit(
            OverlayActivatedEvent.create(
                overlay_id=overlay_id,
                overlay_name=overlay_name,
                actor_id=actor_id,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    async def overlay_invoked(
        self,
        overlay_id: UUID,
        overlay_name: str,
        operation: str,
        duration_ms: float,
        success: bool,
        *,
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> OverlayInvokedEvent:
        """Publish a `overlay.invoked` event and return it."""
        return await self._emit(
            OverlayInvokedEvent.create(
                overlay_id=overlay_id,
                overlay_name=overlay_name,
                operation=operation,
                duration_ms=duration_ms,
                success=success,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    async def overlay_quarantined(
        self,
        overlay_id: UUID,
        overlay_name: str,
        reason: str,
        *,
        failure_count: int = 0,
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> OverlayQuarantinedEvent:
        """Publish a `overlay.quarantined` event and return it."""
        return await self._emit(
            OverlayQuarantinedEvent.create(
                overlay_id=overlay_id,
                overlay_name=overlay_name,
                reason=reason,
                failure_count=failure_count,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    # System Events -------------------------------------------------------------------------------
    async def immune_response(
        self,
        target_type: str,
        target_id: UUID,
        threat_type: str,
        threat_level: str,
        action_taken: str,
        reason: str,
        *,
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ImmuneResponseEvent:
        """Publish a `system.immune_response` event and return it."""
        return await self._emit(
            ImmuneResponseEvent.create(
                target_type=target_type,
                target_id=target_id,
                threat_type=threat_type,
                threat_level=threat_level,
                action_taken=action_taken,
                reason=reason,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    async def config_changed(
        self,
        key: str,
        old_value: Any,
        new_value: Any,
        *,
        actor_id: UUID | None = None,
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ConfigChangedEvent:
        """Publish a `system.config_changed` event and return it."""
        return await self._emit(
            ConfigChangedEvent.create(
                key=key,
                old_value=old_value,
                new_value=new_value,
                actor_id=actor_id,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )

    async def error_occurred(
        self,
        error_type: str,
        message: str,
        component: str,
        *,
        severity: str = "error",
        resource_type: str | None = None,
        resource_id: UUID | None = None,
        correlation_id: UUID | None = None,
        causation_id: UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ErrorOccurredEvent:
        """Publish a `system.error` event and return it."""
        return await self._emit(
            ErrorOccurredEvent.create(
                error_type=error_type,
                message=message,
                component=component,
                severity=severity,
                resource_type=resource_type,
                resource_id=resource_id,
                correlation_id=correlation_id,
                causation_id=causation_id,
                metadata=metadata,
            )
        )


_service: EventService | None = None
_service_lock = threading.Lock()


def get_event_service() -> EventService:
    """Return the process-wide event service, built from `FORGE_*` settings on first use."""
    global _service
    with _service_lock:
        if _service is None:
            _service = EventService(publisher_factory=_start_default_runtime)
        return _service


async def _start_default_runtime() -> EventPublisher:
    """Start a `Runtime` from `FORGE_*` settings for the process-wide service.

    The service takes the runtime's protector too, so that its events are sealed like those of
    every other service. The runtime lives as long as the process.
    """
    from forge.runtime import Runtime

    runtime = Runtime()
    await runtime.start()
    if _service is not None:
        _service._protector = runtime.protector
    return runtime.publisher


def set_event_service(service: EventService | None) -> None:
    """Replace the process-wide event service (the runtime and tests use this)."""
    global _service
    with _service_lock:
        _service = service


__all__ = ["EventService", "NotStartedError", "get_event_service", "set_event_service"]
