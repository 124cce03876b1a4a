"""The audit trail port: an append-only record of every event, queryable by who, what and when."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from forge.exceptions import EventValidationError, FieldProblem
from forge.models.base import UtcDatetime
from forge.models.events import Event, EventType

MAX_PAGE_SIZE = 1000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_microseconds(moment: datetime) -> int:
    """Return microseconds since the Unix epoch, exactly (no float rounding)."""
    # Whole-number arithmetic on the difference's parts: the same result as floor division by
    # one microsecond, in about half the time. Every encoded event and audit row needs it.
    since = moment - _EPOCH
    return (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds


class AuditQuery(BaseModel):
    """Filters of an audit query; all given filters must match. Results are newest first."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    resource_id: UUID | None = None
    actor_id: UUID | None = None
    event_type: EventType | None = None
    correlation_id: UUID | None = None
    since: UtcDatetime | None = Field(default=None, description="Inclusive lower bound")
    until: UtcDatetime | None = Field(default=None, description="Inclusive upper bound")
    limit: int = Field(default=50, ge=1, le=MAX_PAGE_SIZE)
    cursor: str | None = Field(default=None, description="next_cursor of the previous page")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One recorded event and when the recorder stored it."""

    event: Event[Any]
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class AuditPage:
    entries: list[AuditEntry]
    next_cursor: str | None


def encode_cursor(occurred_us: int, seq: int) -> str:
    return base64.urlsafe_b64encode(f"{occurred_us}:{seq}".encode()).decode().rstrip("=")


_CURSOR_MICROSECONDS = range(
    to_microseconds(datetime.min.replace(tzinfo=UTC)),
    to_microseconds(datetime.max.replace(tzinfo=UTC)) + 1,
)


def decode_cursor(cursor: str) -> tuple[int, int]:
    """Parse a page cursor, or raise `EventValidationError` naming it."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        occurred, seq = base64.urlsafe_b64decode(padded.encode()).decode().split(":")
        position = int(occurred), int(seq)
        # The time must be one that `datetime` represents (years 1 to 9999), and the sequence a
        # 64-bit integer as both stores keep it; other values fail in the driver.
        if position[0] not in _CURSOR_MICROSECONDS or not -(2**63) <= position[1] < 2**63:
            raise ValueError("cursor out of range")
        return position
    except (ValueError, UnicodeDecodeError) as error:
        problem = FieldProblem("cursor", cursor, "not a cursor returned by a query")
        raise EventValidationError(
            f"Invalid audit cursor {problem.shown_value()}; pass the next_cursor of a previous "
            "page.",
            [problem],
        ) from error


@runtime_checkable
class AuditStore(Protocol):
    """Append-only storage of events; recording an event twice keeps one copy."""

    async def record(self, events: Sequence[Event[Any]]) -> int:
        """Store events not yet stored; return how many were new.

        Raises:
            EventRejectedError: an event has the id of a stored event but other content.
        """

    async def query(self, query: AuditQuery) -> AuditPage: ...

    async def events_for_resource(
        self, resource_id: UUID, *, until: datetime | None = None
    ) -> list[Event[Any]]:
        """Return the resource's events, oldest first."""

    async def count(self) -> int: ...
