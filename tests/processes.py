"""Real Forge processes for end-to-end and fault tests: `forge serve` and `forge worker`.

Every process listens on, or talks to, 127.0.0.1 only. Waits are bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx

# Read at import, before the root conftest removes FORGE_* variables for each test: the fault
# tests hand the servers' addresses on to the processes they start.
ENVIRONMENT_AT_START = dict(os.environ)
REPOSITORY = Path(__file__).resolve().parents[1]
START_TIMEOUT_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Return the first truthy result of `condition`, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


class ForgeProcess:
    """One `forge` process with its own log file; `env` overrides the inherited variables."""

    def __init__(self, arguments: list[str], log: Path, env: Mapping[str, str]) -> None:
        self.arguments = arguments
        self.log = log
        self.env = dict(env)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "forge.cli.main", *self.arguments],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """Interrupt the process like Ctrl-C; kill it if it does not exit within `timeout`."""
        if not self.alive or self.process is None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush, as a crash or an out-of-memory kill."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Server(ForgeProcess):
    """`forge serve` on a free port of 127.0.0.1."""

    def __init__(self, log: Path, env: Mapping[str, str], *, workers: bool = True) -> None:
        self.port = free_port()
        arguments = ["serve", "--port", str(self.port)]
        if not workers:
            arguments.append("--no-workers")
        super().__init__(arguments, log, env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        super().start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if not self.alive:
                raise AssertionError(f"forge serve exited early:\n{self.output()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code in (200, 503):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(
            f"forge serve not ready in {START_TIMEOUT_SECONDS} s:\n{self.output()[-4000:]}"
        )


class CapsuleWriter:
    """Creates capsules over HTTP in a thread, keeping the ids the API acknowledged with 201.

    Bounded by `max_requests`; stops early on `stop()`. Failed requests (connection refused,
    5xx during a fault) are counted, not retried: only acknowledged capsules must survive.
    """

    def __init__(self, url: str, max_requests: int = 5000, content: str = "") -> None:
        self._url = url
        self._max_requests = max_requests
        self._content = content
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, daemon=True)
        self.acknowledged: list[str] = []
        self.failed = 0
        self.owner = str(uuid4())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _write(self) -> None:
        with httpx.Client(base_url=self._url, timeout=5) as client:
            for number in range(self._max_requests):
                if self._stop.is_set():
                    return
                body = {
                    "owner_id": self.owner,
                    "capsule_type": "knowledge",
                    "title": f"fault test {number}",
                    "content": self._content,
                }
                try:
                    response = client.post("/capsules", json=body)
                except httpx.TransportError:
                    self.failed += 1
                    time.sleep(0.05)
                    continue
                if response.status_code == 201:
                    self.acknowledged.append(response.json()["id"])
                else:
                    self.failed += 1
                    time.sleep(0.05)
