"""Every malformed or hostile record of tests/data/bad_messages.jsonl is parked with its reason.

Valid events are interleaved with the bad records: all of them must be handled, in order, and
the ones accepted before the bad records must still be there afterwards.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from forge.core.audit.recorder import AuditRecorder
from forge.core.audit.store import AuditQuery
from forge.core.events.codec import event_headers
from forge.models.events import Event, EventType, VoteCastEvent

CORPUS_PATH = Path(__file__).parent.parent / "data" / "bad_messages.jsonl"
CORPUS: list[dict[str, Any]] = [
    json.loads(line) for line in CORPUS_PATH.read_text().splitlines() if line.strip()
]


def _materialize(entry: dict[str, Any], max_event_bytes: int) -> bytes:
    generated = entry.get("generate")
    if generated == "deeply_nested":
        return b'{"type": "vote.cast", "data": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    if generated == "oversized":
        padding = "x" * (max_event_bytes + 1)
        return json.dumps({"type": "vote.cast", "data": {"padding": padding}}).encode()
    if "value_base64" in entry:
        return base64.b64decode(entry["value_base64"])
    return str(entry["value"]).encode()


def _vote(resource_id: UUID) -> Event[Any]:
    return VoteCastEvent.create(resource_id, uuid4(), uuid4(), "for", 1.0)


def test_corpus_has_thirty_cases() -> None:
    assert len(CORPUS) >= 30
    assert len({entry["name"] for entry in CORPUS}) == len(CORPUS)


async def test_bad_records_parked_with_reason(backend: Any) -> None:
    resource_id = uuid4()
    accepted_before = [_vote(resource_id) for _ in range(3)]
    await backend.publisher.publish_batch(accepted_before)

    # Kafka numbers offsets per partition, and the key picks the partition: a record is
    # found by topic, key and offset on every backend.
    positions: list[tuple[str, str | None, int]] = []
    valid_between: list[Event[Any]] = []
    for entry in CORPUS:
        value = _materialize(entry, backend.settings.max_event_bytes)
        offset = await backend.append_raw(
            entry["topic"], value, key=entry["key"], headers=entry["headers"]
        )
        positions.append((entry["topic"], entry["key"], offset))
        good = _vote(resource_id)
        await backend.publisher.publish(good)
        valid_between.append(good)

    handled: list[UUID] = []

    async def record_handled(event: Event[Any]) -> None:
        handled.append(event.id)

    consumer = backend.make_consumer("corpus-checker")
    consumer.register_handler(EventType.VOTE_CAST, record_handled)
    consumer.register_handler(EventType.CAPSULE_UPDATED, record_handled)
    await consumer.start()
    try:
        await consumer.drain()
    finally:
        await consumer.stop()

    expected = [event.id for event in accepted_before + valid_between]
    assert handled == expected

    letters = await backend.dead_letters.list(group_id="corpus-checker", limit=1000)
    by_position = {(letter.topic, letter.key, letter.offset): letter for letter in letters}
    assert len(letters) == len(CORPUS)
    for entry, position in zip(CORPUS, positions, strict=True):
        letter = by_position[position]
        assert entry["reason"] in letter.reason, f"{entry['name']}: {letter.reason}"
        assert letter.handler == "decode", entry["name"]


async def test_reused_event_id_parked_by_audit(backend: Any) -> None:
    original = _vote(uuid4())
    await backend.publisher.publish(original)
    forged = json.loads(original.to_json())
    forged["data"]["weight"] = 99.0
    await backend.append_raw(
        original.topic,
        json.dumps(forged).encode(),
        key=original.key,
        headers=event_headers(original),
    )

    consumer = backend.make_consumer("audit-corpus")
    recorder = AuditRecorder(backend.audit_store)
    recorder.attach(consumer)
    await consumer.start()
    try:
        await consumer.drain()
    finally:
        await consumer.stop()

    page = await backend.audit_store.query(AuditQuery(resource_id=original.resource_id))
    assert [entry.event for entry in page.entries] == [original]
    letters = await backend.dead_letters.list(group_id="audit-corpus")
    assert len(letters) == 1
    assert "already in the audit trail with different content" in letters[0].reason
    assert letters[0].event_id == str(original.id)
