"""A consumer worker that reports its resident size as JSON; run by `benchmarks.memory`.

It consumes the SQLite event log in `--data-dir` with a no-op handler until `--events` events
are handled, sampling its resident set size every 50 ms from /proc/self/statm.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from forge.config import ForgeSettings
from forge.infrastructure.sqlite.consumer import SqliteEventConsumer
from forge.logging import configure_logging
from forge.models.events import Event, EventType
from forge.runtime import Runtime

SAMPLE_INTERVAL_SECONDS = 0.05
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """Return this process's resident set size in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE_SIZE


async def _noop(event: Event[Any]) -> None:
    return None


async def consume(
    data_dir: Path, events: int, baseline_after: int, group_id: str
) -> dict[str, Any]:
    async with Runtime(ForgeSettings(data_dir=data_dir)) as runtime:
        consumer = runtime.consumer(group_id)
        if not isinstance(consumer, SqliteEventConsumer):
            raise TypeError(f"expected the SQLite consumer, got {type(consumer).__name__}")
        for event_type in EventType:
            consumer.register_handler(event_type, _noop, name="noop")
        await consumer.start()
        start_rss = resident_bytes()
        started = time.perf_counter()
        loop = asyncio.create_task(consumer.run())
        baseline: int | None = None
        baseline_handled = 0
        peak = 0
        samples: list[tuple[int, int]] = []
        try:
            while consumer.handled_count < events:
                await asyncio.sleep(SAMPLE_INTERVAL_SECONDS)
                if loop.done():
                    loop.result()
                    raise RuntimeError("the consumer loop ended before all events were handled")
                rss = resident_bytes()
                handled = consumer.handled_count
                samples.append((handled, rss))
                if baseline is None:
                    if handled >= baseline_after:
                        baseline, baseline_handled = rss, handled
                else:
                    peak = max(peak, rss)
            seconds = time.perf_counter() - started
            final = resident_bytes()
        finally:
            await consumer.stop()
            await loop
    if baseline is None:
        raise RuntimeError("the worker finished before a baseline sample was taken")
    peak = max(peak, final)
    return {
        "events": consumer.handled_count,
        "seconds": seconds,
        "events_per_second": consumer.handled_count / seconds,
        "start_rss_bytes": start_rss,
        "baseline_rss_bytes": baseline,
        "baseline_handled": baseline_handled,
        "peak_rss_bytes": peak,
        "final_rss_bytes": final,
        "peak_growth_percent": 100.0 * (peak - baseline) / baseline,
        "final_growth_percent": 100.0 * (final - baseline) / baseline,
        "samples": samples[:: max(1, len(samples) // 50)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True, help="folder of forge.sqlite3")
    parser.add_argument("--events", type=int, required=True, help="events to handle")
    parser.add_argument(
        "--baseline-after", type=int, required=True, help="events handled before the baseline"
    )
    parser.add_argument("--group-id", required=True, help="consumer group of this worker")
    arguments = parser.parse_args()
    configure_logging("WARNING")
    report = asyncio.run(
        consume(arguments.data_dir, arguments.events, arguments.baseline_after, arguments.group_id)
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
