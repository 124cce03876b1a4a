"""Break one part at a time while capsules are being created, then count what survived.

For every fault: each capsule the API acknowledged (201) must have exactly one
`capsule.created` event in the audit trail (lost = 0, duplicates = 0). The distributed faults
run `forge serve --no-workers` and the workers as separate `forge worker` processes against
the real Kafka broker and PostgreSQL server of the test run; the disk-full fault runs the
embedded default on a 3 MiB tmpfs.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.faults.conftest import FaultResult
from tests.processes import (
    ENVIRONMENT_AT_START,
    REPOSITORY,
    CapsuleWriter,
    ForgeProcess,
    Server,
    wait_for,
)

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

POSTGRES_DSN = ENVIRONMENT_AT_START.get(
    "FORGE_POSTGRES_DSN", "postgresql://forge@127.0.0.1:54329/forge"
)
KAFKA_SERVERS = ENVIRONMENT_AT_START.get("FORGE_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
RECOVERY_TIMEOUT_SECONDS = 120.0


def _distributed_env() -> dict[str, str]:
    env = dict(ENVIRONMENT_AT_START)
    env.update(
        {
            "FORGE_EVENT_BACKEND": "kafka",
            "FORGE_STORE_BACKEND": "postgres",
            "FORGE_POSTGRES_DSN": POSTGRES_DSN,
            "FORGE_KAFKA_BOOTSTRAP_SERVERS": KAFKA_SERVERS,
            "FORGE_CONSUMER_RETRY_BACKOFF_SECONDS": "0.05",
            "FORGE_LOG_LEVEL": "INFO",
        }
    )
    return env


def _script(name: str, *arguments: str, timeout: float = 180.0) -> None:
    completed = subprocess.run(
        [str(REPOSITORY / "scripts" / name), *arguments],
        env=ENVIRONMENT_AT_START,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, f"{name} {arguments}: {completed.stderr[-2000:]}"


def _audit_counts(resource_ids: list[str]) -> tuple[int, int]:
    """Return (acknowledged capsules with a created event, created events beyond one each)."""

    async def query() -> tuple[int, int]:
        connection = await asyncpg.connect(POSTGRES_DSN, timeout=10)
        try:
            rows = await connection.fetch(
                "SELECT resource_id, count(*) AS events FROM audit_trail "
                "WHERE event_type = 'capsule.created' AND resource_id = ANY($1::uuid[]) "
                "GROUP BY resource_id",
                resource_ids,
            )
        finally:
            await connection.close()
        return len(rows), sum(row["events"] - 1 for row in rows)

    return asyncio.run(query())


def _wait_until_recorded(writer: CapsuleWriter) -> tuple[int, int]:
    acknowledged = writer.acknowledged
    try:
        wait_for(
            lambda: _audit_counts(acknowledged)[0] == len(acknowledged),
            timeout=RECOVERY_TIMEOUT_SECONDS,
            interval=1.0,
        )
    except AssertionError:
        pass  # the counts below show what is missing
    return _audit_counts(acknowledged)


def _record(
    results: list[FaultResult], fault: str, writer: CapsuleWriter, counts: tuple[int, int]
) -> FaultResult:
    in_audit, duplicates = counts
    result = FaultResult(
        fault=fault,
        acknowledged=len(writer.acknowledged),
        in_audit_trail=in_audit,
        duplicates=duplicates,
        lost=len(writer.acknowledged) - in_audit,
        failed_requests=writer.failed,
    )
    results.append(result)
    return result


@pytest.fixture
def distributed(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An API process and separate audit-recorder and outbox-relay worker processes."""
    env = _distributed_env()
    _script("kafka-broker", "start")
    setup = subprocess.run(
        ["python", "-m", "forge.cli.main", "kafka", "topics", "ensure"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert setup.returncode == 0, setup.stderr
    processes: dict[str, Any] = {
        "api": Server(tmp_path / "api.log", env, workers=False),
        "recorder": ForgeProcess(
            ["worker", "--only", "audit-recorder"], tmp_path / "recorder.log", env
        ),
        "relay": ForgeProcess(["worker", "--only", "outbox-relay"], tmp_path / "relay.log", env),
    }
    for process in processes.values():
        process.start()
    for name in ("recorder", "relay"):
        worker = processes[name]
        wait_for(lambda worker=worker: "Workers running" in worker.output(), timeout=60)
    yield processes
    for process in processes.values():
        process.stop()


def _assert_nothing_lost(result: FaultResult, processes: dict[str, Any]) -> None:
    logs = "\n".join(
        f"--- {name}\n{process.output()[-3000:]}" for name, process in processes.items()
    )
    assert result.acknowledged > 0, logs
    assert result.lost == 0, logs
    assert result.duplicates == 0, logs


def test_broker_killed_while_publishing(
    distributed: dict[str, Any], fault_results: list[FaultResult]
) -> None:
    writer = CapsuleWriter(distributed["api"].url, max_requests=3000)
    writer.start()
    wait_for(lambda: len(writer.acknowledged) >= 50, timeout=30)
    _script("kafka-broker", "kill")
    # The API keeps acknowledging: capsules and their outbox rows go to PostgreSQL.
    acknowledged_at_kill = len(writer.acknowledged)
    wait_for(lambda: len(writer.acknowledged) >= acknowledged_at_kill + 50, timeout=30)
    _script("kafka-broker", "start")
    time.sleep(1)
    writer.stop()

    result = _record(
        fault_results, "Kafka broker SIGKILL, restarted", writer, _wait_until_recorded(writer)
    )
    _assert_nothing_lost(result, distributed)


@pytest.mark.parametrize(
    ("worker", "fault"),
    [
        ("recorder", "audit recorder SIGKILL mid-batch, restarted"),
        ("relay", "outbox relay SIGKILL, restarted"),
    ],
)
def test_worker_killed_then_restarted(
    distributed: dict[str, Any], fault_results: list[FaultResult], worker: str, fault: str
) -> None:
    writer = CapsuleWriter(distributed["api"].url, max_requests=3000)
    writer.start()
    wait_for(lambda: len(writer.acknowledged) >= 100, timeout=30)
    distributed[worker].kill()
    wait_for(lambda: len(writer.acknowledged) >= 200, timeout=30)
    distributed[worker].start()
    time.sleep(1)
    writer.stop()

    result = _record(fault_results, fault, writer, _wait_until_recorded(writer))
    _assert_nothing_lost(result, distributed)


def test_postgres_restarted_while_writing(
    distributed: dict[str, Any], fault_results: list[FaultResult]
) -> None:
    writer = CapsuleWriter(distributed["api"].url, max_requests=3000)
    writer.start()
    wait_for(lambda: len(writer.acknowledged) >= 100, timeout=30)
    _script("postgres-server", "restart")
    acknowledged_at_restart = len(writer.acknowledged)
    wait_for(lambda: len(writer.acknowledged) >= acknowledged_at_restart + 100, timeout=60)
    writer.stop()

    result = _record(fault_results, "PostgreSQL restarted", writer, _wait_until_recorded(writer))
    _assert_nothing_lost(result, distributed)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs: writes on it really fail with ENOSPC once it is full."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    assert mounted.returncode == 0, (
        f"mounting a small tmpfs failed ({mounted.stderr.strip()}); the disk-full test needs "
        "root, as in CI."
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_sqlite_disk_full(
    small_disk: Path, tmp_path: Path, fault_results: list[FaultResult]
) -> None:
    env = dict(ENVIRONMENT_AT_START)
    for name in [name for name in env if name.startswith("FORGE_")]:
        del env[name]
    env["FORGE_DATA_DIR"] = str(small_disk / "data")
    env["FORGE_CONSUMER_POLL_INTERVAL_SECONDS"] = "0.02"
    server = Server(tmp_path / "embedded.log", env)
    server.start()
    try:
        # Ballast takes most of the space; freeing it later lets the recorder catch up.
        ballast = small_disk / "ballast"
        ballast.write_bytes(b"\0" * (1024 * 1024))
        writer = CapsuleWriter(server.url, max_requests=2000, content="x" * 2000)
        writer.start()
        wait_for(lambda: writer.failed >= 20, timeout=60)
        writer.stop()
        assert len(writer.acknowledged) > 0, server.output()[-3000:]

        health = httpx.get(f"{server.url}/health", timeout=5)
        ballast.unlink()

        def recorded() -> int:
            response = httpx.get(
                f"{server.url}/audit",
                params={"event_type": "capsule.created", "limit": 1000},
                timeout=10,
            )
            ids = {entry["event"]["resource_id"] for entry in response.json()["entries"]}
            return len(ids & set(writer.acknowledged))

        try:
            wait_for(lambda: recorded() == len(writer.acknowledged), timeout=60, interval=0.5)
        except AssertionError:
            pass
        in_audit = recorded()
        stored = httpx.get(f"{server.url}/capsules", params={"limit": 1000}, timeout=10).json()
    finally:
        server.stop()

    stored_ids = {capsule["id"] for capsule in stored}
    result = FaultResult(
        fault="SQLite disk full (3 MiB tmpfs)",
        acknowledged=len(writer.acknowledged),
        in_audit_trail=in_audit,
        duplicates=0,
        lost=len(writer.acknowledged) - in_audit,
        failed_requests=writer.failed,
    )
    fault_results.append(result)
    assert health.status_code in (200, 503)
    assert set(writer.acknowledged) <= stored_ids, server.output()[-3000:]
    assert result.lost == 0, server.output()[-3000:]


def test_publish_while_broker_down_fails_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from forge.config import ForgeSettings
    from forge.exceptions import BatchPublishError, BrokerUnavailableError
    from forge.infrastructure.kafka import producer as producer_module
    from tests.helpers import capsule_created

    monkeypatch.setattr(producer_module, "ACK_GRACE_SECONDS", 0.5)
    monkeypatch.setattr(producer_module, "STOP_TIMEOUT_SECONDS", 2.0)
    settings = ForgeSettings(data_dir=tmp_path, kafka_bootstrap_servers=KAFKA_SERVERS)

    async def publish_with_broker_down() -> tuple[BatchPublishError, float, float]:
        producer = producer_module.KafkaEventProducer(settings=settings, request_timeout_ms=3000)
        await producer.start()
        # A producer that ran for a while has the partition's leader in its metadata.
        await producer.publish(capsule_created())
        _script("kafka-broker", "kill")
        began = time.monotonic()
        with pytest.raises(BatchPublishError) as caught:
            await producer.publish_batch([capsule_created() for _ in range(20)])
        failed_after = time.monotonic() - began
        with pytest.raises(BrokerUnavailableError):
            await producer.probe()
        began = time.monotonic()
        await producer.stop()
        return caught.value, failed_after, time.monotonic() - began

    try:
        error, failed_after, stopped_after = asyncio.run(publish_with_broker_down())
    finally:
        _script("kafka-broker", "start")

    assert len(error.failed) == 20
    assert error.retriable is True
    assert "may be down" in str(error)
    assert failed_after < 15
    assert stopped_after < 6
