"""Start the Kafka broker and the PostgreSQL server that the benchmarks need, and stop them after.

The benchmarks use servers of their own, started through the repository's scripts on
127.0.0.1 with their own ports and data folders, so that they neither disturb nor see the
servers that tests use. A server that this module started is stopped when its block ends,
also when starting it was interrupted. A server that runs from these data folders, for example
one left by an interrupted run, is used and left running. Any other process on these ports is
reported as an error, because the benchmarks empty and reuse their data folders.

Environment variables:
  FORGE_BENCH_KAFKA_PORT     broker port (default 19092; the controller uses the next port)
  FORGE_BENCH_PG_PORT        PostgreSQL port (default 55871)
  FORGE_BENCH_DATA_DIR       data folders of both servers (default /tmp/forge-bench)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
START_TIMEOUT_SECONDS = 900
STOP_TIMEOUT_SECONDS = 120
STATUS_TIMEOUT_SECONDS = 60


class ServiceError(RuntimeError):
    """A server script failed to start its server."""


@dataclass(frozen=True)
class Server:
    """A server run by one of the repository's scripts, with the settings it is run with."""

    script: str
    environment: dict[str, str]
    data_dir: Path
    endpoint: str
    """Bootstrap address of the broker, or DSN of the database."""
    port_variable: str
    """The environment variable that sets the port."""
    ports: tuple[int, ...]
    """The ports the server listens on: its own first, then others such as the controller's."""

    def _run(self, command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPTS / self.script), command],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env={**os.environ, **self.environment},
        )

    def is_running(self) -> bool:
        """Return whether the script's `status` reports the server as up."""
        return self._run("status", STATUS_TIMEOUT_SECONDS).returncode == 0

    def taken_port(self) -> int | None:
        """Return a port of the server on which some process accepts connections, if any."""
        for port in self.ports:
            with socket.socket() as probe:
                probe.settimeout(1.0)
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return port
        return None

    def foreign_server_error(self, port: int) -> ServiceError:
        """Return the error for a port taken by a process not run from this data folder."""
        message = (
            f"127.0.0.1:{port} is taken by a process that the benchmarks did not start "
            f"from {self.data_dir}; stop it, or set {self.port_variable} to a free port"
        )
        if len(self.ports) > 1:
            others = ", ".join(map(str, self.ports[1:]))
            message += f" (the server also listens on {others}, which follows from that variable)"
        return ServiceError(message)

    def start(self) -> None:
        """Start the server from an empty data folder.

        Raises:
            ServiceError: the server is already running (its data folder is left alone), or
                the script failed.
        """
        if self.is_running():
            # Emptying the folder under a running server made it fail at its next write.
            raise ServiceError(
                f"the server at {self.endpoint} is already running; stop it with "
                f"scripts/{self.script} stop, or use it as it is"
            )
        # The data folder is the benchmarks' own: starting from an empty one gives every run
        # fresh topics and tables, whose sizes the benchmarks then know.
        shutil.rmtree(self.data_dir, ignore_errors=True)
        started = self._run("start", START_TIMEOUT_SECONDS)
        if started.returncode != 0:
            output = (started.stderr or started.stdout).strip()[-1500:]
            raise ServiceError(
                f"scripts/{self.script} start exited with {started.returncode}: {output}"
            )

    def stop(self) -> None:
        stopped = self._run("stop", STOP_TIMEOUT_SECONDS)
        if stopped.returncode != 0:
            raise ServiceError(
                f"scripts/{self.script} stop exited with {stopped.returncode}; stop the server "
                f"by hand: {stopped.stderr.strip()[-500:]}"
            )


def _data_root() -> Path:
    return Path(os.environ.get("FORGE_BENCH_DATA_DIR", "/tmp/forge-bench"))


def kafka_server() -> Server:
    port = int(os.environ.get("FORGE_BENCH_KAFKA_PORT", "19092"))
    data_dir = _data_root() / "kafka"
    return Server(
        "kafka-broker",
        {
            "FORGE_KAFKA_PORT": str(port),
            "FORGE_KAFKA_CONTROLLER_PORT": str(port + 1),
            "FORGE_KAFKA_DATA_DIR": str(data_dir),
            "FORGE_KAFKA_AUTO_CREATE": "false",
        },
        data_dir,
        f"127.0.0.1:{port}",
        "FORGE_BENCH_KAFKA_PORT",
        (port, port + 1),
    )


def postgres_server() -> Server:
    port = int(os.environ.get("FORGE_BENCH_PG_PORT", "55871"))
    data_dir = _data_root() / "postgres"
    return Server(
        "postgres-server",
        {
            "FORGE_PG_PORT": str(port),
            "FORGE_PG_DATA_DIR": str(data_dir / "data"),
            "FORGE_PG_RUN_DIR": str(data_dir / "run"),
        },
        data_dir,
        # The script creates this role and database with this password.
        f"postgresql://forge:forge@127.0.0.1:{port}/forge",
        "FORGE_BENCH_PG_PORT",
        (port,),
    )


@contextmanager
def provisioned(server: Server, *, start: bool) -> Iterator[Server]:
    """Yield `server` running: started here when `start` is true and it is not up yet.

    Raises:
        ServiceError: the server is down and `start` is false, or the script failed.
    """
    if server.is_running():
        yield server
        return
    busy_port = server.taken_port()
    if busy_port is not None:
        raise server.foreign_server_error(busy_port)
    if not start:
        raise ServiceError(
            f"no server runs from {server.data_dir} and --no-provision was given; run once "
            "without --no-provision, or start one with "
            + " ".join(f"{name}={value}" for name, value in server.environment.items())
            + f" scripts/{server.script} start"
        )
    try:
        server.start()
        yield server
    finally:
        # Also after an interrupted start: the script may have launched the server already.
        server.stop()
