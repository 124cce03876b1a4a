"""Kafka benchmarks: publish and consume throughput against raw clients, and end-to-end latency.

Forge runs as shipped: `Runtime` with the Kafka event backend and the PostgreSQL stores, so
`EventService.publish_many` seals personal data with keys kept in PostgreSQL, and consumers
park records in PostgreSQL's dead-letter store. Anchors, in the same run on the same broker:

- publish: confluent-kafka's producer (librdkafka, written in C), idempotent, `acks=all`,
  the same records, flushed once at the end. The naive anchor awaits aiokafka's
  `send_and_wait` for each event.
- consume: aiokafka's `getmany` with one commit per fetched batch, and with one commit per
  message. Neither decodes the values. A third reads like the first and validates each value
  with its pydantic event class, for context.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from benchmarks.harness import Row, Summary, at_most, freeze_fixtures, ratio_at_least
from benchmarks.scale import Scale
from benchmarks.services import Server, kafka_server, postgres_server, provisioned
from forge.config import ForgeSettings
from forge.infrastructure.kafka.common import event_topics
from forge.infrastructure.kafka.producer import to_record
from forge.models.events import EVENT_CLASSES, Event, EventType

GROUP = "kafka"
LATENCY_P50_MS = 5.0
LATENCY_P99_MS = 25.0
LATENCY_TIMEOUT_SECONDS = 300
POLL_MS = 500
Record = tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]

ROWS: list[tuple[str, str, list[Any]]] = [
    ("Kafka publish", "events/s", [ratio_at_least(0.5, "confluent-kafka")]),
    ("Kafka publish vs naive", "events/s", [ratio_at_least(20, "send_and_wait per event")]),
    ("Kafka consume", "events/s", [ratio_at_least(0.5, "aiokafka batch commit")]),
    ("Kafka consume vs commit per message", "events/s", [ratio_at_least(20, "commit per message")]),
    ("Kafka latency p50", "ms", [at_most(LATENCY_P50_MS, "ms")]),
    ("Kafka latency p99", "ms", [at_most(LATENCY_P99_MS, "ms")]),
]


def missing_requirements() -> str | None:
    """Return why the Kafka benchmarks cannot run here, or None when they can."""
    for module in (
        "forge.infrastructure.kafka.producer",
        "forge.infrastructure.kafka.consumer",
        "forge.infrastructure.postgres.audit_store",
    ):
        if importlib.util.find_spec(module) is None:
            return f"{module} does not exist yet"
    if importlib.util.find_spec("confluent_kafka") is None:
        return "confluent-kafka is not installed: pip install -e '.[bench]'"
    return None


def settings_for(kafka: Server, postgres: Server, data_dir: Path) -> ForgeSettings:
    return ForgeSettings(
        data_dir=data_dir,
        event_backend="kafka",
        store_backend="postgres",
        kafka_bootstrap_servers=kafka.endpoint,
        postgres_dsn=postgres.endpoint,
    )


def kafka_records(events: Sequence[Event[Any]], max_bytes: int) -> list[Record]:
    """Return the (topic, key, value, headers) records Forge's producer sends for `events`."""
    records: list[Record] = []
    for event in events:
        record = to_record(event, max_bytes)
        records.append((record.topic, record.key, record.value, record.headers))
    return records


async def start_group_at_end(settings: ForgeSettings, group_id: str) -> None:
    """Commit the end of every event topic partition for `group_id`, so it skips older events."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topic, partition)
            for topic in event_topics()
            for partition in range(settings.kafka_topic_partitions)
        ]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        await consumer.commit(ends)
    finally:
        await consumer.stop()


# Publish ---------------------------------------------------------------------------------------


def confluent_publish(bootstrap: str, records: Sequence[Record]) -> float:
    """Produce every record with confluent-kafka and flush once; return the seconds."""
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            # Errors only: a fresh broker makes librdkafka warn once that it retries.
            "log_level": 3,
        }
    )
    failures: list[str] = []

    def delivered(error: Any, message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    started = time.perf_counter()
    for topic, key, value, headers in records:
        while True:
            try:
                producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=delivered
                )
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    remaining = producer.flush(120)
    seconds = time.perf_counter() - started
    if remaining or failures:
        raise RuntimeError(f"confluent-kafka: {remaining} unsent, failures: {failures[:3]}")
    return seconds


async def naive_publish(bootstrap: str, records: Sequence[Record]) -> float:
    """Send each record with aiokafka's send_and_wait, one after another; return the seconds."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        started = time.perf_counter()
        for topic, key, value, headers in records:
            await producer.send_and_wait(topic, value=value, key=key, headers=headers)
        return time.perf_counter() - started
    finally:
        await producer.stop()


