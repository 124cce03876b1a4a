"""The error tree of Forge.

Every error Forge raises on purpose derives from `ForgeError`. Driver errors (sqlite3, aiokafka,
asyncpg) are translated once, at the storage or broker boundary, so callers never import a driver.
Messages are sentences that name the value and end with the fix.
"""

from __future__ import annotations

import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class ForgeError(Exception):
    """Base class of every error raised by Forge on purpose.

    `retriable` is True when the same call may succeed later without a change on the caller's
    side, for example once a broker or database is up again. aiokafka's errors carry the same
    flag.
    """

    retriable: bool = False


class ConfigurationError(ForgeError):
    """A setting is missing or invalid."""


# Events ------------------------------------------------------------------------------------------


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()
"""`FieldProblem.value` of a required field that is absent from the input."""


@dataclass(frozen=True)
class FieldProblem:
    """One invalid field of an event: where it is, the value found and what is wrong."""

    location: str
    value: Any
    problem: str

    def shown_value(self) -> str:
        """Return the value's `repr`, cut to 80 characters, for messages and error bodies."""
        try:
            value = repr(self.value)
        except RecursionError:
            # A value nested thousands of levels deep; reprlib stops after a few levels.
            value = reprlib.repr(self.value)
        if len(value) > 80:
            value = value[:77] + "..."
        return value

    def describe(self) -> str:
        return f"{self.location}={self.shown_value()}: {self.problem}"


class EventValidationError(ForgeError, ValueError):
    """An event could not be built or parsed: unknown type, missing field or wrong type.

    `problems` lists every invalid field with its value, so a dead-letter record or an API
    response can show all of them at once.
    """

    def __init__(self, message: str, problems: Sequence[FieldProblem] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


class UnknownEventTypeError(EventValidationError):
    """The `type` field names no event type of the catalog."""


class EventSchemaError(EventValidationError):
    """The event's `schema_version` is newer than this code supports, or cannot be upgraded."""


class EventTooLargeError(EventValidationError):
    """The serialized event is larger than the configured limit."""


# Publishing and consuming ------------------------------------------------------------------------


class PublishError(ForgeError):
    """An event was not durably accepted by the event log or broker."""

    retriable = True


class BatchPublishError(PublishError):
    """Some events of a batch were not acknowledged.

    `failed` maps each rejected event's id to the error it got; every event not listed there was
    acknowledged, so a caller can retry exactly the failed ones.
    """

    def __init__(self, message: str, failed: dict[Any, BaseException], acknowledged: int) -> None:
        super().__init__(message)
        self.failed = failed
        self.acknowledged = acknowledged


class EventRejectedError(ForgeError):
    """A handler rejects an event for good: retrying cannot help, so it is parked at once."""


class NotStartedError(ForgeError, RuntimeError):
    """A producer, consumer or store was used before `start()` or after `stop()`."""


class ConsumerGroupError(ForgeError):
    """The consumer group cannot be joined as requested."""


class BrokerUnavailableError(ForgeError):
    """The Kafka broker cannot be reached."""

    retriable = True


# Storage -----------------------------------------------------------------------------------------


class StorageError(ForgeError):
    """A database operation failed."""


class StorageUnavailableError(StorageError):
    """The database cannot be reached or is locked for too long."""

    retriable = True


class StorageFullError(StorageError):
    """The database's disk is full; nothing of the failed write was stored."""

    retriable = True


class NotFoundError(ForgeError, LookupError):
    """The requested resource does not exist."""


class ConflictError(ForgeError):
    """The resource changed since the caller read it (optimistic concurrency)."""
