"""Encoding events to log records and decoding them back, with every rejection named."""

from __future__ import annotations

import orjson
import pytest

from forge.core.audit.store import to_microseconds
from forge.core.events.codec import decode_event, encode_event, event_headers
from forge.exceptions import EventSchemaError, EventTooLargeError, EventValidationError
from forge.models.events import VoteCastEvent
from tests.helpers import MAX_EVENT_BYTES, capsule_created, vote_cast

LIMIT = 2048


def test_encode_gives_topic_key_headers() -> None:
    event = vote_cast()

    encoded = encode_event(event, LIMIT)

    assert encoded.topic == "forge.vote.cast"
    assert encoded.key == str(event.resource_id)
    assert encoded.value == event.to_json()
    assert encoded.headers == {
        "event_id": str(event.id),
        "event_type": "vote.cast",
        "schema_version": "1",
        "event_time_us": str(to_microseconds(event.timestamp)),
    }


def test_headers_carry_correlation_id() -> None:
    event = capsule_created(correlation_id=vote_cast().id)

    assert event_headers(event)["correlation_id"] == str(event.correlation_id)


def test_oversized_event_rejected_on_encode() -> None:
    event = capsule_created(content="x" * LIMIT)
    size = len(event.to_json())

    with pytest.raises(EventTooLargeError) as caught:
        encode_event(event, LIMIT)

    assert str(caught.value).startswith(
        f"Event {event.id} (capsule.created) is {size} bytes, over the limit of {LIMIT} bytes."
    )
    assert "FORGE_MAX_EVENT_BYTES" in str(caught.value)


def test_event_at_limit_accepted() -> None:
    event = capsule_created()
    size = len(event.to_json())

    assert encode_event(event, size).value == event.to_json()


def test_decode_gives_typed_event() -> None:
    event = vote_cast()
    encoded = encode_event(event, LIMIT)

    decoded = decode_event(encoded.value, LIMIT, encoded.headers)

    assert type(decoded) is VoteCastEvent
    assert decoded == event


def test_oversized_record_rejected_on_decode() -> None:
    value = capsule_created(content="x" * LIMIT).to_json()

    with pytest.raises(EventTooLargeError, match=f"over the limit of {LIMIT} bytes; it was not"):
        decode_event(value, LIMIT)


def test_invalid_utf8_rejected() -> None:
    value = b'{"type": "capsule.created", "data": {"title": "caf\xe9"}}'
    position = value.index(b"\xe9")

    with pytest.raises(EventValidationError) as caught:
        decode_event(value, LIMIT)

    assert str(caught.value).startswith(
        f"Record is not valid UTF-8 (byte {position}: b'\\xe9\"}}}}')"
    )
    assert caught.value.problems[0].problem == "invalid UTF-8"


def test_not_json_rejected_on_decode() -> None:
    with pytest.raises(EventValidationError, match="^Event is not valid JSON"):
        decode_event(b"<xml/>", LIMIT)


def test_header_type_mismatch_rejected() -> None:
    event = vote_cast()
    headers = {**event_headers(event), "event_type": "vote.updated"}

    with pytest.raises(EventValidationError) as caught:
        decode_event(event.to_json(), LIMIT, headers)

    assert str(caught.value).startswith(
        "Header event_type='vote.updated' does not match the value's type 'vote.cast'"
    )


def test_header_id_mismatch_rejected() -> None:
    event = vote_cast()
    headers = {**event_headers(event), "event_id": "0f4c2b8e-0000-4000-8000-000000000000"}

    with pytest.raises(EventValidationError, match="Header event_id='0f4c2b8e-0000-4000"):
        decode_event(event.to_json(), LIMIT, headers)


def test_topic_of_other_type_rejected() -> None:
    event = vote_cast()

    with pytest.raises(EventValidationError) as caught:
        decode_event(event.to_json(), LIMIT, topic="forge.vote.updated")

    assert str(caught.value) == (
        "Record in topic 'forge.vote.updated' holds a vote.cast event, which belongs in "
        "'forge.vote.cast'; producers must publish each event to the topic of its type."
    )


def test_record_in_own_topic_decoded() -> None:
    event = vote_cast()

    assert decode_event(event.to_json(), LIMIT, topic="forge.vote.cast") == event


def test_record_without_headers_decoded() -> None:
    event = vote_cast()

    assert decode_event(event.to_json(), LIMIT, {}) == event


def _spelled(event_json: bytes, name: str, text: str) -> bytes:
    """Return the event's JSON with the UUID field `name` written as `text`."""
    values = orjson.loads(event_json)
    values[name] = text
    return orjson.dumps(values)


def test_canonical_ids_match_other_spelling() -> None:
    event = vote_cast()
    upper_id = str(event.id).upper()
    upper_key = str(event.resource_id).upper()
    value = _spelled(_spelled(event.to_json(), "id", upper_id), "resource_id", upper_key)

    assert decode_event(value, LIMIT, event_headers(event), event.key) == event


def test_ids_not_canonical_rejected() -> None:
    event = vote_cast()
    upper_id = str(event.id).upper()
    upper_key = str(event.resource_id).upper()
    value = _spelled(_spelled(event.to_json(), "id", upper_id), "resource_id", upper_key)

    # Written the same way in value, header and key, but the header and key must be canonical.
    with pytest.raises(EventValidationError, match=f"Header event_id='{upper_id}'"):
        decode_event(value, LIMIT, {**event_headers(event), "event_id": upper_id})
    with pytest.raises(EventValidationError, match=f"Record key '{upper_key}' does not match"):
        decode_event(value, LIMIT, key=upper_key)


def test_key_of_other_resource_rejected() -> None:
    event = vote_cast()
    other = "0f4c2b8e-0000-4000-8000-000000000000"

    with pytest.raises(EventValidationError, match=f"Record key '{other}' does not match"):
        decode_event(event.to_json(), LIMIT, key=other)
    with pytest.raises(EventValidationError, match="does not match the event's resource_id"):
        decode_event(event.to_json(), LIMIT, key=other.upper())


@pytest.mark.parametrize("version", [2, True, 1.0], ids=["2", "true", "float"])
def test_copied_schema_version_rejected_on_encode(version: object) -> None:
    # model_copy does not validate, so creation's check cannot catch this. `True == 1` and
    # `1.0 == 1`, but consumers reject both.
    event = capsule_created().model_copy(update={"schema_version": version})

    with pytest.raises(EventSchemaError) as caught:
        encode_event(event, MAX_EVENT_BYTES)

    assert f"has schema_version {version}, but this code writes version 1" in str(caught.value)
    assert [(p.location, p.value) for p in caught.value.problems] == [("schema_version", version)]
