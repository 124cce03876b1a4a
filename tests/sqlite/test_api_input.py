"""Bad input to the HTTP API gets a 422 that names the field, never a 500."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pytest

from forge.api.app import MAX_RETRY_IDS, create_app
from forge.config import ForgeSettings


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(ForgeSettings(data_dir=tmp_path), run_workers=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://forge.test") as client:
            yield client


def problem_fields(response: httpx.Response) -> list[str]:
    return [problem["field"] for problem in response.json()["problems"]]


async def test_nul_in_capsule_field_rejected(client: httpx.AsyncClient) -> None:
    body = {"owner_id": str(uuid4()), "capsule_type": "k\x00x", "title": "a\x00b"}

    response = await client.post("/capsules", json=body)

    assert response.status_code == 422
    assert problem_fields(response) == ["body.capsule_type", "body.title"]
    assert "NUL character (U+0000) at position 1" in response.json()["message"]


async def test_cursor_beyond_64_bits_rejected(client: httpx.AsyncClient) -> None:
    cursor = base64.urlsafe_b64encode(b"99999999999999999999999:1").decode().rstrip("=")

    response = await client.get("/audit", params={"cursor": cursor})

    assert response.status_code == 422
    assert problem_fields(response) == ["cursor"]


@pytest.mark.parametrize(
    "body",
    [
        {"ids": [2**70]},
        {"ids": [-(2**63) - 1]},
        {"ids": ["1"]},
        {"ids": [True]},
        {"all": "yes"},
        {"ids": list(range(1, MAX_RETRY_IDS + 2))},
    ],
    ids=["huge", "negative", "text", "boolean", "text-all", "too-many"],
)
async def test_invalid_retry_request_rejected(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    response = await client.post("/dead-letters/retry", json=body)

    assert response.status_code == 422
    assert problem_fields(response)[0].startswith(("body.ids", "body.all"))


@pytest.mark.parametrize(
    ("path", "name", "value", "problem"),
    [
        ("/audit", "since", "0001-01-01T00:00:00+01:00", "outside the years 1 to 9999"),
        ("/audit", "until", "9999-12-31T23:59:59-01:00", "outside the years 1 to 9999"),
        ("/audit", "since", "2026-01-31T12:00:00", "no timezone"),
        ("/audit", "until", "99999999999", "not an ISO 8601 time"),
        (f"/replay/capsules/{uuid4()}", "at", "0001-01-01T00:00:00+01:00", "outside the years"),
        (f"/replay/capsules/{uuid4()}", "at", "-1", "not an ISO 8601 time"),
    ],
)
async def test_invalid_time_rejected(
    client: httpx.AsyncClient, path: str, name: str, value: str, problem: str
) -> None:
    response = await client.get(path, params={name: value})

    assert response.status_code == 422
    [shown] = response.json()["problems"]
    assert shown["field"] == name
    assert problem in shown["problem"]
    assert f"Invalid {name}={value!r}" in response.json()["message"]


async def test_time_with_offset_converted_to_utc(client: httpx.AsyncClient) -> None:
    response = await client.get("/audit", params={"since": "2026-01-31T12:00:00+02:00"})

    assert response.status_code == 200
    assert response.json()["entries"] == []


async def test_truncated_json_names_position(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/capsules", content=b'{"owner_id":', headers={"content-type": "application/json"}
    )

    assert response.status_code == 422
    [problem] = response.json()["problems"]
    assert problem["field"] == "body"
    assert problem["problem"].startswith("not valid JSON: ")
    assert problem["problem"].endswith("at character 12")


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"title": "\xff"}', "application/json"),
        ('{"title": "é"}'.encode("latin-1"), "application/json; charset=latin-1"),
    ],
    ids=["invalid-utf8", "latin-1"],
)
async def test_unparsable_body_gets_error_body(
    client: httpx.AsyncClient, content: bytes, content_type: str
) -> None:
    response = await client.post(
        "/capsules", content=content, headers={"content-type": content_type}
    )

    assert response.status_code == 400
    assert response.json()["error"] == "InvalidRequest"
    assert "Send a JSON object encoded as UTF-8" in response.json()["message"]


async def test_unknown_path_gets_error_body(client: httpx.AsyncClient) -> None:
    response = await client.get("/capsule")

    assert response.status_code == 404
    assert response.json() == {"error": "InvalidRequest", "message": "Not Found", "problems": []}


async def test_long_values_cut_in_error_body(client: httpx.AsyncClient) -> None:
    cursor = "c" * 5_000

    response = await client.get("/audit", params={"cursor": cursor})
    bad_header = await client.get("/capsules", headers={"X-Correlation-ID": "x" * 8_000})

    assert response.status_code == 422
    assert response.json()["problems"][0]["value"] == repr(cursor)[:77] + "..."
    assert len(response.content) < 1_000
    assert bad_header.status_code == 400
    assert len(bad_header.content) < 1_000
