"""HTTP API of Forge's event system: capsules, audit queries, replay, dead letters, health.

`create_app` also runs the workers (the audit recorder, and on Kafka the outbox relay) inside
the server process unless `run_workers=False`, so that `forge serve` is the whole system.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from forge.config import ForgeSettings
from forge.core.audit.store import AuditQuery
from forge.core.events.context import correlation_scope
from forge.core.events.dead_letters import DeadLetter, DeadLetterStatus
from forge.exceptions import (
    ConflictError,
    EventValidationError,
    FieldProblem,
    ForgeError,
    NotFoundError,
    StorageUnavailableError,
)
from forge.logging import get_logger
from forge.models.base import parse_utc_time
from forge.models.capsule import Capsule, CapsuleCreate, CapsuleUpdate
from forge.models.events import EventType
from forge.runtime import Runtime
from forge.workers import Worker

logger = get_logger(__name__)

CORRELATION_HEADER = "X-Correlation-ID"


class ErrorBody(BaseModel):
    error: str
    message: str
    problems: list[dict[str, Any]] = []


class AuditEntryBody(BaseModel):
    event: dict[str, Any]
    recorded_at: datetime


class AuditPageBody(BaseModel):
    entries: list[AuditEntryBody]
    next_cursor: str | None


class FieldDifferenceBody(BaseModel):
    field: str
    rebuilt: Any
    stored: Any


class ReplayBody(BaseModel):
    capsule_id: UUID
    at: datetime | None
    events_applied: int
    matches: bool
    rebuilt: Capsule | None
    stored: Capsule | None
    differences: list[FieldDifferenceBody]
    problems: list[str]


class DeadLetterBody(BaseModel):
    id: int | None
    group_id: str
    topic: str
    partition: int
    offset: int
    key: str | None
    event_id: str | None
    event_type: str | None
    handler: str
    reason: str
    error_type: str
    attempts: int
    status: str
    parked_at: datetime | None
    value: str
    extra: dict[str, str]

    @classmethod
    def of(cls, letter: DeadLetter) -> DeadLetterBody:
        return cls(
            id=letter.id,
            group_id=letter.group_id,
            topic=letter.topic,
            partition=letter.partition,
            offset=letter.offset,
            key=letter.key,
            event_id=letter.event_id,
            event_type=letter.event_type,
            handler=letter.handler,
            reason=letter.reason,
            error_type=letter.error_type,
            attempts=letter.attempts,
            status=letter.status.value,
            parked_at=letter.parked_at,
            value=letter.value.decode("utf-8", errors="replace"),
            extra=dict(letter.extra),
        )


LetterId = Annotated[int, Field(strict=True, ge=1, le=2**63 - 1)]
"""A dead-letter id: a JSON integer, not a string or a boolean, that fits in 64 bits."""

MAX_RETRY_IDS = 10_000
"""Maximum number of ids in one retry request. Retry more with `all` or several requests."""


class RetryRequest(BaseModel):
    """Dead letters to send back: the listed `ids`, or every parked one with `all`."""

    model_config = ConfigDict(extra="forbid")

    ids: list[LetterId] | None = Field(default=None, min_length=1, max_length=MAX_RETRY_IDS)
    all: StrictBool = False
    group_id: str | None = None

    @model_validator(mode="after")
    def _one_selection(self) -> RetryRequest:
        if (self.ids is None) == (not self.all):
            raise ValueError('give either "ids": [...] or "all": true')
        return self


class RetryResponse(BaseModel):
    requested: int


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


# Module-level aliases: FastAPI resolves string annotations in the module's namespace.
TimeParameter = Annotated[
    str | None,
    Query(
        description="ISO 8601 time with a timezone, such as 2026-01-31T12:00:00Z",
        examples=["2026-01-31T12:00:00Z"],
    ),
]
RuntimeDep = Annotated[Runtime, Depends(runtime_of)]
ActorHeader = Annotated[
    UUID, Header(alias="X-Actor-Id", description="ID of the user making the change")
]


def _status_for(error: ForgeError) -> int:
    if isinstance(error, NotFoundError):
        return 404
    if isinstance(error, ConflictError):
        return 409
    if isinstance(error, EventValidationError):
        return 422
    if isinstance(error, StorageUnavailableError) or error.retriable:
        return 503
    return 500


def create_app(settings: ForgeSettings | None = None, *, run_workers: bool = True) -> FastAPI:
    """Build the FastAPI app; its lifespan starts the runtime and, by default, the workers."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings)
        await runtime.start()
        workers: list[Worker] = []
        if run_workers:
            workers = [
                Worker(name, factory) for name, factory in runtime.worker_factories().items()
            ]
        for worker in workers:
            worker.start()
        app.state.runtime = runtime
        app.state.workers = workers
        try:
            yield
        finally:
            for worker in workers:
                await worker.stop()
            await runtime.stop()

    app = FastAPI(
        title="Forge event system",
        version="0.1.0",
        lifespan=lifespan,
        responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 422: {"model": ErrorBody}},
    )

    @app.exception_handler(ForgeError)
    async def forge_error(request: Request, error: ForgeError) -> JSONResponse:
        status = _status_for(error)
        if status >= 500:
            logger.error("request_failed", path=request.url.path, error=str(error))
        problems = [
            {"field": problem.location, "value": problem.shown_value(), "problem": problem.problem}
            for problem in getattr(error, "problems", ())
        ]
        body = ErrorBody(error=type(error).__name__, message=str(error), problems=problems)
        return JSONResponse(status_code=status, content=body.model_dump())

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for detail in error.errors():
            location = ".".join(str(part) for part in detail.get("loc", ()))
            problem = FieldProblem(location, detail.get("input"), detail.get("msg", ""))
            if detail.get("type") == "json_invalid":
                # pydantic gives the character position as the last part of the location.
                position = detail["loc"][-1] if detail.get("loc") else "?"
                reason = detail.get("ctx", {}).get("error", "invalid JSON")
                problem = FieldProblem(
                    "body", "", f"not valid JSON: {reason} at character {position}"
                )
            problems.append(
                {
                    "field": problem.location,
                    "value": problem.shown_value(),
                    "problem": problem.problem,
                }
            )
        listed = "; ".join(f"{p['field']}={p['value']}: {p['problem']}" for p in problems)
        body = ErrorBody(
            error="InvalidRequest",
            message=f"Invalid request: {listed}. Fix these fields (body fields as JSON with "
            "content-type: application/json, headers such as X-Actor-Id as UUIDs); the API "
            "schema is at /openapi.json.",
            problems=problems,
        )
        return JSONResponse(status_code=422, content=body.model_dump())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = str(error.detail)
        if error.status_code == 400 and message == "There was an error parsing the body":
            # FastAPI's words when the body cannot be decoded at all: not UTF-8, another
            # charset, or JSON nested deeper than its parser's limit.
            message = (
                "The request body could not be parsed. Send a JSON object encoded as UTF-8, "
                "with content-type: application/json."
            )
        body = ErrorBody(
            error="InvalidRequest" if error.status_code < 500 else "ServerError",
            message=message,
            problems=[],
        )
        return JSONResponse(
            status_code=error.status_code, content=body.model_dump(), headers=error.headers
        )

    @app.middleware("http")
    async def correlation(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        raw = request.headers.get(CORRELATION_HEADER)
        if raw is None:
            return await call_next(request)
        try:
            correlation_id = UUID(raw)
        except ValueError:
            problem = FieldProblem(CORRELATION_HEADER, raw, "not a UUID")
            body = ErrorBody(
                error="InvalidHeader",
                message=f"Invalid {CORRELATION_HEADER} header {problem.shown_value()}; send a "
                "UUID or omit it.",
                problems=[
                    {
                        "field": problem.location,
                        "value": problem.shown_value(),
                        "problem": "not a UUID",
                    }
                ],
            )
            return JSONResponse(status_code=400, content=body.model_dump())
        with correlation_scope(correlation_id):
            response = await call_next(request)
        response.headers[CORRELATION_HEADER] = str(correlation_id)
        return response

    @app.get("/health")
    async def health(request: Request, runtime: RuntimeDep) -> JSONResponse:
        workers = {
            worker.name: {"running": worker.running, "last_error": worker.last_error}
            for worker in request.app.state.workers
        }
        details = await runtime.health()
        healthy = all(worker.last_error is None for worker in request.app.state.workers)
        # While the broker is down, changes are still accepted into the outbox. The health
        # check reports that, with the number of events waiting, instead of looking fine.
        healthy = healthy and details.get("broker_connected", True)
        # A rejected outbox row is an event that was never published: it waits for a fix and
        # `forge outbox requeue`.
        healthy = healthy and not details.get("outbox_rejected")
        body = {
            "status": "ok" if healthy else "degraded",
            "event_backend": runtime.settings.event_backend.value,
            "store_backend": runtime.settings.effective_store_backend.value,
            "audit_events": await runtime.audit_store.count(),
            **details,
            "workers": workers,
        }
        return JSONResponse(status_code=200 if healthy else 503, content=body)

    @app.post("/capsules", status_code=201)
    async def create_capsule(data: CapsuleCreate, runtime: RuntimeDep) -> Capsule:
        return await runtime.capsules.create(data)

    @app.get("/capsules")
    async def list_capsules(
        runtime: RuntimeDep,
        owner_id: UUID | None = None,
        include_deleted: bool = False,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[Capsule]:
        return await runtime.capsule_store.list(
            owner_id=owner_id, include_deleted=include_deleted, limit=limit
        )

    @app.get("/capsules/{capsule_id}")
    async def get_capsule(
        capsule_id: UUID, runtime: RuntimeDep, include_deleted: bool = False
    ) -> Capsule:
        return await runtime.capsules.get(capsule_id, include_deleted=include_deleted)

    @app.patch("/capsules/{capsule_id}")
    async def update_capsule(
        capsule_id: UUID, data: CapsuleUpdate, actor_id: ActorHeader, runtime: RuntimeDep
    ) -> Capsule:
        return await runtime.capsules.update(capsule_id, data, actor_id=actor_id)

    @app.delete("/capsules/{capsule_id}")
    async def delete_capsule(
        capsule_id: UUID,
        actor_id: ActorHeader,
        runtime: RuntimeDep,
        reason: str | None = None,
    ) -> Capsule:
        return await runtime.capsules.delete(capsule_id, actor_id=actor_id, reason=reason)

    @app.get("/audit")
    async def query_audit(
        runtime: RuntimeDep,
        resource_id: UUID | None = None,
        actor_id: UUID | None = None,
        event_type: EventType | None = None,
        correlation_id: UUID | None = None,
        since: TimeParameter = None,
        until: TimeParameter = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        cursor: str | None = None,
    ) -> AuditPageBody:
        lower = parse_utc_time(since, "since") if since is not None else None
        upper = parse_utc_time(until, "until") if until is not None else None
        try:
            query = AuditQuery(
                resource_id=resource_id,
                actor_id=actor_id,
                event_type=event_type,
                correlation_id=correlation_id,
                since=lower,
                until=upper,
                limit=limit,
                cursor=cursor,
            )
        except ValueError as error:
            raise EventValidationError(f"Invalid audit query: {error}") from error
        page = await runtime.audit_store.query(query)
        return AuditPageBody(
            entries=[
                AuditEntryBody(event=entry.event.to_dict(), recorded_at=entry.recorded_at)
                for entry in page.entries
            ],
            next_cursor=page.next_cursor,
        )

    @app.get("/replay/capsules/{capsule_id}")
    async def replay_capsule(
        capsule_id: UUID, runtime: RuntimeDep, at: TimeParameter = None
    ) -> ReplayBody:
        moment = parse_utc_time(at, "at") if at is not None else None
        result = await runtime.replayer.replay(capsule_id, at=moment)
        return ReplayBody(
            capsule_id=result.capsule_id,
            at=result.at,
            events_applied=result.events_applied,
            matches=result.matches,
            rebuilt=result.rebuilt,
            stored=result.stored,
            differences=[
                FieldDifferenceBody(field=d.field, rebuilt=d.rebuilt, stored=d.stored)
                for d in result.differences
            ],
            problems=result.problems,
        )

    @app.get("/dead-letters")
    async def list_dead_letters(
        runtime: RuntimeDep,
        group_id: str | None = None,
        status: DeadLetterStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[DeadLetterBody]:
        letters = await runtime.dead_letters.list(group_id=group_id, status=status, limit=limit)
        return [DeadLetterBody.of(letter) for letter in letters]

    @app.post("/dead-letters/retry")
    async def retry_dead_letters(request: RetryRequest, runtime: RuntimeDep) -> RetryResponse:
        ids = None if request.all else request.ids
        count = await runtime.dead_letters.request_retry(ids, group_id=request.group_id)
        return RetryResponse(requested=count)

    return app
