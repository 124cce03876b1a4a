"""The faster code of the publish and consume paths returns what the plain code returns."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from enum import Enum, IntEnum
from typing import Annotated, Any, NamedTuple
from uuid import UUID, uuid4

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from pydantic import JsonValue, TypeAdapter

from forge.core.audit.store import to_microseconds
from forge.core.events.codec import encode_event
from forge.core.events.context import caused_by, current_causation
from forge.core.events.dispatch import RegisteredHandler
from forge.core.privacy import PersonalDataProtector
from forge.exceptions import EventValidationError
from forge.infrastructure.kafka.common import to_kafka_headers, to_log_record, to_log_records
from forge.infrastructure.kafka.producer import to_record
from forge.infrastructure.sqlite.event_log import row_to_record, rows_to_records
from forge.models.base import (
    MAX_JSON_DEPTH,
    FrozenDict,
    deep_freeze,
    thaw,
    uuid_ascii,
    uuid_text,
)
from forge.models.events import (
    EVENT_CLASSES,
    CapsuleUpdatedEvent,
    ConfigChangedEvent,
    Event,
    EventType,
    UserAuthenticatedEvent,
    parse_event,
    topic_for,
)
from tests.helpers import SAMPLE_EVENTS, capsule_created, vote_cast

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _TaggedUuid(UUID):
    def __str__(self) -> str:
        return "tagged"


def test_uuid_text_is_str_of_uuid() -> None:
    values = [uuid4() for _ in range(1000)] + [UUID(int=0), UUID(int=2**128 - 1)]

    assert [uuid_text(value) for value in values] == [str(value) for value in values]


def test_uuid_text_of_subclass_uses_its_str() -> None:
    assert uuid_text(_TaggedUuid(int=5)) == "tagged"


def test_uuid_ascii_is_encoded_str() -> None:
    values = [uuid4() for _ in range(1000)] + [UUID(int=0), UUID(int=2**128 - 1)]

    assert [uuid_ascii(value) for value in values] == [str(value).encode() for value in values]
    assert uuid_ascii(_TaggedUuid(int=5)) == b"tagged"


@pytest.mark.parametrize("event_type", list(EventType), ids=lambda t: t.value)
@pytest.mark.parametrize("correlated", [False, True], ids=["alone", "correlated"])
def test_kafka_record_matches_encoded_event(event_type: EventType, correlated: bool) -> None:
    event = SAMPLE_EVENTS[event_type]()
    if correlated:
        event = event.model_copy(update={"correlation_id": uuid4()})
    encoded = encode_event(event, 1 << 20)

    record = to_record(event, 1 << 20)

    assert record.topic == encoded.topic
    assert record.key == (encoded.key.encode() if encoded.key is not None else None)
    assert record.value == encoded.value
    assert record.headers == to_kafka_headers(encoded.headers)


def test_microseconds_match_floor_division() -> None:
    generator = random.Random(3)
    moments = [
        _EPOCH + timedelta(microseconds=generator.randrange(-(10**16), 10**17)) for _ in range(1000)
    ]
    moments.append(datetime(2025, 6, 1, 12, tzinfo=UTC) - timedelta(microseconds=1))

    for moment in moments:
        assert to_microseconds(moment) == (moment - _EPOCH) // timedelta(microseconds=1)


def test_type_serialized_as_its_value() -> None:
    event = vote_cast()

    assert orjson.loads(event.to_json())["type"] == "vote.cast"
    assert event.model_dump_json().encode() == event.to_json()


@pytest.mark.parametrize("event_type", list(EventType), ids=lambda t: t.value)
def test_json_matches_pydantic(event_type: EventType) -> None:
    event = SAMPLE_EVENTS[event_type]()

    assert event.to_json() == event.model_dump_json().encode()


@pytest.mark.parametrize(
    "metadata",
    [
        {"ratio": 0.1, "big": 1e300, "small": 5e-324, "exp": 1e16, "neg": -0.0, "whole": 100.0},
        {"text": 'é ü 漢字 😀 \u2028 \\ " \n \t \x00 \x1f'},
        {"nested": [[], {}, [{"a": [None, True, False, -(2**63), 2**63 - 1]}]]},
    ],
    ids=["floats", "unicode", "nested"],
)
def test_edge_values_match_pydantic_json(metadata: dict[str, Any]) -> None:
    event = capsule_created(metadata=metadata)

    assert event.to_json() == event.model_dump_json().encode()


@pytest.mark.parametrize(
    "moment", [datetime(2025, 6, 1, 12, tzinfo=UTC), _EPOCH, datetime.max.replace(tzinfo=UTC)]
)
def test_edge_times_match_pydantic_json(moment: datetime) -> None:
    event = capsule_created().model_copy(update={"timestamp": moment})

    assert event.to_json() == event.model_dump_json().encode()


class _Huge(IntEnum):
    BIG = 2**70


@pytest.mark.parametrize(
    ("metadata", "path"),
    [
        ({"ratio": float("nan")}, "'ratio' is nan"),
        ({"a": [1.5, float("inf")]}, "'a[1]' is inf"),
        ({"a": {"b": -float("inf")}}, "'a.b' is -inf"),
        ({"a": {1: float("nan")}}, "'a' has the key 1"),
        ({"count": 2**63}, "'count' is 9223372036854775808, beyond"),
        ({"a": [0, {"b": -(2**63) - 1}]}, "'a[1].b' is -9223372036854775809, beyond"),
        ({"level": _Huge.BIG}, f"'level' is {2**70}, beyond"),
    ],
)
def test_unrepresentable_number_rejected(metadata: dict[str, Any], path: str) -> None:
    # JSON has no NaN or infinity, written as null; orjson reads integers beyond 64 bits back
    # as floats. Either way the event would not read back equal.
    with pytest.raises(EventValidationError) as caught:
        capsule_created(metadata=metadata)

    assert f"the value at {path}" in str(caught.value)


def test_lone_surrogate_rejected_on_serialization() -> None:
    event = capsule_created(metadata={"note": "half of a pair \ud83d"})

    with pytest.raises(EventValidationError) as caught:
        event.to_json()

    assert str(caught.value).startswith(f"Event {event.id} (capsule.created) cannot be written")


@pytest.mark.parametrize(
    ("metadata", "location", "text"),
    [
        ({"note": "half of a pair \ud83d"}, "metadata.note", "half of a pair \ud83d"),
        ({"a": {"b": ["ok", "x\udc00"]}}, "metadata.a.b[1]", "x\udc00"),
        ({"a": {"k\ud800": 1}}, "metadata.a (key)", "k\ud800"),
    ],
    ids=["field", "nested", "key"],
)
def test_lone_surrogate_error_names_field(
    metadata: dict[str, Any], location: str, text: str
) -> None:
    event = capsule_created(metadata=metadata)

    with pytest.raises(EventValidationError) as caught:
        event.to_json()

    assert [(p.location, p.value) for p in caught.value.problems] == [(location, text)]
    assert f"The text at {location!r} is not valid UTF-8" in str(caught.value)


def test_ip_addresses_match_pydantic_json() -> None:
    for address in ("192.0.2.1", "2001:db8::1"):
        event = UserAuthenticatedEvent.create(
            user_id=uuid4(), method="password", ip_address=address
        )

        assert event.to_json() == event.model_dump_json().encode()


def test_python_dump_keeps_type_member() -> None:
    event = vote_cast()

    dumped = event.model_dump()["type"]
    json_dumped = event.model_dump(mode="json")["type"]

    assert dumped is EventType.VOTE_CAST
    assert type(json_dumped) is str
    assert json_dumped == "vote.cast"


@pytest.mark.parametrize("event_class", list(EVENT_CLASSES.values()), ids=lambda c: c.__name__)
def test_type_field_schema_unchanged(event_class: type[Event[Any]]) -> None:
    for mode in ("validation", "serialization"):
        schema = event_class.model_json_schema(mode=mode)  # type: ignore[arg-type]
        expected = event_class.model_fields["type"].default.value
        assert schema["properties"]["type"]["const"] == expected


def test_topic_for_every_type() -> None:
    assert {topic_for(event_type) for event_type in EventType} == {
        f"forge.{event_type.value}" for event_type in EventType
    }


def test_flat_object_frozen() -> None:
    frozen = deep_freeze({"source": "api", "count": 2, "ratio": 0.5, "on": True, "none": None})

    assert type(frozen) is FrozenDict
    with pytest.raises(TypeError):
        frozen["source"] = "cli"


def test_nested_object_frozen_deeply() -> None:
    frozen = deep_freeze({"tags": ["a", {"b": [1]}], "inner": {"x": 1}})

    assert type(frozen["tags"]) is tuple
    assert type(frozen["tags"][1]) is FrozenDict
    assert frozen["tags"][1]["b"] == (1,)
    assert type(frozen["inner"]) is FrozenDict


class _Level(IntEnum):
    HIGH = 3


class _Source(str, Enum):
    API = "api"


class _Name(str):
    pass


class _Point(NamedTuple):
    x: int
    y: int


@pytest.mark.parametrize(
    ("value", "path", "kind"),
    [
        ({"when": datetime(2026, 1, 1)}, "'when'", "datetime"),
        ({"a": {"b": [1, {"c": uuid4()}]}}, "'a.b[1].c'", "UUID"),
        ({"blob": b"\x00"}, "'blob'", "bytes"),
        ({"point": _Point(1, 2)}, "'point'", "_Point"),
        ({"tags": {"x"}}, "'tags'", "set"),
        ({"a": {1: "one"}}, "'a' has the key 1", "int"),
    ],
)
def test_metadata_not_json_rejected_with_path(value: dict[str, Any], path: str, kind: str) -> None:
    # pydantic's JsonValue rejected these too; the error now also gives the path.
    with pytest.raises(EventValidationError) as caught:
        capsule_created(metadata=value)

    assert path in str(caught.value)
    assert kind in str(caught.value)
    assert caught.value.problems[0].location == "metadata"


def test_json_value_subclasses_become_plain() -> None:
    event = capsule_created(
        metadata={"level": _Level.HIGH, "source": _Source.API, _Name("who"): _Name("me")}
    )

    assert event.metadata == {"level": 3, "source": "api", "who": "me"}
    assert [type(value) for value in event.metadata.values()] == [int, str, str]
    assert [type(key) for key in event.metadata] == [str, str, str]


def test_metadata_must_be_object() -> None:
    with pytest.raises(EventValidationError) as caught:
        parse_event({**orjson.loads(capsule_created().to_json()), "metadata": ["a"]})

    assert "must be a JSON object, not of type list" in str(caught.value)


def test_json_fields_keep_json_value_schema() -> None:
    expected = TypeAdapter(dict[str, JsonValue]).json_schema()
    schema = ConfigChangedEvent.model_json_schema()
    data = schema["$defs"]["ConfigChangedData"]["properties"]

    assert (
        schema["properties"]["metadata"]["additionalProperties"]
        == (expected["additionalProperties"])
    )
    assert schema["properties"]["metadata"]["type"] == "object"
    assert data["new_value"]["$ref"] == "#/$defs/JsonValue"
    assert schema["$defs"]["JsonValue"] == {}


def test_thaw_gives_plain_containers() -> None:
    flat = thaw(FrozenDict({"source": "api"}))
    nested = thaw(deep_freeze({"tags": ["a", {"b": [1]}]}))

    assert type(flat) is dict
    assert flat == {"source": "api"}
    assert nested == {"tags": ["a", {"b": [1]}]}
    assert type(nested["tags"]) is list
    assert type(nested["tags"][1]) is dict


def test_nested_json_value_round_trips() -> None:
    event = ConfigChangedEvent.create(
        "limits", {"ratio": 0.2, "tags": ["a", "b"]}, [1, {"deep": [None, True]}]
    )

    parsed = parse_event(event.to_json())

    assert parsed == event
    assert parsed.model_dump(mode="json")["data"]["new_value"] == [1, {"deep": [None, True]}]


def test_caused_by_sets_and_restores_causation() -> None:
    outer, inner = capsule_created(), capsule_created(correlation_id=uuid4())

    with caused_by(outer):
        with caused_by(inner):
            during = current_causation()
        after_inner = current_causation()

    assert during is not None
    assert during.causation_id == inner.id
    assert during.correlation_id == inner.correlation_id
    assert after_inner is not None
    assert after_inner.correlation_id == outer.id
    assert current_causation() is None


def test_caused_by_restores_causation_after_error() -> None:
    with pytest.raises(RuntimeError), caused_by(capsule_created()):
        raise RuntimeError("handler failed")

    assert current_causation() is None


def test_call_one_gives_batch_handler_a_list() -> None:
    seen: list[Any] = []

    async def batch(events: Sequence[Event[Any]]) -> None:
        seen.append(list(events))

    async def single(event: Event[Any]) -> None:
        seen.append(event)

    event = vote_cast()
    asyncio.run(RegisteredHandler("batch", batch, True).call_one(event))
    asyncio.run(RegisteredHandler("single", single, False).call_one(event))

    assert seen == [[event], event]


def _row(headers: str, appended_at: str) -> tuple[Any, ...]:
    return (1, "forge.vote.cast", 0, None, b"{}", headers, appended_at)


def test_row_headers_converted_to_strings() -> None:
    record = row_to_record(_row('{"event_id": 5, "event_type": "vote.cast"}', "2025-01-01"))

    assert record.headers == {"event_id": "5", "event_type": "vote.cast"}


@pytest.mark.parametrize("headers", ["not json", "[1, 2]", "null", '"text"'])
def test_row_with_broken_headers_has_none(headers: str) -> None:
    assert row_to_record(_row(headers, "2025-01-01T00:00:00+00:00")).headers == {}


def test_rows_of_one_fetch_get_their_own_times() -> None:
    times = ["2025-01-01T00:00:00+00:00", "2025-01-01T00:00:00+00:00", "2025-02-01T00:00:00+00:00"]

    records = rows_to_records([_row("{}", appended_at) for appended_at in times])

    assert [record.timestamp for record in records] == [
        datetime.fromisoformat(appended_at) for appended_at in times
    ]


def _kafka_message(
    timestamp: int, key: bytes | None = b"k", value: bytes | None = b"{}", headers: Any = ()
) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("forge.vote.cast", 2, 7, timestamp, 0, key, value, None, 1, 2, headers)


def test_kafka_records_get_their_own_times() -> None:
    stamps = [1_700_000_000_000, 1_700_000_000_000, 1_700_000_000_001, -1]

    records = to_log_records([_kafka_message(stamp) for stamp in stamps])

    assert [record.timestamp for record in records] == [
        datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC),
        datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC),
        datetime(2023, 11, 14, 22, 13, 20, 1000, tzinfo=UTC),
        None,
    ]


def test_kafka_timestamp_beyond_datetime_is_none() -> None:
    # Kafka 4.4 with default settings rejects such a timestamp, but a broker can be configured
    # to accept it, and the record must still reach the decoder.
    (record,) = to_log_records([_kafka_message(10**15)])

    assert record.timestamp is None
    assert record.value == b"{}"


def test_kafka_record_fields_converted() -> None:
    message = _kafka_message(
        0, key=b"r\xff", value=None, headers=[("event_id", b"e\xfe"), ("empty", None)]
    )

    record = to_log_record(message)

    assert record[:5] == ("forge.vote.cast", 2, 7, "r\ufffd", b"")
    assert record.headers == {"event_id": "e\ufffd", "empty": ""}
    assert record.timestamp == _EPOCH


class _Keys:
    def __init__(self) -> None:
        self.keys: dict[UUID, bytes | None] = {}

    async def key_for(self, subject_id: UUID, *, create: bool) -> bytes | None:
        if subject_id not in self.keys and create:
            self.keys[subject_id] = bytes(range(32))
        return self.keys.get(subject_id)

    async def forget(self, subject_id: UUID) -> bool:
        self.keys[subject_id] = None
        return True


def test_sealing_changes_only_personal_fields() -> None:
    event = UserAuthenticatedEvent.create(
        uuid4(), "10.1.2.3", "curl/8.0", correlation_id=uuid4(), metadata={"source": "api"}
    )
    protector = PersonalDataProtector(_Keys())

    sealed = asyncio.run(protector.seal(event))
    revealed = asyncio.run(protector.reveal(sealed))

    unchanged = {"data", "timestamp"}
    assert {k: v for k, v in sealed if k not in unchanged} == {
        k: v for k, v in event if k not in unchanged
    }
    assert sealed.timestamp == event.timestamp
    assert sealed.data.method == event.data.method
    assert str(sealed.data.ip_address).startswith("sealed:v1:")
    assert parse_event(sealed.to_json()) == sealed
    assert revealed == event


@pytest.mark.parametrize("user_agent", ["curl/8.0", "sealed:v1:AAAA"])
def test_sealing_for_anonymized_user_drops_personal_fields(user_agent: str) -> None:
    keys = _Keys()
    event = UserAuthenticatedEvent.create(uuid4(), "10.1.2.3", user_agent)
    asyncio.run(keys.forget(event.resource_id))  # type: ignore[arg-type]

    sealed = asyncio.run(PersonalDataProtector(keys).seal(event))

    assert sealed.data.ip_address is None
    assert sealed.data.user_agent is None
    assert sealed.id == event.id


def test_sealing_twice_changes_nothing() -> None:
    protector = PersonalDataProtector(_Keys())
    sealed = asyncio.run(protector.seal(UserAuthenticatedEvent.create(uuid4(), "10.1.2.3")))

    assert asyncio.run(protector.seal(sealed)) is sealed
    assert asyncio.run(protector.seal_many([sealed])) == [sealed]


@pytest.mark.parametrize(
    "user_agent", ["sealed:v1:looks-sealed-but-is-plain", "sealed:v1:not base64 !!"]
)
def test_plain_text_with_sealed_prefix_is_sealed(user_agent: str) -> None:
    protector = PersonalDataProtector(_Keys())
    event = UserAuthenticatedEvent.create(uuid4(), "10.1.2.3", user_agent)

    [sealed] = asyncio.run(protector.seal_many([event]))

    assert sealed.data.user_agent != user_agent
    assert asyncio.run(protector.reveal(sealed)) == event


@pytest.mark.parametrize("suffix", ["SECRET-plain-text", " 张伟 ☎", "!!!"])
def test_token_with_text_added_is_sealed_again(suffix: str) -> None:
    protector = PersonalDataProtector(_Keys())
    sealed = asyncio.run(protector.seal(UserAuthenticatedEvent.create(uuid4(), "10.1.2.3", "curl")))
    tampered = f"{sealed.data.user_agent}{suffix}"
    event = sealed.model_copy(
        update={"data": sealed.data.model_copy(update={"user_agent": tampered})}
    )

    resealed = asyncio.run(protector.seal(event))

    assert suffix not in str(resealed.data.user_agent)
    assert asyncio.run(protector.reveal(resealed)).data.user_agent == tampered


def test_token_of_another_event_is_sealed_again() -> None:
    protector = PersonalDataProtector(_Keys())
    user = uuid4()
    other = asyncio.run(protector.seal(UserAuthenticatedEvent.create(user, "10.1.2.3")))
    token = other.data.ip_address
    event = UserAuthenticatedEvent.create(user, "10.9.9.9", str(token))

    sealed = asyncio.run(protector.seal(event))

    assert sealed.data.user_agent != token
    assert asyncio.run(protector.reveal(sealed)).data.user_agent == token


def _personal_fields() -> list[tuple[type[Any], str]]:
    return [
        (data_class, name)
        for data_class in {
            event_class.model_fields["data"].annotation for event_class in EVENT_CLASSES.values()
        }
        for name in data_class.personal_fields()
    ]


def test_some_payloads_have_personal_fields() -> None:
    assert len(_personal_fields()) >= 2


@pytest.mark.parametrize(
    ("data_class", "name"), _personal_fields(), ids=lambda value: getattr(value, "__name__", value)
)
def test_personal_field_accepts_sealed_values(data_class: type[Any], name: str) -> None:
    # Sealing copies payloads without validating them again, which is right only because
    # every personal field accepts both.
    info = data_class.model_fields[name]
    field: TypeAdapter[Any] = TypeAdapter(Annotated[(info.annotation, *info.metadata)])
    for value in ("sealed:v1:" + "A" * 40, None):
        assert field.validate_python(value) == value


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_json_nesting_limit() -> None:
    recursive: dict[str, Any] = {}
    recursive["self"] = recursive

    assert capsule_created(metadata={"m": _nested(MAX_JSON_DEPTH)}).metadata["m"]
    for deep in ({"m": _nested(MAX_JSON_DEPTH + 1)}, {"m": _nested(50_000)}, recursive):
        with pytest.raises(EventValidationError, match="nested deeper than 100 levels"):
            capsule_created(metadata=deep)


def test_json_list_subclass_becomes_tuple() -> None:
    class Tags(list[str]):
        pass

    event = capsule_created(metadata={"tags": Tags(["a", "b"])})

    assert event.metadata["tags"] == ("a", "b")


def test_frozen_metadata_reused() -> None:
    # Copying metadata from one event to the next passes its tuples and FrozenDicts on.
    first = capsule_created(metadata={"tags": ["a", "b"], "origin": {"path": [1, {"c": []}]}})

    second = capsule_created(metadata=first.metadata)

    assert second.metadata == first.metadata
    assert type(second.metadata["origin"]) is FrozenDict
    assert parse_event(second.to_json()) == second


def test_frozen_payload_values_reused() -> None:
    updated = CapsuleUpdatedEvent.create(
        uuid4(), uuid4(), "1", "2", ["tags"], changes={"tags": ["a", {"b": [1]}]}
    )
    config = ConfigChangedEvent.create("limits", None, [1, {"deep": [None, True]}])

    again = CapsuleUpdatedEvent.create(
        uuid4(), uuid4(), "2", "3", ["tags"], changes=updated.data.changes
    )
    config_again = ConfigChangedEvent.create("limits", config.data.new_value, (2,))

    assert again.data.changes == {"tags": ("a", {"b": (1,)})}
    assert config_again.data.old_value == (1, {"deep": (None, True)})
    assert config_again.data.new_value == (2,)
    assert parse_event(config_again.to_json()) == config_again


def _nested_tuple(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = (value,)
    return value


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"a": (1.5, float("inf"))}, "the value at 'a[1]' is inf"),
        ({"a": (0, {"b": 2**63})}, "the value at 'a[1].b' is 9223372036854775808, beyond"),
        ({"a": (uuid4(),)}, "the value at 'a[0]' is of type UUID"),
        ({"a": (FrozenDict({1: "one"}),)}, "the value at 'a[0]' has the key 1"),
        ({"m": _nested_tuple(MAX_JSON_DEPTH + 1)}, "nested deeper than 100 levels"),
    ],
    ids=["inf", "big-int", "uuid", "int-key", "depth"],
)
def test_tuple_checked_like_list(metadata: dict[str, Any], message: str) -> None:
    with pytest.raises(EventValidationError, match=re.escape(message)):
        capsule_created(metadata=metadata)


def test_frozen_value_at_depth_limit_reused() -> None:
    # Tuples count one level each, as lists do, so the deepest value accepted can be copied.
    frozen = capsule_created(metadata={"m": _nested(MAX_JSON_DEPTH)}).metadata

    assert capsule_created(metadata=frozen).metadata == frozen


class _OwnHashKey(str):
    """A key that hashes apart from its text, so a dict can also contain the plain string."""

    def __hash__(self) -> int:
        return hash(("own", str.__str__(self)))


class _IdentityKey(str):
    """A key equal only to itself, so a dict can contain two of them with the same text."""

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)


@pytest.mark.parametrize(
    ("labels", "types"),
    [
        ({_OwnHashKey("a"): 1, "a": 2}, "_OwnHashKey and str"),
        ({"a": 1, _OwnHashKey("a"): 2}, "str and _OwnHashKey"),
        ({_IdentityKey("a"): 1, _IdentityKey("a"): 2}, "_IdentityKey and _IdentityKey"),
    ],
    ids=["subclass-first", "plain-first", "same-subclass"],
)
def test_keys_equal_as_text_rejected(labels: dict[str, int], types: str) -> None:
    # Keys become plain strings, and two with the same text would keep only one value.
    # A StrEnum member cannot cause this: it hashes and compares as its text, so a dict
    # literal with it and the same plain string already contains a single key.
    assert len(labels) == 2

    with pytest.raises(EventValidationError) as caught:
        capsule_created(metadata={"labels": labels})

    assert f"the value at 'labels' has two keys that both read 'a' (of types {types})" in str(
        caught.value
    )
    assert "Rename one of the keys" in str(caught.value)
