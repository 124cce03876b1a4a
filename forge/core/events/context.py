"""Correlation and causation carried from a triggering event to the events it causes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from forge.models.events import Event


@dataclass(frozen=True, slots=True)
class Causation:
    correlation_id: UUID | None
    causation_id: UUID | None


_current: ContextVar[Causation | None] = ContextVar("forge_causation", default=None)


@contextmanager
def correlation_scope(correlation_id: UUID) -> Iterator[None]:
    """Stamp `correlation_id` on every event published in this block that has none."""
    token = _current.set(Causation(correlation_id, None))
    try:
        yield
    finally:
        _current.reset(token)


@contextmanager
def caused_by(trigger: Event[Any]) -> Iterator[None]:
    """Mark events published in this block as caused by `trigger`, in its correlation.

    The consumer enters this around every handler call, so a handler's events are linked to the
    event it handles without any code in the handler.
    """
    correlation_id = trigger.correlation_id or trigger.id
    token = _current.set(Causation(correlation_id, trigger.id))
    try:
        yield
    finally:
        _current.reset(token)


def current_causation() -> Causation | None:
    return _current.get()


def stamp(event: Event[Any]) -> Event[Any]:
    """Return `event` with correlation and causation ids from the current scope, where unset."""
    causation = _current.get()
    if causation is None:
        return event
    update: dict[str, UUID] = {}
    if event.correlation_id is None and causation.correlation_id is not None:
        update["correlation_id"] = causation.correlation_id
    if event.causation_id is None and causation.causation_id is not None:
        update["causation_id"] = causation.causation_id
    if not update:
        return event
    return event.model_copy(update=update)
