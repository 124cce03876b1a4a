"""Reference service that emits events: create, update and delete capsules.

The capsule and its event are written in one transaction by the store, never as a state write
followed by a separate publish. A crash between those two would otherwise lose the event for
good, or announce a change that was never stored.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any
from uuid import UUID, uuid4

from forge.core.capsules.store import CapsuleStore
from forge.core.events.codec import encode_event
from forge.core.events.context import stamp
from forge.exceptions import ConflictError, NotFoundError
from forge.logging import get_logger
from forge.models.base import utc_now
from forge.models.capsule import (
    MUTABLE_FIELDS,
    Capsule,
    CapsuleCreate,
    CapsuleUpdate,
    next_version,
)
from forge.models.events import CapsuleCreatedEvent, CapsuleDeletedEvent, CapsuleUpdatedEvent

logger = get_logger(__name__)

_CONCURRENT_UPDATE_ATTEMPTS = 20


class CapsuleService:
    """Creates, updates and deletes capsules, each change with its event."""

    def __init__(self, store: CapsuleStore, *, max_event_bytes: int = 1024 * 1024) -> None:
        self._store = store
        self._max_event_bytes = max_event_bytes

    async def get(self, capsule_id: UUID, *, include_deleted: bool = False) -> Capsule:
        capsule = await self._store.get(capsule_id, include_deleted=include_deleted)
        if capsule is None:
            raise NotFoundError(f"Capsule {capsule_id} not found.")
        return capsule

    async def create(self, data: CapsuleCreate, *, capsule_id: UUID | None = None) -> Capsule:
        """Store a new capsule and its `capsule.created` event; the owner is the actor.

        Raises:
            NotFoundError: `parent_id` names no live capsule.
            ConflictError: `capsule_id` is taken.
            EventTooLargeError: the content makes the event larger than the limit.
        """
        now = utc_now()
        capsule = Capsule(
            id=capsule_id or uuid4(),
            owner_id=data.owner_id,
            capsule_type=data.capsule_type,
            title=data.title,
            content=data.content,
            parent_id=data.parent_id,
            version="1",
            created_at=now,
            updated_at=now,
        )
        event = stamp(
            CapsuleCreatedEvent.create(
                capsule_id=capsule.id,
                owner_id=capsule.owner_id,
                capsule_type=capsule.capsule_type,
                parent_id=capsule.parent_id,
                title=capsule.title,
                content=capsule.content,
                version=capsule.version,
            ).model_copy(update={"timestamp": now})
        )
        await self._store.create(capsule, [encode_event(event, self._max_event_bytes)])
        logger.info("capsule_created", capsule_id=str(capsule.id), event_id=str(event.id))
        return capsule

    async def update(self, capsule_id: UUID, data: CapsuleUpdate, *, actor_id: UUID) -> Capsule:
        """Apply the given fields, bump the version and store the `capsule.updated` event.

        An update that changes nothing stores nothing and returns the capsule as it is.

        Raises:
            NotFoundError: no live capsule has this id.
            ConflictError: `expected_version` is given and the capsule is at another one.
        """
        # Without an expected version the caller asked to apply its fields to whatever version is
        # current, so a concurrent change is retried on the new version instead of reported.
        attempts = 1 if data.expected_version is not None else _CONCURRENT_UPDATE_ATTEMPTS
        for attempt in range(1, attempts):
            try:
                return await self._update_once(capsule_id, data, actor_id)
            except ConflictError:
                # A random pause spreads writers that collided, so that they do not collide
                # again on the next version.
                delay = random.uniform(0, 0.01 * attempt)
                logger.info(
                    "capsule_update_retried",
                    capsule_id=str(capsule_id),
                    attempt=attempt,
                    retry_in_seconds=round(delay, 4),
                )
                await asyncio.sleep(delay)
        return await self._update_once(capsule_id, data, actor_id)

    async def _update_once(self, capsule_id: UUID, data: CapsuleUpdate, actor_id: UUID) -> Capsule:
        current = await self.get(capsule_id)
        if data.expected_version is not None and data.expected_version != current.version:
            raise ConflictError(
                f"Capsule {capsule_id} is at version {current.version}, not "
                f"{data.expected_version}; read it again and retry the change."
            )
        changes: dict[str, Any] = {}
        for field in MUTABLE_FIELDS:
            value = getattr(data, field)
            if value is not None and value != getattr(current, field):
                changes[field] = value
        if not changes:
            return current

        now = utc_now()
        updated = current.model_copy(
            update={**changes, "version": next_version(current.version), "updated_at": now}
        )
        event = stamp(
            CapsuleUpdatedEvent.create(
                capsule_id=capsule_id,
                actor_id=actor_id,
                old_version=current.version,
                new_version=updated.version,
                fields_changed=sorted(changes),
                changes=changes,
            ).model_copy(update={"timestamp": now})
        )
        await self._store.update(
            updated, current.version, [encode_event(event, self._max_event_bytes)]
        )
        logger.info(
            "capsule_updated",
            capsule_id=str(capsule_id),
            version=updated.version,
            event_id=str(event.id),
        )
        return updated

    async def delete(
        self, capsule_id: UUID, *, actor_id: UUID, reason: str | None = None
    ) -> Capsule:
        """Mark the capsule deleted and store the `capsule.deleted` event.

        Raises:
            NotFoundError: no live capsule has this id.
        """
        current = await self.get(capsule_id, include_deleted=True)
        if current.deleted_at is not None:
            raise NotFoundError(
                f"Capsule {capsule_id} was already deleted at {current.deleted_at.isoformat()}."
            )
        now = utc_now()
        event = stamp(
            CapsuleDeletedEvent.create(
                capsule_id=capsule_id, actor_id=actor_id, version=current.version, reason=reason
            ).model_copy(update={"timestamp": now})
        )
        await self._store.delete(
            capsule_id, current.version, now, [encode_event(event, self._max_event_bytes)]
        )
        logger.info("capsule_deleted", capsule_id=str(capsule_id), event_id=str(event.id))
        return current.model_copy(update={"deleted_at": now, "updated_at": now})
