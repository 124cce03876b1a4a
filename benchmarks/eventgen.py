"""Realistic events for the benchmarks: a mix of all 22 event types, about 500 bytes of JSON each.

Every event is built with its class's `create` factory, so it is what a Forge service would
publish. Event ids are random, and everything else comes from a seeded generator. Sign-ins
and sign-outs are by a pool of 1,000 returning users, so that most of them already have the
key that seals their personal data, as in a running system. Every other resource is new.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import orjson

from forge.core.events.codec import event_headers
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
)

_WORDS = (
    "event sourcing replay capsule overlay quorum proposal partition offset consumer group "
    "broker commit snapshot audit trail lineage version schema upcaster handler retry backoff "
    "dead letter idempotent producer ordering resource knowledge governance immune threat "
    "quarantine summarizer translator embedding index search latency throughput"
).split()

_USER_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari",
    "forge-cli/0.1.0 python-httpx/0.27",
)


ACTIVE_USERS = 1_000


class EventGenerator:
    """Builds events of every type in turn, with varied ids, text and metadata."""

    def __init__(self, seed: int = 7) -> None:
        self._random = random.Random(seed)
        self._active_users = [
            UUID(int=self._random.getrandbits(128), version=4) for _ in range(ACTIVE_USERS)
        ]
        self._factories: list[Callable[[], Event[Any]]] = [
            self._capsule_created,
            self._capsule_updated,
            self._capsule_deleted,
            self._capsule_searched,
            self._user_registered,
            self._user_authenticated,
            self._user_logout,
            self._user_trust_changed,
            self._user_anonymized,
            self._proposal_created,
            self._proposal_activated,
            self._proposal_closed,
            self._proposal_executed,
            self._vote_cast,
            self._vote_updated,
            self._overlay_registered,
            self._overlay_activated,
            self._overlay_invoked,
            self._overlay_quarantined,
            self._immune_response,
            self._config_changed,
            self._error_occurred,
        ]

    def events(self, count: int) -> list[Event[Any]]:
        """Return `count` events, cycling through all 22 types."""
        factories = self._factories
        return [factories[index % len(factories)]() for index in range(count)]

    # Helpers ------------------------------------------------------------------------------------

    def _text(self, low: int, high: int) -> str:
        words = self._random.randint(low, high)
        return " ".join(self._random.choice(_WORDS) for _ in range(words)).capitalize()

    def _metadata(self) -> dict[str, Any]:
        return {
            "source": self._random.choice(("api", "cli", "worker")),
            "request_id": f"req-{self._random.getrandbits(48):012x}",
            "service": self._random.choice(("capsules", "governance", "overlays", "identity")),
        }

    # Factories, one per event type ---------------------------------------------------------------

    def _capsule_created(self) -> Event[Any]:
        return CapsuleCreatedEvent.create(
            capsule_id=uuid4(),
            owner_id=uuid4(),
            capsule_type=self._random.choice(("knowledge", "note", "decision")),
            parent_id=uuid4() if self._random.random() < 0.5 else None,
            title=self._text(3, 8),
            content=self._text(8, 24),
            metadata=self._metadata(),
        )

    def _capsule_updated(self) -> Event[Any]:
        version = self._random.randint(1, 40)
        return CapsuleUpdatedEvent.create(
            capsule_id=uuid4(),
            actor_id=uuid4(),
            old_version=str(version),
            new_version=str(version + 1),
            fields_changed=["content", "title"],
            changes={"title": self._text(3, 8), "content": self._text(6, 16)},
            metadata=self._metadata(),
        )

    def _capsule_deleted(self) -> Event[Any]:
        return CapsuleDeletedEvent.create(
            capsule_id=uuid4(),
            actor_id=uuid4(),
            version=str(self._random.randint(1, 40)),
            reason=self._text(6, 16),
            metadata=self._metadata(),
        )

    def _capsule_searched(self) -> Event[Any]:
        return CapsuleSearchedEvent.create(
            actor_id=uuid4(),
            query=self._text(2, 6),
            result_count=self._random.randint(0, 500),
            filters={"capsule_type": "knowledge", "tags": ["kafka", "sqlite"], "limit": 50},
            metadata=self._metadata(),
        )

    def _user_registered(self) -> Event[Any]:
        return UserRegisteredEvent.create(
            user_id=uuid4(),
            username=f"user{self._random.getrandbits(32):08x}",
            trust_level="standard",
            metadata={**self._metadata(), "referrer": self._text(4, 10)},
        )

    def _user_authenticated(self) -> Event[Any]:
        return UserAuthenticatedEvent.create(
            user_id=self._random.choice(self._active_users),
            ip_address=f"192.0.2.{self._random.randint(1, 254)}",
            user_agent=self._random.choice(_USER_AGENTS),
            method=self._random.choice(("password", "passkey", "oidc")),
            metadata=self._metadata(),
        )

    def _user_logout(self) -> Event[Any]:
        return UserLogoutEvent.create(
            user_id=self._random.choice(self._active_users),
            session_id=uuid4(),
            metadata={**self._metadata(), "session_seconds": self._random.randint(10, 86400)},
        )

    def _user_trust_changed(self) -> Event[Any]:
        return UserTrustChangedEvent.create(
            user_id=uuid4(),
            actor_id=uuid4(),
            old_trust="standard",
            new_trust="trusted",
            reason=self._text(8, 20),
            metadata=self._metadata(),
        )

    def _user_anonymized(self) -> Event[Any]:
        return UserAnonymizedEvent.create(
            user_id=uuid4(),
            actor_id=uuid4(),
            reason=self._text(8, 20),
            metadata=self._metadata(),
        )

    def _proposal_created(self) -> Event[Any]:
        return ProposalCreatedEvent.create(
            proposal_id=uuid4(),
            proposer_id=uuid4(),
            proposal_type=self._random.choice(("policy", "budget", "overlay")),
            title=self._text(10, 24),
            metadata=self._metadata(),
        )

    def _proposal_activated(self) -> Event[Any]:
        starts = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=self._random.randint(0, 8000))
        return ProposalActivatedEvent.create(
            proposal_id=uuid4(),
            actor_id=uuid4(),
            voting_starts_at=starts,
            voting_ends_at=starts + timedelta(days=7),
            metadata=self._metadata(),
        )

    def _proposal_closed(self) -> Event[Any]:
        return ProposalClosedEvent.create(
            proposal_id=uuid4(),
            outcome=self._random.choice(("passed", "rejected", "no_quorum")),
            votes_for=float(self._random.randint(0, 500)),
            votes_against=float(self._random.randint(0, 500)),
            votes_abstain=float(self._random.randint(0, 50)),
            actor_id=uuid4(),
            metadata=self._metadata(),
        )

    def _proposal_executed(self) -> Event[Any]:
        return ProposalExecutedEvent.create(
            proposal_id=uuid4(),
            success=self._random.random() < 0.9,
            details=self._text(8, 20),
            actor_id=uuid4(),
            metadata=self._metadata(),
        )

    def _vote_cast(self) -> Event[Any]:
        return VoteCastEvent.create(
            vote_id=uuid4(),
            proposal_id=uuid4(),
            voter_id=uuid4(),
            decision=self._random.choice(("for", "against", "abstain")),
            weight=round(self._random.uniform(0.5, 5.0), 2),
            metadata=self._metadata(),
        )

    def _vote_updated(self) -> Event[Any]:
        return VoteUpdatedEvent.create(
            vote_id=uuid4(),
            proposal_id=uuid4(),
            voter_id=uuid4(),
            old_decision="for",
            new_decision="against",
            weight=round(self._random.uniform(0.5, 5.0), 2),
            metadata=self._metadata(),
        )

    def _overlay_registered(self) -> Event[Any]:
        return OverlayRegisteredEvent.create(
            overlay_id=uuid4(),
            overlay_name=self._random.choice(("summarizer", "translator", "embedder")),
            version=f"1.{self._random.randint(0, 9)}.{self._random.randint(0, 20)}",
            capabilities=["summarize", "translate", "classify"],
            actor_id=uuid4(),
            metadata=self._metadata(),
        )

    def _overlay_activated(self) -> Event[Any]:
        return OverlayActivatedEvent.create(
            overlay_id=uuid4(),
            overlay_name=self._random.choice(("summarizer", "translator", "embedder")),
            actor_id=uuid4(),
            metadata={**self._metadata(), "note": self._text(4, 10)},
        )

    def _overlay_invoked(self) -> Event[Any]:
        return OverlayInvokedEvent.create(
            overlay_id=uuid4(),
            overlay_name="summarizer",
            operation=self._random.choice(("summarize", "translate", "classify")),
            duration_ms=round(self._random.uniform(1, 900), 3),
            success=self._random.random() < 0.97,
            metadata={**self._metadata(), "input_tokens": self._random.randint(10, 4000)},
        )

    def _overlay_quarantined(self) -> Event[Any]:
        return OverlayQuarantinedEvent.create(
            overlay_id=uuid4(),
            overlay_name="translator",
            reason=self._text(8, 20),
            failure_count=self._random.randint(1, 20),
            metadata=self._metadata(),
        )

    def _immune_response(self) -> Event[Any]:
        return ImmuneResponseEvent.create(
            target_type="overlay",
            target_id=uuid4(),
            threat_type="resource_exhaustion",
            threat_level=self._random.choice(("low", "medium", "high", "critical")),
            action_taken="quarantine",
            reason=self._text(8, 20),
            metadata=self._metadata(),
        )

    def _config_changed(self) -> Event[Any]:
        return ConfigChangedEvent.create(
            key="governance.quorum",
            old_value={"ratio": 0.2, "applies_to": ["policy"]},
            new_value={
                "ratio": round(self._random.random(), 2),
                "applies_to": ["policy", "budget"],
            },
            actor_id=uuid4(),
            metadata=self._metadata(),
        )

    def _error_occurred(self) -> Event[Any]:
        return ErrorOccurredEvent.create(
            error_type="TimeoutError",
            message=self._text(8, 24),
            component=self._random.choice(("search", "overlays", "audit")),
            severity=self._random.choice(("warning", "error")),
            metadata=self._metadata(),
        )


Row = tuple[str, str | None, bytes, dict[str, str]]
"""An event log row before its offset is assigned: (topic, key, JSON value, headers)."""

_ID_PREFIX = b'{"id":"'


def rows_with_fresh_ids(pool: list[Event[Any]], count: int) -> Iterator[Row]:
    """Yield `count` log rows that copy events of `pool` in turn, each with a new event id.

    Building a million events with `create` takes about as long as handling them. Swapping the
    id in the serialized JSON (and in the `event_id` header) gives distinct, valid events at a
    fraction of that cost.
    """
    encoded = [(event.topic, event.key, event.to_json(), event_headers(event)) for event in pool]
    for topic, _, value, _ in encoded:
        if not value.startswith(_ID_PREFIX):
            raise ValueError(f"expected serialized events to start with {_ID_PREFIX!r} ({topic})")
    id_end = len(_ID_PREFIX) + 36
    for index in range(count):
        topic, key, value, headers = encoded[index % len(encoded)]
        event_id = str(uuid4())
        yield (
            topic,
            key,
            _ID_PREFIX + event_id.encode() + value[id_end:],
            {**headers, "event_id": event_id},
        )


def capsule_histories(capsules: int, events_per_capsule: int, seed: int = 11) -> list[list[bytes]]:
    """Return the serialized events of `capsules` capsules: one created, then updates.

    Each update changes the title and content and moves the version on by one, so folding the
    events gives a capsule at version `events_per_capsule`. Events are built from a template
    dict and serialized with orjson, which is much faster than `create` for a million events.
    The benchmark parses every one with `parse_event`, so an invalid one would fail it.
    """
    rng = random.Random(seed)
    base_time = datetime(2026, 1, 1, tzinfo=UTC)
    histories: list[list[bytes]] = []
    for capsule_index in range(capsules):
        capsule_id = str(uuid4())
        owner_id = str(uuid4())
        created_at = base_time + timedelta(seconds=capsule_index)
        history = [
            orjson.dumps(
                {
                    "id": str(uuid4()),
                    "type": EventType.CAPSULE_CREATED.value,
                    "timestamp": created_at.isoformat(),
                    "actor_id": owner_id,
                    "actor_type": "user",
                    "resource_type": "capsule",
                    "resource_id": capsule_id,
                    "data": {
                        "capsule_type": "knowledge",
                        "parent_id": None,
                        "title": " ".join(rng.choices(_WORDS, k=5)),
                        "content": " ".join(rng.choices(_WORDS, k=12)),
                        "version": "1",
                    },
                    "correlation_id": None,
                    "causation_id": None,
                    "metadata": {"source": "api"},
                    "schema_version": 1,
                }
            )
        ]
        for version in range(1, events_per_capsule):
            moment = created_at + timedelta(milliseconds=version)
            history.append(
                orjson.dumps(
                    {
                        "id": str(uuid4()),
                        "type": EventType.CAPSULE_UPDATED.value,
                        "timestamp": moment.isoformat(),
                        "actor_id": owner_id,
                        "actor_type": "user",
                        "resource_type": "capsule",
                        "resource_id": capsule_id,
                        "data": {
                            "old_version": str(version),
                            "new_version": str(version + 1),
                            "fields_changed": ["content", "title"],
                            "changes": {
                                "title": " ".join(rng.choices(_WORDS, k=5)),
                                "content": " ".join(rng.choices(_WORDS, k=12)),
                            },
                        },
                        "correlation_id": None,
                        "causation_id": None,
                        "metadata": {"source": "api"},
                        "schema_version": 1,
                    }
                )
            )
        histories.append(history)
    return histories
