"""Workers: the consumer loops a Forge process runs beside (or instead of) the HTTP API.

Each worker is supervised: when its loop fails it is logged, kept as the worker's last error
for the health check, and restarted after a pause, so that one failure does not stop the
process and is never lost silently.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from forge.core.events.ports import EventConsumer
from forge.exceptions import ForgeError
from forge.logging import get_logger

logger = get_logger(__name__)

_WORKER_RESTART_SECONDS = 5.0


class Worker:
    """A consumer loop run in the server, restarted after a failure, with its last error kept."""

    def __init__(self, name: str, make_consumer: Callable[[], EventConsumer]) -> None:
        self.name = name
        self._make_consumer = make_consumer
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.last_error: str | None = None
        self.running = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"forge-worker-{self.name}")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task

    async def _supervise(self) -> None:
        while not self._stopping.is_set():
            consumer = self._make_consumer()
            try:
                # A start may wait for a broker that is down; stop() must not wait for it.
                starting = asyncio.create_task(consumer.start())
                stopping = asyncio.create_task(self._stopping.wait())
                await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not starting.done():
                    await consumer.stop()
                    starting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await starting
                    return
                stopping.cancel()
                starting.result()
                self.running = True
                self.last_error = None
                run = asyncio.create_task(consumer.run())
                stop = asyncio.create_task(self._stopping.wait())
                await asyncio.wait({run, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                await consumer.stop()
                if run.done() and not run.cancelled() and run.exception() is not None:
                    raise run.exception()  # type: ignore[misc]
                if run.done() and not self._stopping.is_set():
                    # Restarted at once, such a loop would spin: a handler that raises
                    # CancelledError for one event cancels every run.
                    raise RuntimeError(
                        "the consumer loop was cancelled, for example by a handler that raised "
                        "asyncio.CancelledError"
                        if run.cancelled()
                        else "the consumer loop ended before stop() was called"
                    )
            except Exception as error:
                self.last_error = f"{type(error).__name__}: {error}"
                logger.error(
                    "worker_failed",
                    worker=self.name,
                    error=self.last_error,
                    restart_in_seconds=_WORKER_RESTART_SECONDS,
                )
                with contextlib.suppress(ForgeError):
                    await consumer.stop()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), _WORKER_RESTART_SECONDS)
            finally:
                self.running = False
