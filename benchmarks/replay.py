"""Replay benchmark: rebuild capsules from a million serialized capsule events.

A real replay reads each capsule's stored events, parses every one into its typed class with
`parse_event` and folds them with `rebuild_capsule`. Both steps are timed; reading the bytes is
not, because they are already in memory here.
"""

from __future__ import annotations

import time

from benchmarks.eventgen import capsule_histories
from benchmarks.harness import Row, Summary, at_least, freeze_fixtures
from benchmarks.scale import Scale
from forge.core.replay.capsules import rebuild_capsule
from forge.models.events import parse_event

GROUP = "embedded"
FLOOR_EVENTS_PER_SECOND = 100_000


def replay_once(histories: list[list[bytes]]) -> float:
    """Parse and fold every history; return the seconds taken."""
    expected_version = str(len(histories[0]))
    started = time.perf_counter()
    for history in histories:
        capsule = rebuild_capsule([parse_event(value) for value in history])
        if capsule is None or capsule.version != expected_version:
            raise RuntimeError(f"replay rebuilt {capsule!r}, expected version {expected_version}")
    return time.perf_counter() - started


def run(scale: Scale) -> list[Row]:
    histories = capsule_histories(scale.replay_capsules, scale.replay_events_per_capsule)
    freeze_fixtures()
    count = scale.replay_events
    rates = [count / replay_once(histories) for _ in range(scale.runs)]
    return [
        Row(
            "replay, parse + fold",
            GROUP,
            "events/s",
            Summary.of(rates),
            targets=[at_least(FLOOR_EVENTS_PER_SECOND, "events/s")],
            details={
                "events": count,
                "capsules": scale.replay_capsules,
                "events_per_capsule": scale.replay_events_per_capsule,
            },
            note=(
                f"parse_event + rebuild_capsule over {count:,} events of "
                f"{scale.replay_capsules:,} capsules (1 created + "
                f"{scale.replay_events_per_capsule - 1} updated each)"
            ),
        )
    ]
