"""The `forge` command: serve the API and workers, manage capsules, read events and the audit trail.

Every command reads `FORGE_*` settings; flags override them. Listings print tables for people
and JSON lines with `--json` for scripts.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar
from uuid import UUID

import click
import orjson
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from forge.config import EventBackend, ForgeSettings
from forge.core.audit.store import AuditPage, AuditQuery
from forge.core.events.dead_letters import DeadLetterStatus
from forge.core.events.ports import LogRecord
from forge.exceptions import (
    ConfigurationError,
    ConsumerGroupError,
    EventValidationError,
    ForgeError,
)
from forge.logging import configure_logging
from forge.models.base import parse_utc_time
from forge.models.capsule import Capsule, CapsuleCreate, CapsuleUpdate
from forge.models.events import (
    CapsuleCreatedEvent,
    CapsuleDeletedEvent,
    CapsuleUpdatedEvent,
    Event,
    EventType,
)
from forge.runtime import Runtime
from forge.workers import Worker

T = TypeVar("T")

app = typer.Typer(help="Forge's event system.", no_args_is_help=True, add_completion=False)
capsule_app = typer.Typer(help="Create, change, delete and show capsules.", no_args_is_help=True)
events_app = typer.Typer(help="Read the event log.", no_args_is_help=True)
audit_app = typer.Typer(help="Query the audit trail.", no_args_is_help=True)
replay_app = typer.Typer(help="Rebuild state from events.", no_args_is_help=True)
dlq_app = typer.Typer(help="List and retry dead letters (parked events).", no_args_is_help=True)
app.add_typer(capsule_app, name="capsule")
app.add_typer(events_app, name="events")
app.add_typer(audit_app, name="audit")
app.add_typer(replay_app, name="replay")
app.add_typer(dlq_app, name="dlq")
outbox_app = typer.Typer(
    help="Show and requeue outbox rows the relay rejected (Kafka backend).", no_args_is_help=True
)
app.add_typer(outbox_app, name="outbox")
kafka_app = typer.Typer(help="Manage Forge's Apache Kafka topics.", no_args_is_help=True)
topics_app = typer.Typer(help="Create or check the event topics.", no_args_is_help=True)
kafka_app.add_typer(topics_app, name="topics")
app.add_typer(kafka_app, name="kafka")

console = Console()
error_console = Console(stderr=True)


class CliState:
    overrides: dict[str, Any] = {}


def _settings() -> ForgeSettings:
    try:
        return ForgeSettings(**CliState.overrides)
    except ValidationError as error:
        raise ConfigurationError(
            f"Invalid setting: {_describe_validation(error)}. Fix the FORGE_<NAME> variable "
            "or the flag of that name."
        ) from error


def _run(work: Callable[[Runtime], Awaitable[T]]) -> T:
    """Start a runtime, run `work` on it, stop it; print ForgeErrors as one line and exit 1."""

    async def main() -> T:
        async with Runtime(_settings()) as runtime:
            return await work(runtime)

    try:
        return asyncio.run(main())
    except ForgeError as error:
        error_console.print(f"[red]Error:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(1) from error
    except KeyboardInterrupt as error:
        raise typer.Exit(130) from error


def _parse_time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_utc_time(value, option)
    except EventValidationError as error:
        raise typer.BadParameter(error.problems[0].problem, param_hint=option) from error


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, default=str) + "\n")


def _capsule_table(capsules: list[Capsule]) -> Table:
    table = Table("id", "type", "title", "version", "owner", "parent", "deleted")
    for capsule in capsules:
        table.add_row(
            str(capsule.id),
            capsule.capsule_type,
            capsule.title,
            capsule.version,
            str(capsule.owner_id),
            str(capsule.parent_id or ""),
            capsule.deleted_at.isoformat() if capsule.deleted_at else "",
        )
    return table


def _show_capsule(capsule: Capsule, as_json: bool) -> None:
    if as_json:
        _print_json(capsule.model_dump(mode="json"))
    else:
        console.print(_capsule_table([capsule]))


JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _invoked_command() -> str | None:
    context = click.get_current_context(silent=True)
    return context.invoked_subcommand if context is not None else None


@app.callback()
def main_options(
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Folder of the embedded SQLite file (env FORGE_DATA_DIR)"),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR (env FORGE_LOG_LEVEL)")
    ] = None,
    event_backend: Annotated[
        EventBackend | None,
        typer.Option(
            help="sqlite (embedded, one file) or kafka (with PostgreSQL stores) "
            "(env FORGE_EVENT_BACKEND)"
        ),
    ] = None,
) -> None:
    """Forge's event system: typed events, audit trail and replay."""
    if data_dir is not None:
        CliState.overrides["data_dir"] = data_dir
    if event_backend is not None:
        CliState.overrides["event_backend"] = event_backend
    if log_level is not None:
        CliState.overrides["log_level"] = log_level
    settings = _settings()
    # One-shot commands print their result; their logs stay at WARNING unless asked for.
    # `forge serve` is a long-running process and logs at FORGE_LOG_LEVEL (INFO by default).
    level = log_level or (settings.log_level if _invoked_command() == "serve" else "WARNING")
    configure_logging(level, settings.log_json)


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (env FORGE_API_HOST)")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="TCP port (env FORGE_API_PORT)")
    ] = None,
    workers: Annotated[
        bool, typer.Option("--workers/--no-workers", help="Run the audit recorder in this process.")
    ] = True,
) -> None:
    """Run the HTTP API and the workers until interrupted."""
    import uvicorn

    from forge.api.app import create_app

    settings = _settings()
    application = create_app(settings, run_workers=workers)
    error_console.print(
        f"Forge serving on http://{host or settings.api_host}:{port or settings.api_port} "
        + (
            f"with data in {settings.sqlite_path}"
            if settings.event_backend is EventBackend.SQLITE
            else f"on Kafka at {settings.kafka_bootstrap_servers} with PostgreSQL stores"
        ),
        highlight=False,
    )
    uvicorn.run(
        application,
        host=host or settings.api_host,
        port=port if port is not None else settings.api_port,
        log_level=settings.log_level.lower(),
    )


