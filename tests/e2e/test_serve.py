"""End to end on the embedded default: `forge serve` as a real process, driven over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pytest

from tests.processes import free_port, wait_for

pytestmark = pytest.mark.slow

START_TIMEOUT = 30.0


class Server:
    """A `forge serve` process on 127.0.0.1 with its own data folder."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = data_dir / "serve.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FORGE_DATA_DIR"] = str(self.data_dir)
        env["FORGE_CONSUMER_POLL_INTERVAL_SECONDS"] = "0.02"
        return env

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "forge.cli.main", "serve", "--port", str(self.port)],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"forge serve exited early:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"forge serve not ready in {START_TIMEOUT} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "forge.cli.main", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path / "data")
    running.start()
    yield running
    running.stop()


def _audit(server: Server, **params: Any) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, "limit": 100, **({"cursor": cursor} if cursor else {})}
        page = httpx.get(f"{server.url}/audit", params=query, timeout=10).json()
        entries.extend(entry["event"] for entry in page["entries"])
        cursor = page["next_cursor"]
        if cursor is None:
            return entries


def test_capsule_lifecycle_in_audit_trail(server: Server) -> None:
    owner, editor = str(uuid4()), str(uuid4())
    client = httpx.Client(base_url=server.url, timeout=10)

    def create(title: str, parent: str | None = None) -> dict[str, Any]:
        body = {"owner_id": owner, "capsule_type": "knowledge", "title": title}
        if parent:
            body["parent_id"] = parent
        response = client.post("/capsules", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    root = create("root")
    derived = create("derived", parent=root["id"])
    other = create("other")
    for change in ({"title": "derived, revised"}, {"content": "now with content"}):
        response = client.patch(
            f"/capsules/{derived['id']}", json=change, headers={"X-Actor-Id": editor}
        )
        assert response.status_code == 200, response.text
    response = client.delete(f"/capsules/{other['id']}", headers={"X-Actor-Id": editor})
    assert response.status_code == 200, response.text

    events = wait_for(lambda: (found := _audit(server)) and len(found) >= 6 and found)
    assert len(events) == 6
    by_type: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_type.setdefault(event["type"], []).append(event)
    assert len(by_type["capsule.created"]) == 3
    assert {event["actor_id"] for event in by_type["capsule.created"]} == {owner}
    updates = sorted(by_type["capsule.updated"], key=lambda event: event["timestamp"])
    assert [event["actor_id"] for event in updates] == [editor, editor]
    assert [(u["data"]["old_version"], u["data"]["new_version"]) for u in updates] == [
        ("1", "2"),
        ("2", "3"),
    ]
    assert [u["data"]["fields_changed"] for u in updates] == [["title"], ["content"]]
    assert by_type["capsule.deleted"][0]["resource_id"] == other["id"]
    assert by_type["capsule.deleted"][0]["actor_id"] == editor
    derived_created = next(
        e for e in by_type["capsule.created"] if e["resource_id"] == derived["id"]
    )
    assert derived_created["data"]["parent_id"] == root["id"]

    for capsule in (root, derived, other):
        result = server.cli("replay", "capsule", capsule["id"], "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["matches"] is True

    # Everything survives a restart.
    server.stop()
    server.start()
    assert len(_audit(server)) == 6
    stored = client.get(f"/capsules/{derived['id']}").json()
    assert stored["version"] == "3"
    assert stored["parent_id"] == root["id"]
    assert client.get(f"/capsules/{other['id']}").status_code == 404


def test_sigkill_loses_no_acknowledged_capsule(server: Server) -> None:
    owner = str(uuid4())
    acknowledged: list[str] = []
    stop = threading.Event()

    def create_in_loop() -> None:
        with httpx.Client(base_url=server.url, timeout=5) as client:
            for number in range(2000):
                if stop.is_set():
                    return
                try:
                    response = client.post(
                        "/capsules",
                        json={"owner_id": owner, "capsule_type": "knowledge", "title": str(number)},
                    )
                except httpx.TransportError:
                    return
                if response.status_code == 201:
                    acknowledged.append(response.json()["id"])

    writer = threading.Thread(target=create_in_loop)
    writer.start()
    wait_for(lambda: len(acknowledged) >= 30)
    server.kill()
    stop.set()
    writer.join(timeout=10)
    assert len(acknowledged) >= 30

    server.start()
    client = httpx.Client(base_url=server.url, timeout=10)
    stored = {capsule["id"] for capsule in client.get("/capsules", params={"limit": 1000}).json()}
    assert set(acknowledged) <= stored

    created = wait_for(
        lambda: (
            (
                found := {
                    event["resource_id"] for event in _audit(server, event_type="capsule.created")
                }
            )
            >= stored
            and found
        )
    )
    assert set(acknowledged) <= created
    # No event for a capsule that was not stored.
    assert created == stored


def test_cli_capsule_commands_share_data(server: Server) -> None:
    owner = str(uuid4())
    created = server.cli("capsule", "create", "--owner", owner, "--type", "note", "--json")
    assert created.returncode == 0, created.stderr
    capsule_id = json.loads(created.stdout)["id"]

    updated = server.cli(
        "capsule", "update", capsule_id, "--actor", owner, "--title", "renamed", "--json"
    )
    assert updated.returncode == 0, updated.stderr
    assert json.loads(updated.stdout)["version"] == "2"

    over_http = httpx.get(f"{server.url}/capsules/{capsule_id}", timeout=10).json()
    assert over_http["title"] == "renamed"

    events = wait_for(
        lambda: (found := _audit(server, resource_id=capsule_id)) and len(found) == 2 and found
    )
    assert [event["type"] for event in events] == ["capsule.updated", "capsule.created"]

    naive = server.cli("audit", "query", "--since", "2026-01-01T00:00:00")
    assert naive.returncode == 2
    assert "has no timezone" in naive.stderr
