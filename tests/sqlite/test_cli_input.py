"""Bad input to the `forge` command gets one line naming the problem, not a traceback."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest


def forge(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # A process of its own, because the command line configures logging for the process.
    return subprocess.run(
        [sys.executable, "-m", "forge.cli.main", *args],
        env={
            **os.environ,
            "FORGE_DATA_DIR": str(data_dir),
            "FORGE_EVENT_BACKEND": "sqlite",
            "FORGE_STORE_BACKEND": "sqlite",
            "COLUMNS": "200",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cursor_beyond_64_bits_rejected(tmp_path: Path) -> None:
    cursor = base64.urlsafe_b64encode(b"99999999999999999999999:1").decode()

    result = forge(tmp_path, "audit", "query", "--cursor", cursor)

    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: Invalid audit cursor {cursor!r}")
    assert "Traceback" not in result.stderr


def test_retry_of_id_beyond_64_bits_names_it(tmp_path: Path) -> None:
    result = forge(tmp_path, "dlq", "retry", "99999999999999999999")

    assert result.returncode == 1
    assert result.stderr.startswith("Not queued: 99999999999999999999 (no such id, or not parked)")


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--log-level", "LOUD", "audit", "query"], {}, "invalid FORGE_LOG_LEVEL 'LOUD'"),
        (["serve"], {"FORGE_LOG_LEVEL": "LOUD"}, "invalid FORGE_LOG_LEVEL 'LOUD'"),
        (
            ["kafka", "topics", "check"],
            {"FORGE_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:99999"},
            "invalid FORGE_KAFKA_BOOTSTRAP_SERVERS '127.0.0.1:99999'",
        ),
        (["audit", "query"], {"FORGE_DATA_DIR": ""}, "FORGE_DATA_DIR is empty"),
    ],
    ids=["log-level-flag", "log-level-serve", "bootstrap-port", "empty-data-dir"],
)
def test_invalid_setting_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    result = forge(tmp_path, *args, **env)

    assert result.returncode == 1
    assert result.stderr.startswith("Error: Invalid setting:")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
