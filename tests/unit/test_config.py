"""Settings reject invalid values with a message that names the variable and the fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from forge.config import ForgeSettings


@pytest.mark.parametrize("servers", ["127.0.0.1:99999", "127.0.0.1", ":9092", "a:1,b:x", "h:0"])
def test_invalid_bootstrap_servers_rejected(servers: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ForgeSettings(kafka_bootstrap_servers=servers)

    assert f"invalid FORGE_KAFKA_BOOTSTRAP_SERVERS {servers!r}" in str(caught.value)
    assert "port from 1 to 65535" in str(caught.value)


@pytest.mark.parametrize("servers", ["127.0.0.1:9092", "a:1, b:65535", "[::1]:9092"])
def test_bootstrap_server_lists_accepted(servers: str) -> None:
    assert ForgeSettings(kafka_bootstrap_servers=servers).kafka_bootstrap_servers == servers


def test_log_level_normalized() -> None:
    assert ForgeSettings(log_level="debug").log_level == "DEBUG"


def test_unknown_log_level_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        ForgeSettings(log_level="LOUD")

    assert "invalid FORGE_LOG_LEVEL 'LOUD'; use DEBUG, INFO, WARNING, ERROR, CRITICAL" in str(
        caught.value
    )


def test_empty_data_dir_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_DATA_DIR", "")

    with pytest.raises(ValidationError) as caught:
        ForgeSettings()

    assert "FORGE_DATA_DIR is empty; set it to a folder" in str(caught.value)
