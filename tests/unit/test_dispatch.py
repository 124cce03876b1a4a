"""Retry policy and handler registry shared by every consumer backend."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from forge.config import ForgeSettings
from forge.core.events import dispatch as dispatch_module
from forge.core.events.context import Causation, current_causation
from forge.core.events.dead_letters import DECODE_STAGE
from forge.core.events.dispatch import (
    MAX_REASON_CHARS,
    MAX_TRACEBACK_CHARS,
    Dispatcher,
    HandlerRegistry,
    RetryPolicy,
    check_group_id,
    error_text,
    failure_details,
    handler_name,
)
from forge.core.events.ports import LogRecord
from forge.exceptions import EventRejectedError, EventValidationError
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


def vote_records(*events: Event[Any]) -> list[LogRecord]:
    return [
        LogRecord("forge.vote.cast", 0, offset, event.key, event.to_json(), {})
        for offset, event in enumerate(events)
    ]


def no_wait_dispatcher(registry: HandlerRegistry, attempts: int) -> Dispatcher:
    return Dispatcher("group", registry, RetryPolicy(attempts, 0, 0), 4096, asyncio.Event())


async def test_attempts_run_in_event_causation() -> None:
    vote = vote_cast()
    seen: list[Causation | None] = []

    async def fail_once(event: Event[Any]) -> None:
        seen.append(current_causation())
        if len(seen) == 1:
            raise RuntimeError("index busy")

    registry = HandlerRegistry()
    registry.add(EventType.VOTE_CAST, fail_once)
    result = await no_wait_dispatcher(registry, 3).dispatch(vote_records(vote))

    assert result.dead_letters == []
    assert result.handled == 1
    assert seen == [Causation(vote.id, vote.id)] * 2
    # Neither the attempt that failed nor the one that succeeded leaves its scope behind.
    assert current_causation() is None


async def test_rejected_event_parked_after_one_attempt() -> None:
    first, second = vote_cast(), vote_cast()
    calls: list[Event[Any]] = []

    async def reject_first(event: Event[Any]) -> None:
        calls.append(event)
        if event.id == first.id:
            raise EventRejectedError("vote for a closed proposal")

    registry = HandlerRegistry()
    registry.add(EventType.VOTE_CAST, reject_first, name="tally")
    result = await no_wait_dispatcher(registry, 5).dispatch(vote_records(first, second))

    assert [event.id for event in calls] == [first.id, second.id]
    assert [(letter.offset, letter.attempts) for letter in result.dead_letters] == [(0, 1)]
    assert result.dead_letters[0].handler == "tally"
    assert result.dead_letters[0].reason == "vote for a closed proposal"


async def test_failing_handler_parked_after_attempts() -> None:
    calls: list[Event[Any]] = []

    async def always_fail(event: Event[Any]) -> None:
        calls.append(event)
        raise RuntimeError(f"attempt {len(calls)} failed")

    registry = HandlerRegistry()
    registry.add(EventType.VOTE_CAST, always_fail, name="tally")
    result = await no_wait_dispatcher(registry, 3).dispatch(vote_records(vote_cast()))

    assert len(calls) == 3
    assert [(letter.attempts, letter.reason) for letter in result.dead_letters] == [
        (3, "attempt 3 failed")
    ]
    assert current_causation() is None


def _raise_after(depth: int, message: str) -> None:
    if depth == 0:
        raise RuntimeError(message)
    _raise_after(depth - 1, message)


def test_long_traceback_keeps_innermost_frames() -> None:
    try:
        _raise_deep_distinct(300)
    except RuntimeError as error:
        text = failure_details(error)["traceback"]

    assert text.startswith("...\n")
    assert text.endswith("RuntimeError: bottom reached\n")
    assert ", in _raise_deep_distinct" in text
    assert len(text) <= MAX_TRACEBACK_CHARS + len("...\n")


def _raise_deep_distinct(depth: int) -> None:
    # Each level calls through a lambda, so that the traceback has no run of equal frames for
    # Python to fold into one line.
    if depth == 0:
        raise RuntimeError("bottom reached")
    (lambda: _raise_deep_distinct(depth - 1))()


def test_huge_message_cut_in_reason_and_traceback() -> None:
    try:
        _raise_after(3, "x" * 5_000_000)
    except RuntimeError as error:
        reason = error_text(error)
        text = failure_details(error)["traceback"]

    assert (
        reason == "x" * MAX_REASON_CHARS + f"... ({5_000_000 - MAX_REASON_CHARS} more characters)"
    )
    # The frames survive, and only the message is cut.
    assert text.startswith("Traceback (most recent call last):\n")
    assert text.count(", in _raise_after") == 4
    assert text.endswith(" more characters)")
    assert len(text) < MAX_TRACEBACK_CHARS


def test_invalid_record_gets_no_traceback() -> None:
    assert failure_details(EventValidationError("Invalid vote.cast event", [])) == {}


class _UnreadableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("message not readable")

    def __repr__(self) -> str:
        raise RuntimeError("repr not readable")


async def test_unreadable_exception_still_parked() -> None:
    async def fail(event: Event[Any]) -> None:
        raise _UnreadableError

    registry = HandlerRegistry()
    registry.add(EventType.VOTE_CAST, fail, name="tally")
    registry.add_batch([EventType.VOTE_CAST], fail, name="projector")
    result = await no_wait_dispatcher(registry, 2).dispatch(vote_records(vote_cast()))

    assert [letter.handler for letter in result.dead_letters] == ["projector", "tally"]
    for letter in result.dead_letters:
        assert letter.reason == "_UnreadableError (its message could not be read)"
        assert letter.error_type == "_UnreadableError"
        assert letter.extra["traceback"].endswith("_UnreadableError: <exception str() failed>\n")


class _AsyncCallable:
    async def __call__(self, event: Event[Any]) -> None:
        return None


def _sync_handler(event: Event[Any]) -> None:
    return None


def test_sync_handler_rejected_at_registration() -> None:
    registry = HandlerRegistry()

    with pytest.raises(TypeError, match="Handler 'tally' is not an async function"):
        registry.add(EventType.VOTE_CAST, _sync_handler, name="tally")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Define it with `async def`"):
        registry.add_batch([EventType.VOTE_CAST], lambda events: None, name="projector")  # type: ignore[arg-type,return-value]

    assert registry.event_types == set()


def test_async_callable_object_accepted() -> None:
    registry = HandlerRegistry()

    registry.add(EventType.VOTE_CAST, _AsyncCallable(), name="tally")

    assert registry.event_types == {EventType.VOTE_CAST}


@pytest.mark.parametrize("group_id", ["", "a\x00b", "a\ud800b"], ids=["empty", "nul", "surrogate"])
def test_unstorable_group_id_rejected(group_id: str) -> None:
    with pytest.raises(ValueError, match="group_id must not be empty|Invalid consumer group id"):
        check_group_id(group_id)


def test_group_id_with_spaces_accepted() -> None:
    check_group_id("search index (blue)")
