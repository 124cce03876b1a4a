"""Retry policy and handler registry shared by every consumer backend."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from forge.config import ForgeSettings
from forge.core.events import dispatch as dispatch_module
from forge.core.events.dead_letters import DECODE_STAGE
from forge.core.events.dispatch import Dispatcher, HandlerRegistry, RetryPolicy, handler_name
from forge.core.events.ports import LogRecord
from forge.models.events import Event, EventType
from tests.helpers import vote_cast


async def note(event: Event[Any]) -> None:
    return None


async def other_note(event: Event[Any]) -> None:
    return None


async def project(events: Sequence[Event[Any]]) -> None:
    return None


def test_backoff_doubles_per_attempt() -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff_seconds=0.1, max_backoff_seconds=10)

    assert [policy.backoff(attempt) for attempt in (1, 2, 3)] == [0.1, 0.2, 0.4]


def test_backoff_capped_at_maximum() -> None:
    policy = RetryPolicy(max_attempts=9, initial_backoff_seconds=1, max_backoff_seconds=3)

    assert policy.backoff(6) == 3


def test_zero_attempts_rejected() -> None:
    with pytest.raises(ValueError, match="max_attempts must be at least 1, got 0"):
        RetryPolicy(max_attempts=0)


def test_policy_read_from_settings() -> None:
    settings = ForgeSettings(
        consumer_max_attempts=7,
        consumer_retry_backoff_seconds=0.5,
        consumer_retry_backoff_max_seconds=4,
    )

    assert RetryPolicy.from_settings(settings) == RetryPolicy(7, 0.5, 4)


def test_handler_name_is_module_and_qualname() -> None:
    assert handler_name(note) == f"{__name__}.note"


def test_same_name_for_other_handler_rejected() -> None:
    registry = HandlerRegistry()
    registry.add(EventType.VOTE_CAST, note, name="notifier")

    with pytest.raises(ValueError, match="already registered as 'notifier'; pass a distinct"):
        registry.add(EventType.VOTE_UPDATED, other_note, name="notifier")


def test_same_handler_for_two_types_accepted() -> None:
    registry = HandlerRegistry()

    registry.add(EventType.VOTE_CAST, note)
    registry.add(EventType.VOTE_UPDATED, note)

    assert registry.event_types == {EventType.VOTE_CAST, EventType.VOTE_UPDATED}


def test_type_value_string_rejected() -> None:
    registry = HandlerRegistry()

    with pytest.raises(TypeError, match="must be an EventType member, got 'vote.cast'"):
        registry.add("vote.cast", note)  # type: ignore[arg-type]


def test_batch_handler_needs_types() -> None:
    with pytest.raises(ValueError, match="needs at least one event type"):
        HandlerRegistry().add_batch([], project)


def test_batch_handlers_listed_first() -> None:
    registry = HandlerRegistry()
    registry.add(EventType.VOTE_CAST, note)
    registry.add_batch([EventType.VOTE_CAST], project)

    assert [h.name for h in registry.all_handlers(EventType.VOTE_CAST)] == [
        handler_name(project),
        handler_name(note),
    ]


async def test_decoder_fault_parks_record(monkeypatch: pytest.MonkeyPatch) -> None:
    good = vote_cast()
    records = [
        LogRecord("forge.vote.cast", 0, offset, good.key, value, {})
        for offset, value in enumerate([b"faulty", good.to_json()])
    ]
    decode = dispatch_module.decode_event

    def fail_on_faulty(value: bytes, *args: Any) -> Event[Any]:
        if value == b"faulty":
            raise RuntimeError("decoder bug")
        return decode(value, *args)

    monkeypatch.setattr(dispatch_module, "decode_event", fail_on_faulty)
    handled: list[Event[Any]] = []

    async def keep(event: Event[Any]) -> None:
        handled.append(event)

    registry = HandlerRegistry()
    registry.add(EventType.VOTE_CAST, keep)
    dispatcher = Dispatcher("group", registry, RetryPolicy(1), 4096, asyncio.Event())
    result = await dispatcher.dispatch(records)

    # A fault of the decoder parks its record instead of stopping the group.
    assert [letter.offset for letter in result.dead_letters] == [0]
    assert result.dead_letters[0].handler == DECODE_STAGE
    assert result.dead_letters[0].reason == "decoder bug"
    assert handled == [good]