@app.command()
def worker(
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Run only this worker (audit-recorder, outbox-relay)."),
    ] = None,
) -> None:
    """Run the workers without the HTTP API until SIGINT or SIGTERM."""

    async def run_workers(runtime: Runtime) -> None:
        factories = runtime.worker_factories()
        unknown = sorted(set(only or ()) - set(factories))
        if unknown:
            raise ConfigurationError(
                f"Unknown worker {', '.join(unknown)}; this backend runs: "
                f"{', '.join(sorted(factories))}."
            )
        workers = [
            Worker(name, factory) for name, factory in factories.items() if not only or name in only
        ]
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signal_number, stopping.set)
        for running in workers:
            running.start()
        error_console.print(
            f"Workers running: {', '.join(running.name for running in workers)}.", highlight=False
        )
        await stopping.wait()
        for running in workers:
            await running.stop()

    _run(run_workers)


# Capsules ----------------------------------------------------------------------------------------


@capsule_app.command("create")
def capsule_create(
    owner: Annotated[UUID, typer.Option(help="Owner's user id; the owner is the actor.")],
    capsule_type: Annotated[str, typer.Option("--type", help="Capsule type, e.g. knowledge.")],
    title: Annotated[str, typer.Option(help="Title.")] = "",
    content: Annotated[str, typer.Option(help="Content text.")] = "",
    parent: Annotated[UUID | None, typer.Option(help="Capsule this one derives from.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a capsule and its capsule.created event."""
    data = CapsuleCreate(
        owner_id=owner, capsule_type=capsule_type, title=title, content=content, parent_id=parent
    )
    capsule = _run(lambda runtime: runtime.capsules.create(data))
    _show_capsule(capsule, as_json)


@capsule_app.command("update")
def capsule_update(
    capsule_id: Annotated[UUID, typer.Argument(help="Capsule id.")],
    actor: Annotated[UUID, typer.Option(help="Id of the user making the change.")],
    title: Annotated[str | None, typer.Option(help="New title.")] = None,
    content: Annotated[str | None, typer.Option(help="New content.")] = None,
    capsule_type: Annotated[str | None, typer.Option("--type", help="New type.")] = None,
    expected_version: Annotated[
        str | None, typer.Option(help="Fail unless the capsule is at this version.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Change a capsule's fields; the version goes up by one."""
    data = CapsuleUpdate(
        title=title, content=content, capsule_type=capsule_type, expected_version=expected_version
    )
    capsule = _run(lambda runtime: runtime.capsules.update(capsule_id, data, actor_id=actor))
    _show_capsule(capsule, as_json)


@capsule_app.command("delete")
def capsule_delete(
    capsule_id: Annotated[UUID, typer.Argument(help="Capsule id.")],
    actor: Annotated[UUID, typer.Option(help="Id of the user deleting it.")],
    reason: Annotated[str | None, typer.Option(help="Why it is deleted.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Delete a capsule (it stays readable with --include-deleted)."""
    capsule = _run(
        lambda runtime: runtime.capsules.delete(capsule_id, actor_id=actor, reason=reason)
    )
    _show_capsule(capsule, as_json)


@capsule_app.command("show")
def capsule_show(
    capsule_id: Annotated[UUID, typer.Argument(help="Capsule id.")],
    include_deleted: Annotated[bool, typer.Option(help="Show it even if deleted.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Show one capsule."""
    capsule = _run(
        lambda runtime: runtime.capsules.get(capsule_id, include_deleted=include_deleted)
    )
    _show_capsule(capsule, as_json)


# Events ------------------------------------------------------------------------------------------


def _parse_types(values: list[str] | None) -> list[EventType] | None:
    if not values:
        return None
    known = {event_type.value: event_type for event_type in EventType}
    types = []
    for value in values:
        if value not in known:
            raise typer.BadParameter(
                f"unknown event type {value!r}; known types: {', '.join(sorted(known))}",
                param_hint="--type",
            )
        types.append(known[value])
    return types


def _record_summary(record: LogRecord) -> dict[str, Any]:
    try:
        # orjson limits nesting depth, so a hostile record cannot exhaust the stack here.
        value: Any = orjson.loads(record.value)
    except orjson.JSONDecodeError:
        value = record.value.decode("utf-8", errors="replace")
    return {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": record.key,
        "timestamp": record.timestamp.isoformat() if record.timestamp else None,
        "value": value,
    }


@events_app.command("tail")
def events_tail(
    types: Annotated[
        list[str] | None, typer.Option("--type", help="Event type to show; repeat for several.")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep waiting for new events.")
    ] = False,
    limit: Annotated[
        int, typer.Option(min=1, help="Show at most the last N events (without --follow).")
    ] = 20,
    as_json: JsonFlag = False,
) -> None:
    """Print events of the log, oldest first; with --follow, new ones as they come."""
    event_types = _parse_types(types)

    counter = itertools.count()

    async def tail(runtime: Runtime) -> None:
        # Kafka reads partitions one after another, so "last" means latest by time: keep the
        # `limit` newest records in a heap, then print them oldest first.
        newest: list[tuple[float, int, LogRecord]] = []
        async for record in runtime.reader.read(event_types, from_beginning=True, follow=False):
            moment = record.timestamp.timestamp() if record.timestamp else 0.0
            entry = (moment, next(counter), record)
            if len(newest) < limit:
                heapq.heappush(newest, entry)
            else:
                heapq.heappushpop(newest, entry)
        for _, _, record in sorted(newest):
            _print_record(record, as_json)
        if follow:
            async for record in runtime.reader.read(event_types, from_beginning=False, follow=True):
                _print_record(record, as_json)

    _run(tail)


def _print_record(record: LogRecord, as_json: bool) -> None:
    summary = _record_summary(record)
    if as_json:
        _print_json(summary)
        return
    value = summary["value"]
    where = f"{summary['timestamp']}  {record.topic}[{record.partition}]:{record.offset}"
    if isinstance(value, dict):
        actor = value.get("actor_id") or "-"
        resource = value.get("resource_id") or "-"
        line = f"{where}  actor={actor}  resource={resource}"
    else:
        line = f"{where}  (not an event: {str(value)[:60]!r})"
    console.print(escape(line), highlight=False, soft_wrap=True)


def _plain(value: Any) -> str:
    """Format a field value for people: ISO times, plain strings, None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _describe(event: Event[Any]) -> str:
    """Summarize an event's payload in a few words for a table cell."""
    data = event.data
    if isinstance(event, CapsuleCreatedEvent):
        parent = f", parent {data.parent_id}" if data.parent_id else ""
        return f"{data.capsule_type} v{data.version}{parent}"
    if isinstance(event, CapsuleUpdatedEvent):
        changed = ", ".join(data.fields_changed)
        return f"v{data.old_version} -> v{data.new_version}: {changed}"
    if isinstance(event, CapsuleDeletedEvent):
        return f"at v{data.version}" if data.version else ""
    values = data.model_dump(mode="json")
    return ", ".join(f"{key}={value}" for key, value in list(values.items())[:3])


async def _catch_up_audit(runtime: Runtime) -> None:
    """Record events not yet in the audit trail, unless a server's recorder is running.

    On the embedded backend the recorder runs inside `forge serve`; without a server, the
    command line records pending events itself so that queries are complete.
    """
    if runtime.settings.event_backend is not EventBackend.SQLITE:
        # On Kafka the recorder runs in its own group members; joining that group here would
        # only force a rebalance.
        return
    consumer, _ = runtime.audit_consumer()
    try:
        await consumer.start()
    except ConsumerGroupError:
        return
    try:
        await consumer.drain()
    finally:
        await consumer.stop()


# Audit -------------------------------------------------------------------------------------------


@audit_app.command("query")
def audit_query(
    resource: Annotated[UUID | None, typer.Option(help="Resource id.")] = None,
    actor: Annotated[UUID | None, typer.Option(help="Actor (user) id.")] = None,
    event_type: Annotated[str | None, typer.Option("--type", help="Event type.")] = None,
    correlation: Annotated[UUID | None, typer.Option(help="Correlation id.")] = None,
    since: Annotated[
        str | None, typer.Option(help="From this time, ISO 8601 with timezone.")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Up to this time, ISO 8601 with timezone.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Entries per page.")] = 50,
    cursor: Annotated[
        str | None, typer.Option(help="next_cursor printed by the previous page.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show audit trail entries, newest first."""
    types = _parse_types([event_type] if event_type else None)
    try:
        query = AuditQuery(
            resource_id=resource,
            actor_id=actor,
            event_type=types[0] if types else None,
            correlation_id=correlation,
            since=_parse_time(since, "--since"),
            until=_parse_time(until, "--until"),
            limit=limit,
            cursor=cursor,
        )
    except ValidationError as error:
        raise typer.BadParameter(str(error)) from error

    async def catch_up_and_query(runtime: Runtime) -> AuditPage:
        await _catch_up_audit(runtime)
        return await runtime.audit_store.query(query)

    page = _run(catch_up_and_query)
    if as_json:
        for entry in page.entries:
            _print_json(
                {"event": entry.event.to_dict(), "recorded_at": entry.recorded_at.isoformat()}
            )
        if page.next_cursor:
            _print_json({"next_cursor": page.next_cursor})
        return
    table = Table("time (UTC)", "type", "actor", "resource", "details")
    for entry in page.entries:
        event = entry.event
        table.add_row(
            event.timestamp.strftime("%Y-%m-%d %H:%M:%S"),
            event.type.value,
            str(event.actor_id or "-"),
            str(event.resource_id or "-"),
            escape(_describe(event)),
            end_section=False,
        )
    console.print(table)
    if page.next_cursor:
        console.print(f"More entries: --cursor {page.next_cursor}", highlight=False)


# Replay ------------------------------------------------------------------------------------------


@replay_app.command("capsule")
def replay_capsule(
    capsule_id: Annotated[UUID, typer.Argument(help="Capsule id.")],
    at: Annotated[
        str | None, typer.Option(help="Rebuild as of this time (ISO 8601, timezone).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Rebuild a capsule from its events and compare it with the stored one."""
    moment = _parse_time(at, "--at")
    runtime_backend = _settings().event_backend
    result = _run(lambda runtime: runtime.replayer.replay(capsule_id, at=moment))
    if as_json:
        _print_json(
            {
                "capsule_id": str(result.capsule_id),
                "at": result.at.isoformat() if result.at else None,
                "events_applied": result.events_applied,
                "matches": result.matches,
                "rebuilt": result.rebuilt.model_dump(mode="json") if result.rebuilt else None,
                "stored": result.stored.model_dump(mode="json") if result.stored else None,
                "differences": [
                    {"field": d.field, "rebuilt": d.rebuilt, "stored": d.stored}
                    for d in result.differences
                ],
                "problems": result.problems,
            }
        )
    else:
        if result.rebuilt is None:
            console.print(f"No capsule.created event for {capsule_id} (up to {at or 'now'}).")
        else:
            console.print(_capsule_table([result.rebuilt]))
        console.print(f"{result.events_applied} events applied.")
        for difference in result.differences:
            console.print(
                f"[red]differs[/red] {difference.field}: "
                + escape(
                    f"rebuilt={_plain(difference.rebuilt)} stored={_plain(difference.stored)}"
                ),
                highlight=False,
            )
        for problem in result.problems:
            console.print(f"[yellow]problem[/yellow] {escape(problem)}", highlight=False)
        if result.differences and runtime_backend is EventBackend.KAFKA:
            console.print(
                "On Kafka, replay reads the audit trail: if the audit recorder or the outbox "
                "relay is behind, run the replay again once they caught up (see /health).",
                highlight=False,
            )
        if at is None and result.matches:
            console.print("[green]Rebuilt state equals the stored capsule.[/green]")
    if at is None and not result.matches:
        raise typer.Exit(3)


# Dead letters ------------------------------------------------------------------------------------


@dlq_app.command("list")
def dlq_list(
    group: Annotated[str | None, typer.Option(help="Only this consumer group.")] = None,
    status: Annotated[
        DeadLetterStatus | None, typer.Option(help="parked, retry_requested or resolved.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 100,
    as_json: JsonFlag = False,
) -> None:
    """List parked events with the reason, handler and attempt count."""
    letters = _run(
        lambda runtime: runtime.dead_letters.list(group_id=group, status=status, limit=limit)
    )
    if as_json:
        for letter in letters:
            _print_json(
                {
                    "id": letter.id,
                    "group_id": letter.group_id,
                    "topic": letter.topic,
                    "partition": letter.partition,
                    "offset": letter.offset,
                    "event_id": letter.event_id,
                    "event_type": letter.event_type,
                    "handler": letter.handler,
                    "attempts": letter.attempts,
                    "status": letter.status.value,
                    "reason": letter.reason,
                    "error_type": letter.error_type,
                    "parked_at": letter.parked_at.isoformat() if letter.parked_at else None,
                    "extra": dict(letter.extra),
                }
            )
        return
    table = Table("id", "group", "topic:offset", "handler", "attempts", "status", "reason")
    for letter in letters:
        table.add_row(
            str(letter.id),
            letter.group_id,
            f"{letter.topic}:{letter.offset}",
            letter.handler,
            str(letter.attempts),
            letter.status.value,
            escape(letter.reason[:100]),
        )
    console.print(table)


@dlq_app.command("retry")
def dlq_retry(
    ids: Annotated[
        list[int] | None, typer.Argument(help="Dead-letter ids; see `forge dlq list`.")
    ] = None,
    retry_all: Annotated[bool, typer.Option("--all", help="Retry every parked event.")] = False,
    group: Annotated[str | None, typer.Option(help="Only this consumer group.")] = None,
) -> None:
    """Send parked events back to their group's consumer for another try."""
    if not ids and not retry_all:
        raise typer.BadParameter("give dead-letter ids, or --all to retry every parked event")

    async def request(runtime: Runtime) -> tuple[int, list[int]]:
        not_parked: list[int] = []
        if ids:
            parked = await runtime.dead_letters.list(
                group_id=group, status=DeadLetterStatus.PARKED, limit=1_000_000
            )
            parked_ids = {letter.id for letter in parked}
            not_parked = [letter_id for letter_id in ids if letter_id not in parked_ids]
        count = await runtime.dead_letters.request_retry(None if retry_all else ids, group_id=group)
        return count, not_parked

    count, not_parked = _run(request)
    if count:
        console.print(
            f"{count} dead letter(s) queued for retry; the running consumer of each group "
            "delivers them again within a few seconds (see `forge dlq list`).",
            highlight=False,
        )
    if not_parked:
        listed = ", ".join(str(letter_id) for letter_id in not_parked)
        error_console.print(
            f"[yellow]Not queued:[/yellow] {listed} (no such id, or not parked"
            f"{' in group ' + repr(group) if group else ''}); see `forge dlq list`.",
            highlight=False,
        )
        raise typer.Exit(1)


# Outbox ------------------------------------------------------------------------------------------


@outbox_app.command("list")
def outbox_list(
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 100,
    as_json: JsonFlag = False,
) -> None:
    """List rejected outbox rows, whose events were never published, with the reason."""

    async def query(runtime: Runtime) -> tuple[int, list[Any]]:
        return await runtime.outbox.pending_count(), await runtime.outbox.rejected(limit=limit)

    pending, rejected = _run(query)
    if as_json:
        for row in rejected:
            _print_json(
                {
                    "id": row.id,
                    "event_id": str(row.event_id),
                    "topic": row.topic,
                    "reason": row.reason,
                    "rejected_at": row.rejected_at.isoformat(),
                }
            )
        return
    table = Table("id", "event", "topic", "rejected at (UTC)", "reason")
    for row in rejected:
        table.add_row(
            str(row.id),
            str(row.event_id),
            row.topic,
            row.rejected_at.isoformat(timespec="seconds"),
            escape(row.reason[:100]),
        )
    console.print(table)
    console.print(f"{pending} row(s) waiting to be published.", highlight=False)


@outbox_app.command("requeue")
def outbox_requeue(
    ids: Annotated[
        list[int] | None, typer.Argument(help="Rejected row ids; see `forge outbox list`.")
    ] = None,
    requeue_all: Annotated[bool, typer.Option("--all", help="Requeue every rejected row.")] = False,
) -> None:
    """Make rejected outbox rows pending again, once the cause is fixed; the relay sends them."""
    if not ids and not requeue_all:
        raise typer.BadParameter("give row ids, or --all to requeue every rejected row")
    selected = None if requeue_all else list(ids or [])
    count = _run(lambda runtime: runtime.outbox.requeue_rejected(selected))
    console.print(f"{count} row(s) requeued; the outbox relay publishes them.", highlight=False)


# Kafka ---------------------------------------------------------------------------------------


@topics_app.command("ensure")
def kafka_topics_ensure(
    partitions: Annotated[
        int | None,
        typer.Option(min=1, help="Partitions per topic (env FORGE_KAFKA_TOPIC_PARTITIONS)"),
    ] = None,
    replication_factor: Annotated[
        int | None,
        typer.Option(min=1, help="Replicas per partition (env FORGE_KAFKA_REPLICATION_FACTOR)"),
    ] = None,
) -> None:
    """Create every event topic and the dead-letter topic that does not exist yet."""
    from forge.infrastructure.kafka.admin import ensure_topics

    overrides: dict[str, Any] = {}
    if partitions is not None:
        overrides["kafka_topic_partitions"] = partitions
    if replication_factor is not None:
        overrides["kafka_replication_factor"] = replication_factor
    settings = _settings().model_copy(update=overrides)
    try:
        report = asyncio.run(ensure_topics(settings))
    except ForgeError as error:
        error_console.print(f"[red]Error:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(1) from error
    console.print(
        f"{len(report.created)} topic(s) created, {len(report.existing)} already present "
        f"on {settings.kafka_bootstrap_servers}.",
        highlight=False,
    )
    for topic, count in sorted(report.partition_mismatches.items()):
        error_console.print(
            f"[yellow]Note:[/yellow] {topic} has {count} partitions, not "
            f"{settings.kafka_topic_partitions}; Forge leaves existing topics as they are.",
            highlight=False,
        )


@topics_app.command("check")
def kafka_topics_check() -> None:
    """Exit 1, naming them, if any of Forge's topics is missing on the broker."""
    from forge.infrastructure.kafka.admin import check_topics

    settings = _settings()
    try:
        asyncio.run(check_topics(settings))
    except ForgeError as error:
        error_console.print(f"[red]Error:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(1) from error
    console.print(f"Every Forge topic exists on {settings.kafka_bootstrap_servers}.")


def main() -> None:
    """Entry point of the `forge` command: print Forge and input errors as one line."""
    try:
        app()
    except ForgeError as error:
        error_console.print(f"[red]Error:[/red] {escape(str(error))}", highlight=False)
        raise SystemExit(1) from error
    except ValidationError as error:
        error_console.print(
            f"[red]Invalid input:[/red] {escape(_describe_validation(error))}", highlight=False
        )
        raise SystemExit(2) from error


def _describe_validation(error: ValidationError) -> str:
    parts = []
    for detail in error.errors(include_url=False):
        location = ".".join(str(part) for part in detail["loc"]) or "value"
        shown = repr(detail.get("input"))
        if len(shown) > 60:
            shown = shown[:57] + "..."
        parts.append(f"{location}={shown}: {detail['msg']}")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
