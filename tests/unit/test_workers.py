"""Worker: a failed or cancelled consumer loop is logged, kept as last_error, and restarted."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from forge import workers as workers_module
from forge.exceptions import StorageUnavailableError
from forge.workers import Worker
from tests.helpers import wait_until


class FakeConsumer:
    """A consumer that counts its runs and ends each run as `outcome` gives."""

    def __init__(self, outcome: str, runs: list[str]) -> None:
        self._outcome = outcome
        self._runs = runs

    async def start(self) -> None:
        return None

    async def run(self) -> None:
        self._runs.append(self._outcome)
        if self._outcome == "cancelled":
            # What a handler does when it raises CancelledError for one event.
            raise asyncio.CancelledError
        if self._outcome == "failed":
            raise StorageUnavailableError("database down")
        if self._outcome == "returned":
            return
        await asyncio.Event().wait()

    async def stop(self) -> None:
        return None


@pytest.mark.parametrize(
    ("outcome", "error"),
    [
        ("cancelled", "RuntimeError: the consumer loop was cancelled"),
        ("failed", "StorageUnavailableError: database down"),
        ("returned", "RuntimeError: the consumer loop ended before stop() was called"),
    ],
)
async def test_ended_loop_logged_and_restarted_after_pause(
    monkeypatch: pytest.MonkeyPatch, outcome: str, error: str
) -> None:
    monkeypatch.setattr(workers_module, "_WORKER_RESTART_SECONDS", 0.2)
    runs: list[str] = []
    worker = Worker("recorder", lambda: FakeConsumer(outcome, runs))

    with capture_logs() as logs:
        worker.start()
        await wait_until(lambda: len(runs) == 2, "the loop was restarted once")
        await worker.stop()

    assert worker.last_error is not None
    assert worker.last_error.startswith(error)
    failures = [entry for entry in logs if entry["event"] == "worker_failed"]
    assert failures[0]["restart_in_seconds"] == 0.2
    # A restart without the pause would have run the loop hundreds of times by now.
    assert len(runs) <= 3


async def test_stopped_worker_ends_without_error() -> None:
    runs: list[str] = []
    worker = Worker("recorder", lambda: FakeConsumer("runs", runs))

    worker.start()
    await wait_until(lambda: runs == ["runs"], "the loop started")
    await worker.stop()

    assert worker.last_error is None
    assert worker.running is False
