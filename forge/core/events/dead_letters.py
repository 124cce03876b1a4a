"""Dead letters: events a consumer group could not decode or handle, parked with the reason.

A parked event is never dropped. `forge dlq list` shows it, and `forge dlq retry` marks it so
that the group's consumer delivers it again to the handler that failed.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Protocol, runtime_checkable

DECODE_STAGE = "decode"
"""`DeadLetter.handler` of a record that could not be parsed into an event."""


class DeadLetterStatus(str, Enum):
    PARKED = "parked"
    RETRY_REQUESTED = "retry_requested"
    RESOLVED = "resolved"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A parked record with why it was parked, by which handler, after how many attempts.

    `extra` contains further details of the failure as text, kept by the stores with the
    letter. Parking the same record and handler again replaces it, as it replaces `reason`.
    """

    group_id: str
    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes
    headers: Mapping[str, str]
    reason: str
    error_type: str
    handler: str
    attempts: int
    event_id: str | None = None
    event_type: str | None = None
    parked_at: datetime | None = None
    status: DeadLetterStatus = DeadLetterStatus.PARKED
    id: int | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The stores write `extra` as a JSON object of strings, and would fail later, with a
        # driver's error, on anything else.
        for name, value in self.extra.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(
                    f"DeadLetter.extra must map strings to strings, but {name!r} maps to "
                    f"{value!r} ({type(name).__name__} to {type(value).__name__}). Convert "
                    "the value with str() or json.dumps()."
                )


LETTER_ID_RANGE = range(-(2**63), 2**63)
"""Ids the stores keep: 64-bit signed integers, for dead letters and outbox rows alike."""


def storable_ids(ids: Sequence[int]) -> list[int]:
    """Return the ids of `ids` within `LETTER_ID_RANGE`, because the others name no row."""
    return [letter_id for letter_id in ids if letter_id in LETTER_ID_RANGE]


@runtime_checkable
class DeadLetterStore(Protocol):
    """Keeps dead letters durably; one record per (group, topic, partition, offset, handler)."""

    async def park(self, letters: Sequence[DeadLetter]) -> None:
        """Store the letters; parking the same record and handler again updates it.

        The update replaces the letter's reason, error type, attempts, status and `extra`.
        """

    async def list(
        self,
        *,
        group_id: str | None = None,
        status: DeadLetterStatus | None = None,
        limit: int = 100,
    ) -> builtins.list[DeadLetter]: ...

    async def request_retry(
        self, ids: Sequence[int] | None = None, *, group_id: str | None = None
    ) -> int:
        """Mark parked letters (all of them when `ids` is None) for redelivery; return the count."""

    async def claim_retries(self, group_id: str, limit: int = 100) -> builtins.list[DeadLetter]:
        """Return the letters of `group_id` waiting for redelivery."""

    async def mark_resolved(self, letter_id: int) -> None: ...

    async def mark_parked(
        self,
        letter_id: int,
        reason: str,
        error_type: str,
        attempts: int,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        """Park a redelivered letter again after it failed, adding `attempts` to its count.

        `extra` replaces the letter's `extra`, as `reason` replaces its reason.
        """
