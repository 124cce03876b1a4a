"""Settings of Forge, read from `FORGE_*` environment variables.

Command-line flags override the environment by building `ForgeSettings` with explicit values.
"""

from __future__ import annotations

from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from forge.exceptions import ConfigurationError


class EventBackend(str, Enum):
    """Event transport: the embedded SQLite event log or Apache Kafka."""

    SQLITE = "sqlite"
    KAFKA = "kafka"


class StoreBackend(str, Enum):
    """Database of the capsule, audit, dead-letter, outbox and inbox stores."""

    SQLITE = "sqlite"
    POSTGRES = "postgres"


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "forge"


class ForgeSettings(BaseSettings):
    """All settings of the event system; each field is read from `FORGE_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="FORGE_", extra="ignore", frozen=True)

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Folder of the embedded SQLite file and other local state.",
    )
    event_backend: EventBackend = EventBackend.SQLITE
    store_backend: StoreBackend | None = Field(
        default=None,
        description="Defaults to sqlite with the sqlite event backend, postgres with kafka.",
    )

    # Apache Kafka
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_topic_partitions: int = Field(default=3, ge=1)
    kafka_replication_factor: int = Field(default=1, ge=1)
    kafka_client_id: str = "forge"
    kafka_startup_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How long a publish waits for a broker that is not connected yet, "
        "for example one still starting; then it fails with BrokerUnavailableError.",
    )

    # PostgreSQL
    postgres_dsn: str = "postgresql://forge@127.0.0.1:54329/forge"
    postgres_startup_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description="How long a process waits at start-up for an unreachable database.",
    )
    postgres_pool_min_size: int = Field(
        default=1, ge=0, description="Minimum connections each process keeps open to PostgreSQL."
    )
    postgres_pool_max_size: int = Field(
        default=10,
        ge=1,
        description="Maximum connections each process opens to PostgreSQL; further callers wait.",
    )
    postgres_schema: str = Field(
        default="public",
        description="Schema of Forge's tables, created when missing; separate schemas let "
        "several deployments or test runs share one database.",
    )

    # Consumers
    consumer_max_attempts: int = Field(
        default=5, ge=1, description="Handler calls per event before it is parked."
    )
    consumer_retry_backoff_seconds: float = Field(
        default=0.2, ge=0, description="Delay before the first retry; doubled for each next one."
    )
    consumer_retry_backoff_max_seconds: float = Field(default=5.0, ge=0)
    consumer_batch_size: int = Field(default=500, ge=1)
    consumer_poll_interval_seconds: float = Field(
        default=0.05, gt=0, description="Idle wait between polls of the embedded event log."
    )
    consumer_session_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A group member silent this long is considered gone (both backends).",
    )
    consumer_stop_timeout_seconds: float = Field(default=10.0, gt=0)

    # Events
    max_event_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="Largest serialized event accepted, in bytes."
    )

    # SQLite
    sqlite_synchronous: str = Field(
        default="FULL",
        description="PRAGMA synchronous: FULL survives power loss, NORMAL only a process crash.",
    )
    sqlite_busy_timeout_seconds: float = Field(default=10.0, gt=0)

    # HTTP API
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535)

    # Logging
    log_level: str = "INFO"
    log_json: bool = False

    @field_validator("data_dir", mode="before")
    @classmethod
    def _check_data_dir(cls, value: Any) -> Any:
        # An empty FORGE_DATA_DIR would put the SQLite file in whatever folder a command runs in.
        if isinstance(value, str) and not value.strip():
            raise ValueError(
                "FORGE_DATA_DIR is empty; set it to a folder, or unset it for the default "
                f"{default_data_dir()}"
            )
        return value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _check_bootstrap_servers(cls, value: str) -> str:
        for address in value.split(","):
            host, _, port = address.strip().rpartition(":")
            if not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"invalid FORGE_KAFKA_BOOTSTRAP_SERVERS {value!r}: {address.strip()!r} is not "
                    "host:port with a port from 1 to 65535; use a comma-separated list such as "
                    "127.0.0.1:9092"
                )
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"invalid FORGE_LOG_LEVEL {value!r}; use {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("sqlite_synchronous")
    @classmethod
    def _check_synchronous(cls, value: str) -> str:
        value = value.upper()
        if value not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(
                f"invalid FORGE_SQLITE_SYNCHRONOUS {value!r}; use OFF, NORMAL, FULL or EXTRA"
            )
        return value

    @property
    def effective_store_backend(self) -> StoreBackend:
        if self.store_backend is not None:
            return self.store_backend
        if self.event_backend is EventBackend.KAFKA:
            return StoreBackend.POSTGRES
        return StoreBackend.SQLITE

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "forge.sqlite3"


@lru_cache(maxsize=1)
def get_settings() -> ForgeSettings:
    """Return the process-wide settings read from the environment."""
    try:
        return ForgeSettings()
    except ValueError as error:
        raise ConfigurationError(f"Invalid FORGE_* setting: {error}") from error
