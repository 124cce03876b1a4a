"""A Kafka consumer worker that records when its handler starts on each event; run by
`benchmarks.kafka`.

It joins a new consumer group positioned at the end of every event topic, prints `ready` once
it owns partitions, then reads from standard input how many events to expect, handles them
with a handler that only notes `time.monotonic_ns()` (the same clock in every process on
Linux), and writes {event id: nanoseconds} as JSON to `--output`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.kafka import start_group_at_end
from forge.config import ForgeSettings
from forge.logging import configure_logging
from forge.models.events import Event, EventType
from forge.runtime import Runtime

WAIT_SECONDS = 240


async def consume(settings: ForgeSettings) -> dict[str, int]:
    """Handle the expected events; return when each one's handler started, by event id."""
    group_id = f"bench-latency-{uuid.uuid4().hex[:8]}"
    await start_group_at_end(settings, group_id)
    handled: dict[str, int] = {}

    async def note(event: Event[Any]) -> None:
        handled[str(event.id)] = time.monotonic_ns()

    async with Runtime(settings) as runtime:
        consumer = runtime.consumer(group_id)
        for event_type in EventType:
            consumer.register_handler(event_type, note, name="note")
        await consumer.start()
        loop = asyncio.create_task(consumer.run())
        try:
            deadline = time.monotonic() + WAIT_SECONDS
            while not getattr(consumer, "assignment", None):
                if loop.done() or time.monotonic() > deadline:
                    raise RuntimeError("the consumer got no partitions")
                await asyncio.sleep(0.05)
            print("ready", flush=True)
            expected = int(await asyncio.to_thread(sys.stdin.readline))
            while len(handled) < expected:
                if loop.done() or time.monotonic() > deadline:
                    raise RuntimeError(f"handled {len(handled)} of {expected} events")
                await asyncio.sleep(0.05)
        finally:
            await consumer.stop()
            await loop
    return handled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap address")
    parser.add_argument("--dsn", required=True, help="PostgreSQL DSN of the stores")
    parser.add_argument("--data-dir", type=Path, required=True, help="Forge's data folder")
    parser.add_argument("--output", type=Path, required=True, help="where to write the JSON")
    arguments = parser.parse_args()
    configure_logging("WARNING")
    settings = ForgeSettings(
        data_dir=arguments.data_dir,
        event_backend="kafka",
        store_backend="postgres",
        kafka_bootstrap_servers=arguments.bootstrap,
        postgres_dsn=arguments.dsn,
    )
    handled = asyncio.run(consume(settings))
    arguments.output.write_text(json.dumps(handled))


if __name__ == "__main__":
    main()
