"""`forge dlq list --json` and `GET /dead-letters` show every field of a letter, extra included."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from forge.api.app import create_app
from forge.config import ForgeSettings
from forge.core.events.dead_letters import DeadLetter
from forge.runtime import Runtime


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Return a data folder whose store contains one letter with a traceback in `extra`."""
    letter = DeadLetter(
        group_id="search",
        topic="forge.capsule.created",
        partition=0,
        offset=4,
        key=None,
        value=b'{"type": "capsule.created"}',
        headers={},
        reason="search index unreachable",
        error_type="ConnectionError",
        handler="indexer",
        attempts=5,
        extra={"traceback": "Traceback (most recent call last):\nConnectionError: unreachable\n"},
    )

    async def park() -> None:
        async with Runtime(ForgeSettings(data_dir=tmp_path)) as runtime:
            await runtime.dead_letters.park([letter])

    asyncio.run(park())
    return tmp_path


def test_cli_json_shows_extra(data_dir: Path) -> None:
    # A process of its own, because the command line configures logging for the process.
    result = subprocess.run(
        [sys.executable, "-m", "forge.cli.main", "dlq", "list", "--json"],
        env={
            **os.environ,
            "FORGE_DATA_DIR": str(data_dir),
            "FORGE_EVENT_BACKEND": "sqlite",
            "FORGE_STORE_BACKEND": "sqlite",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    listed = json.loads(line)
    assert listed["reason"] == "search index unreachable"
    assert listed["extra"]["traceback"].endswith("ConnectionError: unreachable\n")


async def test_api_shows_extra(data_dir: Path) -> None:
    app = create_app(ForgeSettings(data_dir=data_dir), run_workers=False)

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://forge.test") as client:
            response = await client.get("/dead-letters", params={"group_id": "search"})

    assert response.status_code == 200
    [listed] = response.json()
    assert (listed["handler"], listed["attempts"]) == ("indexer", 5)
    assert listed["extra"]["traceback"].endswith("ConnectionError: unreachable\n")
