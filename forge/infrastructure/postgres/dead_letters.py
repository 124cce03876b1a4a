"""Dead-letter store in PostgreSQL.

Unlike the embedded log, a consumer group on Kafka may have several members, each polling for
letters to redeliver. `claim_retries` therefore leases the letters it returns for
`claim_seconds`: other members skip them until the lease ends, and a member that dies while
redelivering leaves them to the next claim once the lease has run out.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from forge.core.events.dead_letters import DeadLetter, DeadLetterStatus, storable_ids
from forge.infrastructure.postgres.database import PostgresDatabase, status_count, storable_text

_COLUMNS = (
    "id, group_id, topic, partition, log_offset, key, value, headers, event_id, event_type, "
    "reason, error_type, handler, attempts, status, parked_at, extra"
)


def _row_to_letter(row: Any) -> DeadLetter:
    return DeadLetter(
        id=row["id"],
        group_id=row["group_id"],
        topic=row["topic"],
        partition=row["partition"],
        offset=row["log_offset"],
        key=row["key"],
        value=bytes(row["value"]),
        headers=orjson.loads(row["headers"]),
        event_id=row["event_id"],
        event_type=row["event_type"],
        reason=row["reason"],
        error_type=row["error_type"],
        handler=row["handler"],
        attempts=row["attempts"],
        status=DeadLetterStatus(row["status"]),
        parked_at=row["parked_at"],
        extra=orjson.loads(row["extra"]),
    )


def _storable_json(values: Mapping[str, str]) -> str:
    return orjson.dumps(
        {storable_text(name): storable_text(text) for name, text in values.items()}
    ).decode()


class PostgresDeadLetterStore:
    """`DeadLetterStore` on the `dead_letters` table."""

    def __init__(self, database: PostgresDatabase, *, claim_seconds: float = 60.0) -> None:
        if claim_seconds <= 0:
            raise ValueError(f"claim_seconds must be above 0, got {claim_seconds}")
        self._database = database
        self._claim_seconds = claim_seconds

    async def park(self, letters: Sequence[DeadLetter]) -> None:
        """Store the letters in one transaction; parking a record and handler again updates it."""
        if not letters:
            return
        rows = [
            (
                storable_text(letter.group_id),
                storable_text(letter.topic),
                letter.partition,
                letter.offset,
                storable_text(letter.key),
                letter.value,
                _storable_json(letter.headers),
                storable_text(letter.event_id),
                storable_text(letter.event_type),
                storable_text(letter.reason),
                storable_text(letter.error_type),
                storable_text(letter.handler),
                letter.attempts,
                DeadLetterStatus.PARKED.value,
                _storable_json(letter.extra),
            )
            for letter in letters
        ]
        async with self._database.transaction() as connection:
            # Parking the same record and handler again (after a crash before the position
            # was committed) updates the existing letter instead of adding a duplicate.
            await connection.executemany(
                "INSERT INTO dead_letters (group_id, topic, partition, log_offset, key, value, "
                "headers, event_id, event_type, reason, error_type, handler, attempts, status, "
                "parked_at, updated_at, extra) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, "
                "$9, $10, $11, $12, $13, $14, now(), now(), $15::jsonb) "
                "ON CONFLICT (group_id, topic, partition, log_offset, handler) DO UPDATE SET "
                "reason = excluded.reason, error_type = excluded.error_type, "
                "attempts = excluded.attempts, status = excluded.status, "
                "updated_at = excluded.updated_at, claimed_until = NULL, extra = excluded.extra",
                rows,
            )

    async def list(
        self,
        *,
        group_id: str | None = None,
        status: DeadLetterStatus | None = None,
        limit: int = 100,
    ) -> list[DeadLetter]:
        """Return letters in the order they were first parked."""
        conditions: list[str] = []
        parameters: list[Any] = []
        if group_id is not None:
            parameters.append(storable_text(group_id))
            conditions.append(f"group_id = ${len(parameters)}")
        if status is not None:
            parameters.append(DeadLetterStatus(status).value)
            conditions.append(f"status = ${len(parameters)}")
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        # PostgreSQL's LIMIT takes 64 bits, and a larger limit means no limit.
        parameters.append(min(limit, 2**63 - 1))
        rows = await self._database.fetch(
            f"SELECT {_COLUMNS} FROM dead_letters {where} ORDER BY id LIMIT ${len(parameters)}",
            *parameters,
        )
        return [_row_to_letter(row) for row in rows]

    async def request_retry(
        self, ids: Sequence[int] | None = None, *, group_id: str | None = None
    ) -> int:
        """Mark parked letters (all of them when `ids` is None) for redelivery; return the count."""
        conditions = ["status = $2"]
        parameters: list[Any] = [
            DeadLetterStatus.RETRY_REQUESTED.value,
            DeadLetterStatus.PARKED.value,
        ]
        if ids is not None:
            ids = storable_ids(ids)
            if not ids:
                return 0
            parameters.append(ids)
            conditions.append(f"id = ANY(${len(parameters)}::bigint[])")
        if group_id is not None:
            parameters.append(storable_text(group_id))
            conditions.append(f"group_id = ${len(parameters)}")
        status = await self._database.execute(
            "UPDATE dead_letters SET status = $1, updated_at = now(), claimed_until = NULL "
            f"WHERE {' AND '.join(conditions)}",
            *parameters,
        )
        return status_count(status)

    async def claim_retries(self, group_id: str, limit: int = 100) -> builtins.list[DeadLetter]:
        """Return and lease the letters of `group_id` waiting for redelivery, oldest first.

        A letter returned here is not returned again for `claim_seconds`, unless it is resolved
        or parked again first.
        """
        rows = await self._database.fetch(
            "UPDATE dead_letters SET claimed_until = now() + make_interval(secs => $3) "
            "WHERE id IN (SELECT id FROM dead_letters WHERE group_id = $1 AND status = $2 "
            "AND (claimed_until IS NULL OR claimed_until < now()) ORDER BY id LIMIT $4 "
            f"FOR UPDATE SKIP LOCKED) RETURNING {_COLUMNS}",
            storable_text(group_id),
            DeadLetterStatus.RETRY_REQUESTED.value,
            self._claim_seconds,
            limit,
        )
        return sorted((_row_to_letter(row) for row in rows), key=lambda letter: letter.id or 0)

    async def mark_resolved(self, letter_id: int) -> None:
        await self._database.execute(
            "UPDATE dead_letters SET status = $1, updated_at = now(), claimed_until = NULL "
            "WHERE id = $2",
            DeadLetterStatus.RESOLVED.value,
            letter_id,
        )

    async def mark_parked(
        self,
        letter_id: int,
        reason: str,
        error_type: str,
        attempts: int,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        """Park a redelivered letter again after it failed, adding `attempts` to its count."""
        await self._database.execute(
            "UPDATE dead_letters SET status = $1, reason = $2, error_type = $3, "
            "attempts = attempts + $4, updated_at = now(), claimed_until = NULL, "
            "extra = $5::jsonb WHERE id = $6",
            DeadLetterStatus.PARKED.value,
            storable_text(reason),
            storable_text(error_type),
            attempts,
            _storable_json(extra or {}),
            letter_id,
        )
