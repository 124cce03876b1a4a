"""The capsule store port: capsule state written in one transaction with its events."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol, runtime_checkable
from uuid import UUID

from forge.core.events.codec import EncodedEvent
from forge.models.capsule import Capsule


@runtime_checkable
class CapsuleStore(Protocol):
    """Stores capsules. Every write takes the events it emits and stores both atomically.

    On the embedded backend the events go to the event log in the same SQLite transaction; on
    the distributed backend they go to the outbox table in the same PostgreSQL transaction.
    """

    async def get(self, capsule_id: UUID, *, include_deleted: bool = False) -> Capsule | None: ...

    async def list(
        self, *, owner_id: UUID | None = None, include_deleted: bool = False, limit: int = 100
    ) -> list[Capsule]: ...

    async def create(self, capsule: Capsule, events: Sequence[EncodedEvent]) -> None:
        """Insert a new capsule; raise `ConflictError` if the id exists, `NotFoundError` if
        its parent does not exist or is deleted."""

    async def update(
        self, capsule: Capsule, expected_version: str, events: Sequence[EncodedEvent]
    ) -> None:
        """Replace a capsule; raise `ConflictError` unless it is stored at `expected_version`."""

    async def delete(
        self,
        capsule_id: UUID,
        expected_version: str,
        deleted_at: datetime,
        events: Sequence[EncodedEvent],
    ) -> None:
        """Mark a capsule deleted; raise `ConflictError` unless it is at `expected_version`."""