async def forge_publish(settings: ForgeSettings, events: Sequence[Event[Any]], batch: int) -> float:
    from forge.runtime import Runtime

    async with Runtime(settings) as runtime:
        started = time.perf_counter()
        for start in range(0, len(events), batch):
            await runtime.events.publish_many(events[start : start + batch])
        return time.perf_counter() - started


# Consume ---------------------------------------------------------------------------------------


async def raw_consume(
    bootstrap: str, group_id: str, limit: int, *, commit_each: bool, validate: bool = False
) -> tuple[float, int]:
    """Read up to `limit` records of all event topics with aiokafka in `group_id`.

    Commits once per fetched batch, or after every message with `commit_each`. With
    `validate`, each value is parsed with orjson and validated by its pydantic event class
    (`model_validate`), as a hand-written consumer of these models would. Returns (seconds,
    records read).
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        *event_topics(),
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        count = 0
        started = time.perf_counter()
        while count < limit:
            batches = await consumer.getmany(timeout_ms=POLL_MS, max_records=500)
            if not batches:
                if time.perf_counter() - started > 120:
                    raise RuntimeError(f"raw consumer read only {count} of {limit} records")
                continue
            for tp, messages in batches.items():
                for message in messages:
                    count += 1
                    if validate:
                        values = orjson.loads(message.value)
                        EVENT_CLASSES[EventType(values["type"])].model_validate(values)
                    if commit_each:
                        await consumer.commit(
                            {TopicPartition(tp.topic, tp.partition): message.offset + 1}
                        )
                    if count >= limit:
                        break
                if count >= limit:
                    break
            if not commit_each:
                await consumer.commit()
        return time.perf_counter() - started, count
    finally:
        await consumer.stop()


async def forge_consume(settings: ForgeSettings, group_id: str, expected: int) -> float:
    from forge.runtime import Runtime

    async def noop(event: Event[Any]) -> None:
        return None

    async with Runtime(settings) as runtime:
        consumer = runtime.consumer(group_id)
        for event_type in EventType:
            consumer.register_handler(event_type, noop, name="noop")
        await consumer.start()
        try:
            started = time.perf_counter()
            handled = await consumer.drain(timeout=600)
            seconds = time.perf_counter() - started
        finally:
            await consumer.stop()
    if handled != expected:
        raise RuntimeError(f"the Forge consumer handled {handled} of {expected} records")
    return seconds


# Latency ---------------------------------------------------------------------------------------


async def measure_latency(
    settings: ForgeSettings, kafka: Server, postgres: Server, rate: int, seconds: float
) -> dict[str, Any]:
    """Publish `rate` events/s for `seconds` while a worker process handles them.

    Returns the latency percentiles in ms, from just before `publish_many` to the first line
    of the handler, and the rate actually published.
    """
    from benchmarks.eventgen import EventGenerator
    from forge.runtime import Runtime

    with tempfile.TemporaryDirectory(prefix="forge-bench-latency-") as folder:
        output = Path(folder) / "handled.json"
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.kafka_latency_worker",
            "--bootstrap",
            kafka.endpoint,
            "--dsn",
            postgres.endpoint,
            "--data-dir",
            folder,
            "--output",
            str(output),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=Path(__file__).parent.parent,
        )
        assert worker.stdin is not None and worker.stdout is not None
        try:
            ready = await asyncio.wait_for(worker.stdout.readline(), LATENCY_TIMEOUT_SECONDS)
            if ready.strip() != b"ready":
                raise RuntimeError(f"latency worker did not start: {ready!r}")
            total = int(rate * seconds)
            events = EventGenerator(seed=13).events(total)
            freeze_fixtures()
            sent: dict[str, int] = {}
            async with Runtime(settings) as runtime:
                published = 0
                started = time.monotonic()
                while published < total:
                    due = min(total, int((time.monotonic() - started) * rate) + 1)
                    if due > published:
                        chunk = events[published:due]
                        now = time.monotonic_ns()
                        for event in chunk:
                            sent[str(event.id)] = now
                        await runtime.events.publish_many(chunk)
                        published = due
                    await asyncio.sleep(0.002)
                publish_seconds = time.monotonic() - started
            worker.stdin.write(f"{total}\n".encode())
            await worker.stdin.drain()
            await asyncio.wait_for(worker.wait(), LATENCY_TIMEOUT_SECONDS)
            if worker.returncode != 0:
                raise RuntimeError(f"latency worker exited with {worker.returncode}")
            handled: dict[str, int] = json.loads(await asyncio.to_thread(output.read_text))
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
    latencies = sorted(
        (handled[event_id] - sent_ns) / 1e6
        for event_id, sent_ns in sent.items()
        if event_id in handled
    )
    if len(latencies) < len(sent):
        raise RuntimeError(f"the worker handled {len(latencies)} of {len(sent)} events")
    return {
        "p50_ms": statistics.quantiles(latencies, n=100)[49],
        "p99_ms": statistics.quantiles(latencies, n=100)[98],
        "max_ms": latencies[-1],
        "events": len(latencies),
        "published_per_second": len(sent) / publish_seconds,
    }


# Rows ------------------------------------------------------------------------------------------


def _skipped(reason: str) -> list[Row]:
    return [
        Row(name, GROUP, unit, targets=targets, status="SKIP", note=reason)
        for name, unit, targets in ROWS
    ]


def run(scale: Scale, events: Sequence[Event[Any]], *, provision: bool) -> list[Row]:
    reason = missing_requirements()
    if reason is not None:
        return _skipped(reason)
    try:
        with (
            provisioned(kafka_server(), start=provision) as kafka,
            provisioned(postgres_server(), start=provision) as postgres,
            tempfile.TemporaryDirectory(prefix="forge-bench-kafka-") as folder,
        ):
            return _measure(scale, events, kafka, postgres, Path(folder))
    except Exception as error:  # reported in the table; the other benchmarks still run
        return [
            Row(
                name,
                GROUP,
                unit,
                targets=targets,
                status="ERROR",
                note=f"{type(error).__name__}: {error}",
            )
            for name, unit, targets in ROWS
        ]


def _measure(
    scale: Scale, events: Sequence[Event[Any]], kafka: Server, postgres: Server, data_dir: Path
) -> list[Row]:
    from forge.infrastructure.kafka.admin import ensure_topics

    settings = settings_for(kafka, postgres, data_dir)
    asyncio.run(ensure_topics(settings))
    records = kafka_records(events, settings.max_event_bytes)
    freeze_fixtures()
    # Warm-up, not measured: new topics get their leaders and the producers their ids.
    warm_up = min(len(events), 1_000)
    confluent_publish(kafka.endpoint, records[:warm_up])
    asyncio.run(forge_publish(settings, events[:warm_up], scale.publish_batch_size))
    naive_count = min(len(records), scale.naive_events)
    count = len(events)
    figures: dict[str, list[float]] = {
        name: []
        for name in (
            "publish",
            "publish_small",
            "confluent",
            "naive",
            "consume",
            "consume_batch",
            "consume_each",
            "consume_validated",
            "p50",
            "p99",
        )
    }
    latency_reports: list[dict[str, Any]] = []
    # Every run publishes 3 * count + naive_count events. Consumer groups positioned at the
    # end of the topics before that read exactly those, whatever earlier runs left there.
    published = 3 * count + naive_count
    each_count = min(published, scale.commit_each_events)
    for _ in range(scale.runs):
        groups = {
            name: f"bench-{name}-{uuid.uuid4().hex[:8]}"
            for name in ("batch", "forge", "each", "validated")
        }
        for group_id in groups.values():
            asyncio.run(start_group_at_end(settings, group_id))

        figures["confluent"].append(count / confluent_publish(kafka.endpoint, records))
        figures["publish"].append(
            count / asyncio.run(forge_publish(settings, events, scale.publish_batch_size))
        )
        figures["publish_small"].append(
            count / asyncio.run(forge_publish(settings, events, scale.batch_size))
        )
        figures["naive"].append(
            naive_count / asyncio.run(naive_publish(kafka.endpoint, records[:naive_count]))
        )

        seconds, read = asyncio.run(
            raw_consume(kafka.endpoint, groups["batch"], published, commit_each=False)
        )
        figures["consume_batch"].append(read / seconds)
        figures["consume"].append(
            published / asyncio.run(forge_consume(settings, groups["forge"], published))
        )
        seconds, read = asyncio.run(
            raw_consume(kafka.endpoint, groups["each"], each_count, commit_each=True)
        )
        figures["consume_each"].append(read / seconds)
        seconds, read = asyncio.run(
            raw_consume(
                kafka.endpoint, groups["validated"], published, commit_each=False, validate=True
            )
        )
        figures["consume_validated"].append(read / seconds)

        report = asyncio.run(
            measure_latency(settings, kafka, postgres, scale.latency_rate, scale.latency_seconds)
        )
        latency_reports.append(report)
        figures["p50"].append(report["p50_ms"])
        figures["p99"].append(report["p99_ms"])

    publish = Summary.of(figures["publish"])
    small_vs_naive = statistics.median(figures["publish_small"]) / statistics.median(
        figures["naive"]
    )
    consume = Summary.of(figures["consume"])
    batch = f"{count:,} events, {scale.publish_batch_size:,} per publish_many call"
    latency_note = (
        f"publish_many to handler start in another process, {scale.latency_rate:,} events/s for "
        f"{scale.latency_seconds:g} s; published "
        f"{statistics.median(r['published_per_second'] for r in latency_reports):,.0f} events/s"
    )
    return [
        Row(
            "Kafka publish",
            GROUP,
            "events/s",
            publish,
            Summary.of(figures["confluent"]),
            "confluent-kafka",
            ROWS[0][2],
            note=f"EventService.publish_many, idempotent, acks=all, {batch}",
        ),
        Row(
            f"Kafka publish, {scale.batch_size} per call",
            GROUP,
            "events/s",
            Summary.of(figures["publish_small"]),
            Summary.of(figures["confluent"]),
            "confluent-kafka",
            [],
            note=(
                f"the row above with {scale.batch_size} events per call; "
                f"{small_vs_naive:.2f}x send_and_wait per event"
            ),
        ),
        Row(
            "Kafka publish vs naive",
            GROUP,
            "events/s",
            publish,
            Summary.of(figures["naive"]),
            "send_and_wait per event",
            ROWS[1][2],
            note=f"anchor: aiokafka send_and_wait awaited per event, {naive_count:,} events",
        ),
        Row(
            "Kafka consume",
            GROUP,
            "events/s",
            consume,
            Summary.of(figures["consume_batch"]),
            "aiokafka getmany, commit per batch",
            ROWS[2][2],
            note=(
                f"KafkaEventConsumer.drain, no-op handler, the {published:,} events of a run; "
                "anchor reads them with commit per batch"
            ),
        ),
        Row(
            "Kafka consume vs commit per message",
            GROUP,
            "events/s",
            consume,
            Summary.of(figures["consume_each"]),
            "aiokafka commit per message",
            ROWS[3][2],
            note=f"anchor: aiokafka committing after each message, first {each_count:,} records",
        ),
        Row(
            "Kafka consume vs getmany + pydantic",
            GROUP,
            "events/s",
            consume,
            Summary.of(figures["consume_validated"]),
            "getmany, model_validate",
            [],
            note=(
                "anchor: aiokafka getmany, commit per batch, each value parsed with orjson and "
                "validated by its event class"
            ),
        ),
        Row(
            "Kafka latency p50",
            GROUP,
            "ms",
            Summary.of(figures["p50"]),
            targets=ROWS[4][2],
            details={"runs": latency_reports},
            note=latency_note,
        ),
        Row(
            "Kafka latency p99",
            GROUP,
            "ms",
            Summary.of(figures["p99"]),
            targets=ROWS[5][2],
            note=latency_note,
        ),
    ]
