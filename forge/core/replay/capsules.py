"""Rebuild a capsule's state from its events, now or as of a given time.

`capsule.created` carries the full initial state, each `capsule.updated` the new value of every
changed field, and `capsule.deleted` the deletion; folding them in order gives the capsule. The
rebuilt state is compared with the stored one to find drift between the store and the log.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from forge.exceptions import NotFoundError
from forge.models.capsule import MUTABLE_FIELDS, Capsule
from forge.models.events import (
    CapsuleCreatedEvent,
    CapsuleDeletedEvent,
    CapsuleUpdatedEvent,
    Event,
)

COMPARED_FIELDS = (
    "owner_id",
    "capsule_type",
    "title",
    "content",
    "parent_id",
    "version",
    "created_at",
    "updated_at",
    "deleted_at",
)


class ResourceEventSource(Protocol):
    """Source of one resource's events: the event log or the audit trail."""

    async def events_for_resource(
        self, resource_id: UUID, *, until: datetime | None = None
    ) -> list[Event[Any]]: ...


class CapsuleStateReader(Protocol):
    async def get(self, capsule_id: UUID, *, include_deleted: bool = False) -> Capsule | None: ...


class ReplayError(Exception):
    """The events of a capsule do not form a valid history."""


@dataclass(frozen=True, slots=True)
class FieldDifference:
    field: str
    rebuilt: Any
    stored: Any


@dataclass(slots=True)
class ReplayResult:
    """A rebuilt capsule, the stored one, and how they differ."""

    capsule_id: UUID
    rebuilt: Capsule | None
    stored: Capsule | None
    events_applied: int
    at: datetime | None = None
    differences: list[FieldDifference] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return not self.differences and not self.problems


def _ordered(events: Iterable[Event[Any]]) -> list[Event[Any]]:
    # Timestamps order a capsule's events; the version chain is checked while folding.
    return sorted(events, key=lambda event: event.timestamp)


def rebuild_capsule(
    events: Sequence[Event[Any]], problems: list[str] | None = None
) -> Capsule | None:
    """Fold capsule events, oldest first, into the capsule they describe.

    Returns None when there is no `capsule.created` event. An event that does not fit the
    version chain is skipped and described in `problems` when a list is given.
    """
    problems = problems if problems is not None else []
    capsule: Capsule | None = None
    # Changes are collected here and applied with one model_copy at the end, because a copy
    # per event took a third of the time of a replay.
    changed: dict[str, Any] = {}
    for event in _ordered(events):
        if isinstance(event, CapsuleCreatedEvent):
            if capsule is not None:
                problems.append(f"second capsule.created event {event.id} ignored")
                continue
            capsule = Capsule(
                id=event.resource_id,
                owner_id=event.actor_id,
                capsule_type=event.data.capsule_type,
                title=event.data.title,
                content=event.data.content,
                parent_id=event.data.parent_id,
                version=event.data.version,
                created_at=event.timestamp,
                updated_at=event.timestamp,
            )
        elif capsule is None:
            problems.append(f"{event.type.value} event {event.id} before capsule.created ignored")
        elif isinstance(event, CapsuleUpdatedEvent):
            version = changed.get("version", capsule.version)
            if event.data.old_version != version:
                problems.append(
                    f"capsule.updated event {event.id} goes from version "
                    f"{event.data.old_version}, but the capsule is at {version}"
                )
            for name, value in event.data.changes.items():
                if name in MUTABLE_FIELDS:
                    changed[name] = value
            changed["version"] = event.data.new_version
            changed["updated_at"] = event.timestamp
        elif isinstance(event, CapsuleDeletedEvent):
            changed["deleted_at"] = event.timestamp
            changed["updated_at"] = event.timestamp
    if capsule is not None and changed:
        capsule = capsule.model_copy(update=changed)
    return capsule


def compare(rebuilt: Capsule | None, stored: Capsule | None) -> list[FieldDifference]:
    """Return the fields in which the rebuilt and stored capsules differ."""
    if rebuilt is None or stored is None:
        if rebuilt is stored:
            return []
        return [FieldDifference("<capsule>", rebuilt is not None, stored is not None)]
    return [
        FieldDifference(name, getattr(rebuilt, name), getattr(stored, name))
        for name in COMPARED_FIELDS
        if getattr(rebuilt, name) != getattr(stored, name)
    ]


class CapsuleReplayer:
    """Rebuilds capsules from an event source and checks them against the store."""

    def __init__(self, source: ResourceEventSource, store: CapsuleStateReader) -> None:
        self._source = source
        self._store = store

    async def replay(self, capsule_id: UUID, *, at: datetime | None = None) -> ReplayResult:
        """Rebuild the capsule as it is now, or as it was at `at`.

        Only the rebuild as of now is compared with the stored capsule; the store keeps no
        history to compare an earlier state with.

        Raises:
            NotFoundError: the capsule has no events and is not stored.
            ValueError: `at` has no timezone, so it cannot be compared with event times.
        """
        if at is not None and at.utcoffset() is None:
            raise ValueError(
                f"at={at.isoformat()} has no timezone; pass an aware datetime, for example "
                "with tzinfo=UTC."
            )
        events = await self._source.events_for_resource(capsule_id, until=at)
        capsule_events = [
            event
            for event in events
            if isinstance(event, CapsuleCreatedEvent | CapsuleUpdatedEvent | CapsuleDeletedEvent)
        ]
        problems: list[str] = []
        rebuilt = rebuild_capsule(capsule_events, problems)
        stored = await self._store.get(capsule_id, include_deleted=True)
        if rebuilt is None and stored is None and not capsule_events:
            raise NotFoundError(f"Capsule {capsule_id} has no events and is not stored.")
        result = ReplayResult(
            capsule_id, rebuilt, stored, len(capsule_events), at, problems=problems
        )
        if at is None:
            result.differences = compare(rebuilt, stored)
        return result
