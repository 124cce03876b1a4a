"""Event counts and run counts of a full run and of the `--smoke` run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    runs: int
    throughput_events: int
    """Events published, consumed and recorded by each throughput run."""
    batch_size: int
    """Events per audit batch and per batch read by the consume anchors: the consumers' batch."""
    publish_batch_size: int
    """Events per `publish_many` call in the publish throughput rows, and per `executemany` of
    their SQLite anchor. Rows marked "500 per call" repeat them with `batch_size`."""
    replay_capsules: int
    replay_events_per_capsule: int
    memory_events: int
    memory_baseline_after: int
    """Events handled before the worker's baseline resident size is taken."""
    naive_events: int
    """Events sent one `send_and_wait` at a time, the naive Kafka publish anchor."""
    commit_each_events: int
    """Records read with a commit per message, the naive Kafka consume anchor."""
    latency_rate: int
    """Events per second published during the latency benchmark."""
    latency_seconds: float

    @property
    def replay_events(self) -> int:
        return self.replay_capsules * self.replay_events_per_capsule


FULL = Scale(
    runs=3,
    throughput_events=100_000,
    batch_size=500,
    publish_batch_size=5_000,
    replay_capsules=100_000,
    replay_events_per_capsule=10,
    memory_events=1_000_000,
    memory_baseline_after=100_000,
    naive_events=10_000,
    commit_each_events=5_000,
    latency_rate=5_000,
    latency_seconds=30.0,
)

SMOKE = Scale(
    runs=1,
    throughput_events=2_000,
    batch_size=500,
    publish_batch_size=1_000,
    replay_capsules=500,
    replay_events_per_capsule=10,
    memory_events=5_000,
    memory_baseline_after=500,
    naive_events=300,
    commit_each_events=300,
    latency_rate=1_000,
    latency_seconds=2.0,
)
