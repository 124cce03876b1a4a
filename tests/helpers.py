"""Helpers shared by the test suites: bounded waits, recording handlers and sample events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from forge.config import ForgeSettings
from forge.core.events.ports import EventConsumer
from forge.models.events import (
    CapsuleCreatedEvent,
    CapsuleDeletedEvent,
    CapsuleSearchedEvent,
    CapsuleUpdatedEvent,
    ConfigChangedEvent,
    ErrorOccurredEvent,
    Event,
    EventType,
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
    parse_event,
)

WAIT_TIMEOUT_SECONDS = 10.0

MAX_EVENT_BYTES = 64 * 1024
"""Event size limit of the test backends: small, so that oversized events are cheap to build."""


def make_settings(data_dir: Path, **overrides: Any) -> ForgeSettings:
    """Return settings for tests: tiny retry backoffs, three attempts, fast polling."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "consumer_retry_backoff_seconds": 0.01,
        "consumer_retry_backoff_max_seconds": 0.05,
        "consumer_max_attempts": 3,
        "consumer_poll_interval_seconds": 0.02,
        "consumer_stop_timeout_seconds": 5.0,
        "max_event_bytes": MAX_EVENT_BYTES,
    }
    values.update(overrides)
    return ForgeSettings(**values)


async def wait_until(
    condition: Callable[[], bool],
    description: str,
    *,
    seconds: float = WAIT_TIMEOUT_SECONDS,
) -> None:
    """Poll `condition` until it holds; fail the test with `description` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting until {description}")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def running(consumer: EventConsumer) -> AsyncIterator[asyncio.Task[None]]:
    """Start `consumer`, run its loop in a task, and stop it on exit.

    Awaiting the task on exit re-raises any error the loop ended with.
    """
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    try:
        yield task
    finally:
        await consumer.stop()
        await asyncio.wait_for(task, WAIT_TIMEOUT_SECONDS)


class Recorder:
    """A handler that keeps every event it handles, in order."""

    def __init__(self) -> None:
        self.events: list[Event[Any]] = []

    async def __call__(self, event: Event[Any]) -> None:
        self.events.append(event)

    @property
    def ids(self) -> list[UUID]:
        return [event.id for event in self.events]


class BatchRecorder:
    """A batch handler that keeps every batch it handles."""

    def __init__(self) -> None:
        self.batches: list[list[Event[Any]]] = []

    async def __call__(self, events: Sequence[Event[Any]]) -> None:
        self.batches.append(list(events))

    @property
    def ids(self) -> list[UUID]:
        return [event.id for batch in self.batches for event in batch]


def failing_handler(
    error: Exception, *, fail_for: Callable[[Event[Any]], bool] = lambda event: True
) -> tuple[Callable[[Event[Any]], Awaitable[None]], list[Event[Any]]]:
    """Return a handler that raises `error` for events matching `fail_for`, and its call log."""
    calls: list[Event[Any]] = []

    async def handle(event: Event[Any]) -> None:
        calls.append(event)
        if fail_for(event):
            raise error

    return handle, calls


def at(event: Event[Any], moment: datetime) -> Event[Any]:
    """Return `event` with its timestamp set to `moment`, validated like a parsed event."""
    return parse_event({**event.to_dict(), "timestamp": moment.isoformat()})


def capsule_created(capsule_id: UUID | None = None, **data: Any) -> CapsuleCreatedEvent:
    return CapsuleCreatedEvent.create(
        capsule_id=capsule_id or uuid4(),
        owner_id=uuid4(),
        capsule_type="knowledge",
        title=data.pop("title", "Consumer groups"),
        content=data.pop("content", "Each group keeps its own position."),
        **data,
    )


def capsule_updated(capsule_id: UUID, old_version: int, title: str) -> CapsuleUpdatedEvent:
    return CapsuleUpdatedEvent.create(
        capsule_id=capsule_id,
        actor_id=uuid4(),
        old_version=str(old_version),
        new_version=str(old_version + 1),
        fields_changed=["title"],
        changes={"title": title},
    )


def vote_cast(decision: str = "for", weight: float = 1.0) -> VoteCastEvent:
    return VoteCastEvent.create(
        vote_id=uuid4(), proposal_id=uuid4(), voter_id=uuid4(), decision=decision, weight=weight
    )


SAMPLE_EVENTS: dict[EventType, Callable[[], Event[Any]]] = {
    EventType.CAPSULE_CREATED: lambda: CapsuleCreatedEvent.create(
        capsule_id=uuid4(),
        owner_id=uuid4(),
        capsule_type="knowledge",
        parent_id=uuid4(),
        title="Rust ownership",
        content="Each value has one owner; borrows end before the owner drops.",
        metadata={"source": "api", "request_id": "req-8841"},
    ),
    EventType.CAPSULE_UPDATED: lambda: CapsuleUpdatedEvent.create(
        capsule_id=uuid4(),
        actor_id=uuid4(),
        old_version="1",
        new_version="2",
        fields_changed=["content", "title"],
        changes={"title": "Rust ownership and borrowing", "content": "Borrows are scoped."},
    ),
    EventType.CAPSULE_DELETED: lambda: CapsuleDeletedEvent.create(
        capsule_id=uuid4(), actor_id=uuid4(), version="3", reason="duplicate of another capsule"
    ),
    EventType.CAPSULE_SEARCHED: lambda: CapsuleSearchedEvent.create(
        actor_id=uuid4(),
        query="event sourcing",
        result_count=12,
        filters={"capsule_type": "knowledge", "tags": ["kafka", "sqlite"]},
    ),
    EventType.USER_REGISTERED: lambda: UserRegisteredEvent.create(
        user_id=uuid4(), username="ada", trust_level="trusted"
    ),
    EventType.USER_AUTHENTICATED: lambda: UserAuthenticatedEvent.create(
        user_id=uuid4(), ip_address="192.0.2.10", user_agent="Mozilla/5.0", method="passkey"
    ),
    EventType.USER_LOGOUT: lambda: UserLogoutEvent.create(user_id=uuid4(), session_id=uuid4()),
    EventType.USER_TRUST_CHANGED: lambda: UserTrustChangedEvent.create(
        user_id=uuid4(),
        actor_id=uuid4(),
        old_trust="standard",
        new_trust="trusted",
        reason="90 days without a moderation incident",
    ),
    EventType.USER_ANONYMIZED: lambda: UserAnonymizedEvent.create(
        user_id=uuid4(), reason="erasure request"
    ),
    EventType.PROPOSAL_CREATED: lambda: ProposalCreatedEvent.create(
        proposal_id=uuid4(),
        proposer_id=uuid4(),
        proposal_type="policy",
        title="Raise the quorum to 30%",
    ),
    EventType.PROPOSAL_ACTIVATED: lambda: ProposalActivatedEvent.create(
        proposal_id=uuid4(),
        actor_id=uuid4(),
        voting_starts_at=datetime(2025, 3, 1, 9, tzinfo=UTC),
        voting_ends_at=datetime(2025, 3, 8, 9, tzinfo=UTC),
    ),
    EventType.PROPOSAL_CLOSED: lambda: ProposalClosedEvent.create(
        proposal_id=uuid4(), outcome="passed", votes_for=12.5, votes_against=3.0, votes_abstain=1.0
    ),
    EventType.PROPOSAL_EXECUTED: lambda: ProposalExecutedEvent.create(
        proposal_id=uuid4(), success=True, details="quorum set to 0.3"
    ),
    EventType.VOTE_CAST: lambda: vote_cast("for", 2.5),
    EventType.VOTE_UPDATED: lambda: VoteUpdatedEvent.create(
        vote_id=uuid4(),
        proposal_id=uuid4(),
        voter_id=uuid4(),
        old_decision="for",
        new_decision="against",
        weight=2.5,
    ),
    EventType.OVERLAY_REGISTERED: lambda: OverlayRegisteredEvent.create(
        overlay_id=uuid4(),
        overlay_name="summarizer",
        version="1.4.0",
        capabilities=["summarize", "translate"],
    ),
    EventType.OVERLAY_ACTIVATED: lambda: OverlayActivatedEvent.create(
        overlay_id=uuid4(), overlay_name="summarizer", actor_id=uuid4()
    ),
    EventType.OVERLAY_INVOKED: lambda: OverlayInvokedEvent.create(
        overlay_id=uuid4(),
        overlay_name="summarizer",
        operation="summarize",
        duration_ms=41.7,
        success=True,
    ),
    EventType.OVERLAY_QUARANTINED: lambda: OverlayQuarantinedEvent.create(
        overlay_id=uuid4(),
        overlay_name="summarizer",
        reason="5 crashes within one minute",
        failure_count=5,
    ),
    EventType.IMMUNE_RESPONSE: lambda: ImmuneResponseEvent.create(
        target_type="overlay",
        target_id=uuid4(),
        threat_type="resource_exhaustion",
        threat_level="high",
        action_taken="quarantine",
        reason="resident memory over 2 GiB",
    ),
    EventType.CONFIG_CHANGED: lambda: ConfigChangedEvent.create(
        key="governance.quorum",
        old_value={"ratio": 0.2, "applies_to": ["policy"]},
        new_value={"ratio": 0.3, "applies_to": ["policy", "budget"]},
        actor_id=uuid4(),
    ),
    EventType.ERROR_OCCURRED: lambda: ErrorOccurredEvent.create(
        error_type="TimeoutError",
        message="search index did not answer within 5 s",
        component="search",
        severity="warning",
    ),
}
"""A realistic event of every type, built with its class's `create` factory."""
