"""The event catalog: types, typed classes, immutability, time zones, parsing and upcasting."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import uuid4

import orjson
import pytest
from pydantic import ValidationError

from forge.exceptions import EventSchemaError, EventValidationError, UnknownEventTypeError
from forge.models import events as events_module
from forge.models.events import (
    EVENT_CLASSES,
    CapsuleCreatedData,
    CapsuleCreatedEvent,
    Event,
    EventType,
    ProposalActivatedEvent,
    parse_event,
    register_upcaster,
    topic_for,
)
from tests.helpers import SAMPLE_EVENTS, capsule_created, vote_cast

SPECIFIED_EVENT_TYPES = [
    ("CAPSULE_CREATED", "capsule.created"),
    ("CAPSULE_UPDATED", "capsule.updated"),
    ("CAPSULE_DELETED", "capsule.deleted"),
    ("CAPSULE_SEARCHED", "capsule.searched"),
    ("USER_REGISTERED", "user.registered"),
    ("USER_AUTHENTICATED", "user.authenticated"),
    ("USER_LOGOUT", "user.logout"),
    ("USER_TRUST_CHANGED", "user.trust_changed"),
    ("USER_ANONYMIZED", "user.anonymized"),
    ("PROPOSAL_CREATED", "proposal.created"),
    ("PROPOSAL_ACTIVATED", "proposal.activated"),
    ("PROPOSAL_CLOSED", "proposal.closed"),
    ("PROPOSAL_EXECUTED", "proposal.executed"),
    ("VOTE_CAST", "vote.cast"),
    ("VOTE_UPDATED", "vote.updated"),
    ("OVERLAY_REGISTERED", "overlay.registered"),
    ("OVERLAY_ACTIVATED", "overlay.activated"),
    ("OVERLAY_INVOKED", "overlay.invoked"),
    ("OVERLAY_QUARANTINED", "overlay.quarantined"),
    ("IMMUNE_RESPONSE", "system.immune_response"),
    ("CONFIG_CHANGED", "system.config_changed"),
    ("ERROR_OCCURRED", "system.error"),
]

ALL_TYPES = pytest.mark.parametrize("event_type", list(EventType), ids=lambda t: t.value)


def sample(event_type: EventType) -> Event[Any]:
    return SAMPLE_EVENTS[event_type]()


# Catalog -----------------------------------------------------------------------------------------


def test_event_types_match_specification() -> None:
    assert [(member.name, member.value) for member in EventType] == SPECIFIED_EVENT_TYPES


def test_catalog_has_22_types() -> None:
    assert len(EventType) == 22


def test_every_type_has_typed_class() -> None:
    assert set(EVENT_CLASSES) == set(EventType)


def test_samples_cover_every_type() -> None:
    assert set(SAMPLE_EVENTS) == set(EventType)


@ALL_TYPES
def test_create_builds_typed_class(event_type: EventType) -> None:
    assert type(sample(event_type)) is EVENT_CLASSES[event_type]


@ALL_TYPES
def test_type_is_enum_member(event_type: EventType) -> None:
    event = sample(event_type)

    assert type(event.type) is EventType
    assert event.type is event_type


@ALL_TYPES
def test_topic_is_prefixed_type_value(event_type: EventType) -> None:
    event = sample(event_type)

    assert event.topic == f"forge.{event_type.value}"
    assert topic_for(event_type) == event.topic


# Round trip --------------------------------------------------------------------------------------


@ALL_TYPES
def test_json_round_trip_gives_equal_event(event_type: EventType) -> None:
    event = sample(event_type)

    assert parse_event(event.to_json()) == event


@ALL_TYPES
def test_parse_gives_typed_class(event_type: EventType) -> None:
    parsed = parse_event(sample(event_type).to_json())

    assert type(parsed) is EVENT_CLASSES[event_type]
    assert type(parsed.type) is EventType


@ALL_TYPES
def test_dict_round_trip_gives_equal_event(event_type: EventType) -> None:
    event = sample(event_type)

    assert parse_event(event.to_dict()) == event


@ALL_TYPES
@pytest.mark.filterwarnings("error")
def test_dict_matches_json_output(event_type: EventType) -> None:
    event = sample(event_type)

    assert event.to_dict() == orjson.loads(event.to_json())


def test_parse_accepts_json_text() -> None:
    event = vote_cast()

    assert parse_event(event.to_json().decode()) == event


def test_copy_keeps_type_enum_member() -> None:
    copied = vote_cast().model_copy(update={"correlation_id": uuid4()})

    assert type(copied.type) is EventType


# Immutability ------------------------------------------------------------------------------------


def test_event_field_cannot_be_set() -> None:
    event = capsule_created()

    with pytest.raises(ValidationError, match="frozen"):
        event.actor_id = uuid4()  # type: ignore[misc]


def test_payload_field_cannot_be_set() -> None:
    event = capsule_created()

    with pytest.raises(ValidationError, match="frozen"):
        event.data.title = "changed"  # type: ignore[misc]


def test_metadata_cannot_be_mutated() -> None:
    event = capsule_created(metadata={"source": "api"})

    with pytest.raises(TypeError, match="immutable event"):
        event.metadata["source"] = "cli"  # type: ignore[index]
    assert event.metadata["source"] == "api"


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda metadata: metadata.update({"x": 1}), id="update"),
        pytest.param(lambda metadata: metadata.pop("source"), id="pop"),
        pytest.param(lambda metadata: metadata.clear(), id="clear"),
        pytest.param(lambda metadata: metadata.setdefault("x", 1), id="setdefault"),
        pytest.param(lambda metadata: metadata.__delitem__("source"), id="del"),
    ],
)
def test_metadata_rejects_every_mutation(mutate: Any) -> None:
    event = capsule_created(metadata={"source": "api"})

    with pytest.raises(TypeError):
        mutate(event.metadata)
    assert dict(event.metadata) == {"source": "api"}


def test_payload_mapping_cannot_be_mutated() -> None:
    event = sample(EventType.CAPSULE_UPDATED)

    with pytest.raises(TypeError):
        event.data.changes["title"] = "sneaky"


def test_nested_payload_list_is_tuple() -> None:
    event = sample(EventType.CAPSULE_SEARCHED)

    assert isinstance(event.data.filters["tags"], tuple)


def test_nested_json_value_cannot_be_mutated() -> None:
    event = sample(EventType.CONFIG_CHANGED)

    with pytest.raises(TypeError):
        event.data.old_value["ratio"] = 0.9
    assert event.data.old_value["ratio"] == 0.2


def test_parsed_metadata_cannot_be_mutated() -> None:
    parsed = parse_event(capsule_created(metadata={"source": "api"}).to_json())

    with pytest.raises(TypeError):
        parsed.metadata["source"] = "cli"


# Time zones --------------------------------------------------------------------------------------


def test_naive_timestamp_rejected() -> None:
    with pytest.raises(EventValidationError) as caught:
        CapsuleCreatedEvent(timestamp=datetime(2025, 1, 1, 12), data={"capsule_type": "note"})

    assert "timestamp=datetime.datetime(2025, 1, 1, 12, 0)" in str(caught.value)
    assert caught.value.problems[0].location == "timestamp"


def test_naive_timestamp_rejected_on_parse() -> None:
    raw = {**capsule_created().to_dict(), "timestamp": "2025-01-01T12:00:00"}

    with pytest.raises(EventValidationError) as caught:
        parse_event(raw)

    assert "timestamp='2025-01-01T12:00:00'" in str(caught.value)
    assert "timezone" in str(caught.value)


def test_aware_timestamp_converted_to_utc() -> None:
    paris_summer = timezone(timedelta(hours=2))
    event = CapsuleCreatedEvent(
        timestamp=datetime(2025, 6, 1, 12, tzinfo=paris_summer), data={"capsule_type": "note"}
    )

    assert event.timestamp == datetime(2025, 6, 1, 10, tzinfo=UTC)
    assert event.timestamp.utcoffset() == timedelta(0)


def test_parsed_offset_converted_to_utc() -> None:
    raw = {**capsule_created().to_dict(), "timestamp": "2025-06-01T12:00:00-05:00"}

    parsed = parse_event(raw)

    assert parsed.timestamp == datetime(2025, 6, 1, 17, tzinfo=UTC)
    assert parsed.timestamp.utcoffset() == timedelta(0)


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+02:00", "9999-12-31T23:00:00-02:00"])
def test_timestamp_beyond_utc_years_rejected(moment: str) -> None:
    raw = {**capsule_created().to_dict(), "timestamp": moment}

    with pytest.raises(EventValidationError) as caught:
        parse_event(raw)

    assert caught.value.problems[0].location == "timestamp"
    assert "outside the years 1 to 9999" in str(caught.value)


def test_count_beyond_64_bits_rejected() -> None:
    # orjson would read it back as a float, which the strict count field then rejects.
    with pytest.raises(EventValidationError, match="data.result_count"):
        events_module.CapsuleSearchedEvent.create(uuid4(), "lineage", 2**63)


def test_default_timestamp_is_utc() -> None:
    assert capsule_created().timestamp.utcoffset() == timedelta(0)


def test_naive_payload_datetime_rejected() -> None:
    with pytest.raises(EventValidationError, match="data.voting_starts_at"):
        ProposalActivatedEvent.create(proposal_id=uuid4(), voting_starts_at=datetime(2025, 3, 1, 9))


# Invalid input -----------------------------------------------------------------------------------


def test_unknown_type_rejected() -> None:
    raw = {**capsule_created().to_dict(), "type": "capsule.moved"}

    with pytest.raises(EventValidationError) as caught:
        parse_event(raw)

    assert isinstance(caught.value, UnknownEventTypeError)
    assert str(caught.value).startswith("Unknown event type 'capsule.moved'. Known types: ")
    assert "capsule.created" in str(caught.value)


def test_missing_type_rejected() -> None:
    raw = capsule_created().to_dict()
    del raw["type"]

    with pytest.raises(EventValidationError, match="Event has no 'type' field"):
        parse_event(raw)


def test_missing_field_named() -> None:
    raw = capsule_created().to_dict()
    del raw["data"]["capsule_type"]

    with pytest.raises(EventValidationError) as caught:
        parse_event(raw)

    assert "data.capsule_type=<missing>: Field required" in str(caught.value)
    assert caught.value.problems[0].location == "data.capsule_type"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("weight", "heavy", "data.weight='heavy': Input should be a valid number"),
        ("decision", "maybe", "data.decision='maybe': Input should be 'for', 'against' or"),
    ],
)
def test_wrong_type_names_field_and_value(field: str, value: str, expected: str) -> None:
    raw = vote_cast().to_dict()
    raw["data"][field] = value

    with pytest.raises(EventValidationError) as caught:
        parse_event(raw)

    assert expected in str(caught.value)
    assert str(caught.value).startswith("Invalid vote.cast event: ")


def test_wrong_type_problem_has_location() -> None:
    raw = vote_cast().to_dict()
    raw["data"]["weight"] = "heavy"

    with pytest.raises(EventValidationError) as caught:
        parse_event(raw)

    assert [(p.location, p.value) for p in caught.value.problems] == [("data.weight", "heavy")]


def test_every_invalid_field_listed() -> None:
    raw = vote_cast().to_dict()
    raw["data"]["weight"] = "heavy"
    raw["data"]["decision"] = "maybe"

    with pytest.raises(EventValidationError) as caught:
        parse_event(raw)

    assert {problem.location for problem in caught.value.problems} == {
        "data.weight",
        "data.decision",
    }


def test_factory_rejects_wrong_value() -> None:
    with pytest.raises(EventValidationError, match="data.decision='maybe'"):
        vote_cast(decision="maybe")


def test_bool_weight_rejected() -> None:
    raw = vote_cast().to_dict()
    raw["data"]["weight"] = True

    with pytest.raises(EventValidationError, match="data.weight=True"):
        parse_event(raw)


def test_unknown_field_rejected() -> None:
    raw = {**vote_cast().to_dict(), "priority": "high"}

    with pytest.raises(EventValidationError, match="priority='high'"):
        parse_event(raw)


def test_not_json_rejected() -> None:
    with pytest.raises(EventValidationError, match="^Event is not valid JSON"):
        parse_event(b"capsule created, id 7")


def test_json_array_rejected() -> None:
    with pytest.raises(EventValidationError, match="must be a JSON object, got list"):
        parse_event(b"[1, 2]")


def test_base_event_not_constructible() -> None:
    with pytest.raises(TypeError, match="Event is abstract"):
        Event(type=EventType.CAPSULE_CREATED, data=CapsuleCreatedData(capsule_type="note"))


def test_parametrized_base_not_constructible() -> None:
    with pytest.raises(TypeError, match="Event is abstract"):
        Event[CapsuleCreatedData](type=EventType.CAPSULE_CREATED, data={"capsule_type": "note"})


# Schema versions ---------------------------------------------------------------------------------


def test_newer_schema_version_rejected() -> None:
    raw = {**capsule_created().to_dict(), "schema_version": 2}

    with pytest.raises(EventSchemaError) as caught:
        parse_event(raw)

    assert "schema_version 2, newer than the 1 this code knows" in str(caught.value)
    assert isinstance(caught.value, EventValidationError)


@pytest.mark.parametrize("version", [0, -1, "2", True])
def test_invalid_schema_version_rejected(version: object) -> None:
    raw = {**capsule_created().to_dict(), "schema_version": version}

    with pytest.raises(EventSchemaError, match=f"Invalid schema_version {version!r}"):
        parse_event(raw)


def test_created_event_has_current_version() -> None:
    assert capsule_created().schema_version == CapsuleCreatedEvent.SCHEMA_VERSION


@pytest.mark.parametrize("version", [2, 5])
def test_newer_schema_version_rejected_on_create(version: int) -> None:
    # Every consumer would reject such an event as newer than known, so it must not be written.
    with pytest.raises(EventSchemaError) as caught:
        CapsuleCreatedEvent(data={"capsule_type": "note"}, schema_version=version)

    assert str(caught.value).startswith(
        f"Cannot create a capsule.created event with schema_version {version}"
    )
    assert "Leave schema_version out" in str(caught.value)
    assert [(p.location, p.value) for p in caught.value.problems] == [("schema_version", version)]


@pytest.mark.parametrize("version", [True, "1", 1.0], ids=["true", "text", "float"])
def test_schema_version_not_integer_rejected_on_create(version: object) -> None:
    # Decoding rejects these too: a stored version must be a JSON integer.
    with pytest.raises(EventValidationError) as caught:
        CapsuleCreatedEvent(data={"capsule_type": "note"}, schema_version=version)

    assert "schema_version" in str(caught.value)
    assert "Input should be a valid integer" in str(caught.value)
    assert [(p.location, p.value) for p in caught.value.problems] == [("schema_version", version)]


@pytest.fixture
def capsule_schema_v2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend `capsule.created` is at schema version 2, with no upcaster registered yet."""
    monkeypatch.setattr(CapsuleCreatedEvent, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(events_module, "_UPCASTERS", dict(events_module._UPCASTERS))


def _lowercase_capsule_type(values: dict[str, Any]) -> dict[str, Any]:
    data = dict(values["data"])
    data["capsule_type"] = data["capsule_type"].lower()
    return {**values, "data": data}


@pytest.mark.usefixtures("capsule_schema_v2")
def test_upcaster_upgrades_old_version() -> None:
    register_upcaster(EventType.CAPSULE_CREATED, 1, _lowercase_capsule_type)
    stored_v1 = {**capsule_created().to_dict(), "schema_version": 1}
    stored_v1["data"]["capsule_type"] = "KNOWLEDGE"

    upgraded = parse_event(orjson.dumps(stored_v1))

    assert upgraded.schema_version == 2
    assert upgraded.data.capsule_type == "knowledge"
    assert type(upgraded) is CapsuleCreatedEvent


@pytest.mark.usefixtures("capsule_schema_v2")
def test_missing_version_read_as_version_1() -> None:
    register_upcaster(EventType.CAPSULE_CREATED, 1, _lowercase_capsule_type)
    stored = capsule_created().to_dict()
    del stored["schema_version"]
    stored["data"]["capsule_type"] = "NOTE"

    assert parse_event(stored).data.capsule_type == "note"


@pytest.mark.usefixtures("capsule_schema_v2")
def test_missing_upcaster_rejected() -> None:
    stored_v1 = {**capsule_created().to_dict(), "schema_version": 1}

    with pytest.raises(EventSchemaError, match="No upcaster from schema_version 1 of capsule"):
        parse_event(stored_v1)


@pytest.mark.usefixtures("capsule_schema_v2")
def test_create_checks_class_version() -> None:
    assert CapsuleCreatedEvent(data={"capsule_type": "note"}).schema_version == 2
    with pytest.raises(EventSchemaError, match="schema_version 3: this code writes version 2"):
        CapsuleCreatedEvent(data={"capsule_type": "note"}, schema_version=3)
    with pytest.raises(EventSchemaError, match="schema_version 1: this code writes version 2"):
        CapsuleCreatedEvent(data={"capsule_type": "note"}, schema_version=1)


@pytest.mark.usefixtures("capsule_schema_v2")
def test_current_version_not_upcast() -> None:
    calls: list[dict[str, Any]] = []
    register_upcaster(EventType.CAPSULE_CREATED, 1, lambda values: calls.append(values) or values)

    parse_event(capsule_created().to_json())

    assert calls == []
