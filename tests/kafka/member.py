"""A consumer group member run as its own process by the Kafka tests.

Usage: python -m tests.kafka.member BOOTSTRAP GROUP_ID OUTPUT_FILE

Handles capsule.updated events and appends one line per handled event to OUTPUT_FILE:
`handled <event id> <capsule id> <old version>`, and one line each time its partition
assignment changes: `assigned <topic>:<partition> ...`. Each line is flushed at once, so it is
in the file before the handler returns. Runs until SIGTERM or SIGKILL.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from forge.config import ForgeSettings
from forge.infrastructure.kafka.consumer import KafkaEventConsumer
from forge.models.events import Event, EventType

HANDLER_SECONDS = 0.02
"""Time each event takes, so that a batch is still in progress when the test kills a member."""


async def main(bootstrap: str, group_id: str, output: Path) -> None:
    settings = ForgeSettings(
        kafka_bootstrap_servers=bootstrap,
        consumer_session_timeout_seconds=6.0,
        consumer_stop_timeout_seconds=5.0,
        consumer_batch_size=20,
    )
    consumer = KafkaEventConsumer(group_id, settings=settings)
    lines = output.open("a", buffering=1)

    async def handle(event: Event[Any]) -> None:
        await asyncio.sleep(HANDLER_SECONDS)
        lines.write(f"handled {event.id} {event.resource_id} {event.data.old_version}\n")

    consumer.register_handler(EventType.CAPSULE_UPDATED, handle)

    async def report_assignment() -> None:
        reported: set[tuple[str, int]] | None = None
        while True:
            if consumer.assignment != reported:
                reported = consumer.assignment
                names = " ".join(f"{topic}:{partition}" for topic, partition in sorted(reported))
                lines.write(f"assigned {names}\n")
            await asyncio.sleep(0.1)

    await consumer.start()
    loop = asyncio.get_running_loop()
    runner = asyncio.create_task(consumer.run())
    reporter = asyncio.create_task(report_assignment())
    loop.add_signal_handler(signal.SIGTERM, runner.cancel)
    try:
        await runner
    except asyncio.CancelledError:
        pass
    finally:
        reporter.cancel()
        await consumer.stop()
        lines.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
