"""Run Forge's benchmarks, print one table and write benchmarks/results/latest.json.

Usage: benchmarks/run [--smoke] [--only GROUP,...] [--runs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import embedded, kafka, memory, postgres, replay
from benchmarks.eventgen import EventGenerator
from benchmarks.harness import ERROR, Row, freeze_fixtures, render_table, write_report
from benchmarks.scale import FULL, SMOKE, Scale
from forge.logging import configure_logging
from forge.models.events import Event

GROUPS = ("embedded", "replay", "memory", "kafka", "postgres")
"""Benchmark groups: the first three need only SQLite, the others start their servers."""
DEFAULT_REPORT = Path(__file__).resolve().parent / "results" / "latest.json"


class _Interruption:
    """Records a SIGTERM or Ctrl-C, because the KeyboardInterrupt it raises can be lost.

    Python prints and drops an exception raised inside a weakref callback, so a run could go
    on and exit 0. The flag is checked again before each group and at the end.
    """

    requested = False

    @classmethod
    def handle(cls, signum: int, frame: object) -> None:
        cls.requested = True
        raise KeyboardInterrupt


def _guarded(name: str, function: Callable[[], list[Row]]) -> list[Row]:
    """Run one benchmark; turn an exception into an ERROR row so the others still run."""
    if _Interruption.requested:
        raise KeyboardInterrupt
    started = time.monotonic()
    print(f"running {name} ...", file=sys.stderr, flush=True)
    try:
        rows = function()
    except Exception as error:  # reported in the table; the other benchmarks still run
        return [Row(name, "", "", status=ERROR, note=f"{type(error).__name__}: {error}")]
    print(f"  {name} took {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    return rows


def run_groups(groups: list[str], scale: Scale, provision: bool) -> list[Row]:
    events: list[Event[Any]] = EventGenerator().events(scale.throughput_events)
    freeze_fixtures()
    rows: list[Row] = []
    if "embedded" in groups:
        rows += _guarded("embedded publish/consume/audit", lambda: embedded.run(scale, events))
    if "replay" in groups:
        rows += _guarded("replay", lambda: replay.run(scale))
    if "memory" in groups:
        rows += _guarded("worker memory", lambda: memory.run(scale, events))
    if "kafka" in groups:
        rows += _guarded("kafka", lambda: kafka.run(scale, events, provision=provision))
    if "postgres" in groups:
        rows += _guarded("postgres audit", lambda: postgres.run(scale, events, provision=provision))
    return rows


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run",
        description="Run Forge's benchmarks against their anchors and print one table.",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few thousand events and one run of each benchmark, to check that they work",
    )
    parser.add_argument(
        "--only",
        default=",".join(GROUPS),
        help=f"comma-separated groups to run, from {', '.join(GROUPS)} (default: all)",
    )
    parser.add_argument("--runs", type=int, help="runs of each benchmark (default: 3, smoke: 1)")
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_REPORT,
        help=f"where to write the JSON report (default: {DEFAULT_REPORT})",
    )
    parser.add_argument(
        "--no-provision",
        action="store_true",
        help="start no server: the Kafka and PostgreSQL rows use servers that an earlier run "
        "left running, or report ERROR",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    groups = [group.strip() for group in arguments.only.split(",") if group.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown or not groups:
        named = f"unknown group(s) {', '.join(unknown)}" if unknown else "no group given"
        print(f"{named}; use {', '.join(GROUPS)}", file=sys.stderr)
        return 2
    scale = SMOKE if arguments.smoke else FULL
    if arguments.runs is not None:
        if arguments.runs < 1:
            print(f"--runs must be at least 1, got {arguments.runs}", file=sys.stderr)
            return 2
        scale = Scale(**{**scale.__dict__, "runs": arguments.runs})

    report_path: Path = arguments.json.resolve()
    problem = _unwritable(report_path)
    if problem is not None:
        print(
            f"cannot write the report to {report_path}: {problem}; pass another --json PATH",
            file=sys.stderr,
        )
        return 2

    configure_logging("WARNING")
    # SIGTERM, as sent by `timeout` or a CI runner, unwinds like Ctrl-C, so that the servers
    # this run started are stopped. Both also set the flag that `_Interruption` describes.
    signal.signal(signal.SIGINT, _Interruption.handle)
    signal.signal(signal.SIGTERM, _Interruption.handle)
    try:
        rows = run_groups(groups, scale, provision=not arguments.no_provision)
    except KeyboardInterrupt:
        _Interruption.requested = True
    if _Interruption.requested:
        print("interrupted; the servers this run started were stopped", file=sys.stderr)
        return 130
    for row in rows:
        row.evaluate()

    mode = "smoke" if arguments.smoke else "full"
    print(f"Forge benchmarks ({mode}, {scale.runs} run(s) each)")
    print(render_table(rows))
    try:
        write_report(report_path, rows, mode, scale.runs)
    except OSError as error:
        print(f"\nThe JSON report was not written: {error}", file=sys.stderr)
        return 1
    print(f"\nJSON report: {report_path}")
    return 1 if any(row.status == ERROR for row in rows) else 0


def _unwritable(path: Path) -> str | None:
    """Return why a report cannot be written to `path`, or None when it can.

    It opens the file for appending, as the only reliable check: permission bits do not tell
    whether root may create a file in, say, /sys. A file created by the check is removed.
    """
    if path.is_dir():
        return "it is a folder"
    if path.exists() and not path.is_file():
        # Opening a named pipe would wait for a reader.
        return "it is not a regular file"
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab"):
            pass
    except FileExistsError as error:
        return f"{error.filename} is a file"
    except OSError as error:
        return error.strerror or str(error)
    if not existed:
        path.unlink()
    return None


if __name__ == "__main__":
    sys.exit(main())
