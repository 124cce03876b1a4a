"""`fetch_pending`: the consumer's batch query returns the same records as a plain scan."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from forge.infrastructure.sqlite.event_log import append_records, fetch_pending
from forge.infrastructure.sqlite.schema import migrate
from forge.models.events import EventType, topic_for

ALL_TOPICS = sorted(topic_for(event_type) for event_type in EventType)


@pytest.fixture
def connection() -> Iterator[sqlite3.Connection]:
    """An in-memory log of 20 records per topic, appended round-robin over every topic."""
    connection = sqlite3.connect(":memory:", isolation_level=None)
    migrate(connection)
    connection.execute("BEGIN")
    append_records(
        connection,
        [(topic, None, b"{}", {}) for _ in range(20) for topic in ALL_TOPICS],
    )
    connection.execute("COMMIT")
    yield connection
    connection.close()


def pending_by_scan(
    connection: sqlite3.Connection, positions: dict[str, int], after_seq: int, limit: int
) -> list[tuple[str, int]]:
    rows = connection.execute(
        "SELECT topic, log_offset FROM event_log WHERE seq > ? ORDER BY seq", (after_seq,)
    ).fetchall()
    pending = [(topic, offset) for topic, offset in rows if offset >= positions.get(topic, 10**9)]
    return pending[:limit]


def pending_of(
    connection: sqlite3.Connection, positions: dict[str, int], after_seq: int, limit: int
) -> list[tuple[str, int]]:
    rows = fetch_pending(connection, positions, after_seq, limit)
    seqs = [row[0] for row in rows]
    assert seqs == sorted(seqs), "records are not in append order"
    return [(row[1], row[2]) for row in rows if row[2] >= positions[row[1]]]


@pytest.mark.parametrize(
    ("topics", "offset", "after_seq", "limit"),
    [
        (ALL_TOPICS, 0, 0, 50),
        (ALL_TOPICS, 7, 0, 500),
        (ALL_TOPICS, 3, 100, 30),
        (ALL_TOPICS[:3], 0, 0, 10),
        (ALL_TOPICS[:3], 5, 0, 500),
        (ALL_TOPICS[5:6], 19, 0, 5),
        (ALL_TOPICS[:21], 2, 40, 100),
    ],
)
def test_pending_records_match_scan(
    connection: sqlite3.Connection, topics: list[str], offset: int, after_seq: int, limit: int
) -> None:
    positions = dict.fromkeys(topics, offset)
    expected = pending_by_scan(connection, positions, after_seq, limit)
    found = pending_of(connection, positions, after_seq, limit)
    # The scan over all topics may return records below the positions within `limit`, so it
    # can return fewer pending records, but always the first ones.
    assert found == expected[: len(found)]
    assert found, "no pending record returned"


def test_no_topics_returns_nothing(connection: sqlite3.Connection) -> None:
    assert fetch_pending(connection, {}, 0, 10) == []


def test_query_plans_need_no_sort(connection: sqlite3.Connection) -> None:
    plans = []
    for topics in (ALL_TOPICS, ALL_TOPICS[:2]):
        positions = dict.fromkeys(topics, 0)
        traced: list[str] = []
        connection.set_trace_callback(traced.append)
        fetch_pending(connection, positions, 0, 10)
        connection.set_trace_callback(None)
        sql = traced[-1]
        plans.append(" ".join(row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}")))
    for plan in plans:
        assert "TEMP B-TREE" not in plan, plan
