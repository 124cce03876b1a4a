"""Personal data is sealed before it is stored and unreadable once its subject is anonymized."""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

import pytest

from forge.config import ForgeSettings, get_settings
from forge.core.audit.store import AuditQuery
from forge.core.events.service import get_event_service
from forge.models.events import SEALED_PREFIX
from forge.runtime import Runtime


async def test_ip_address_never_stored_in_clear(tmp_path: Path) -> None:
    async with Runtime(ForgeSettings(data_dir=tmp_path)) as runtime:
        user = uuid4()
        published = await runtime.events.user_authenticated(user, "10.1.2.3", "curl/8.0")
        records = [record async for record in runtime.reader.read()]

    assert len(records) == 1
    assert b"10.1.2.3" not in records[0].value
    assert b"curl/8.0" not in records[0].value
    assert str(published.data.ip_address).startswith(SEALED_PREFIX)


async def test_reveal_returns_personal_data(tmp_path: Path) -> None:
    async with Runtime(ForgeSettings(data_dir=tmp_path)) as runtime:
        published = await runtime.events.user_authenticated(uuid4(), "10.1.2.3", "curl/8.0")
        revealed = await runtime.protector.reveal(published)

    assert str(revealed.data.ip_address) == "10.1.2.3"
    assert revealed.data.user_agent == "curl/8.0"


async def test_anonymized_user_data_unreadable(tmp_path: Path) -> None:
    async with Runtime(ForgeSettings(data_dir=tmp_path)) as runtime:
        user, other = uuid4(), uuid4()
        await runtime.events.user_authenticated(user, "10.1.2.3", "curl/8.0")
        await runtime.events.user_authenticated(other, "10.4.5.6")
        await runtime.events.user_anonymized(user)
        consumer, _ = runtime.audit_consumer()
        await consumer.start()
        await consumer.drain()
        await consumer.stop()

        page = await runtime.audit_store.query(AuditQuery(resource_id=user))
        stored_login = next(
            e.event for e in page.entries if e.event.type.value == "user.authenticated"
        )
        revealed = await runtime.protector.reveal(stored_login)
        other_page = await runtime.audit_store.query(AuditQuery(resource_id=other))
        other_revealed = await runtime.protector.reveal(other_page.entries[0].event)
        later = await runtime.events.user_authenticated(user, "10.9.9.9")

    assert revealed.data.ip_address is None
    assert revealed.data.user_agent is None
    assert str(other_revealed.data.ip_address) == "10.4.5.6"
    # Data arriving after the anonymization is dropped, not sealed with a new key.
    assert later.data.ip_address is None


async def test_default_service_seals_personal_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGE_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    service = get_event_service()

    await service.user_authenticated(uuid4(), "10.1.2.3", "curl/8.0")
    await service.close()
    async with Runtime(ForgeSettings(data_dir=tmp_path)) as runtime:
        records = [record async for record in runtime.reader.read()]

    assert len(records) == 1
    assert b"10.1.2.3" not in records[0].value
