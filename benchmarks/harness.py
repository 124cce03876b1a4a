"""Result rows, targets, the printed table and the JSON report of the benchmark run."""

from __future__ import annotations

import gc
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PASS = "PASS"
MISS = "MISS"
SKIP = "SKIP"
ERROR = "ERROR"
INFO = "INFO"
"""A row shown for context, with no target."""


def freeze_fixtures() -> None:
    """Take the objects alive now, above all the benchmark's input, out of the collector's scans.

    A run keeps its input (100,000 events and their encoded rows) in memory from start to end,
    which no worker does. The garbage collector walked that input again and again while the
    measured code allocated: about 2 µs of each event handled by the Kafka consumer. Called once
    the input is built, so that Forge and its anchors are both measured without it.
    """
    gc.collect()
    gc.freeze()


@dataclass(frozen=True)
class Summary:
    """Median, minimum and maximum of the values of several runs."""

    median: float
    min: float
    max: float
    runs: list[float]

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            raise ValueError("a summary needs at least one value")
        return cls(statistics.median(values), min(values), max(values), list(values))


@dataclass(frozen=True)
class Target:
    """One pass condition of a row, such as "at least 50,000 events/s" or "at least 0.5x"."""

    description: str
    check: Callable[[Row], bool | None]
    """Returns None when the row lacks the figure the target is about."""


def at_least(value: float, unit: str) -> Target:
    return Target(
        f">= {value:,.0f} {unit}",
        lambda row: None if row.measured is None else row.measured.median >= value,
    )


def at_most(value: float, unit: str) -> Target:
    return Target(
        f"<= {value:g} {unit}",
        lambda row: None if row.measured is None else row.measured.median <= value,
    )


def ratio_at_least(value: float, anchor: str = "anchor") -> Target:
    return Target(
        f">= {value:g}x {anchor}",
        lambda row: None if row.ratio is None else row.ratio >= value,
    )


@dataclass
class Row:
    """One line of the table: a measured figure, its anchor and targets."""

    name: str
    group: str
    unit: str
    measured: Summary | None = None
    anchor: Summary | None = None
    anchor_label: str = ""
    targets: list[Target] = field(default_factory=list)
    status: str = ""
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """Median of this row divided by the median of its anchor."""
        if self.measured is None or self.anchor is None or self.anchor.median == 0:
            return None
        return self.measured.median / self.anchor.median

    def evaluate(self) -> None:
        """Set `status` from the targets, unless the row was already marked SKIP or ERROR."""
        if self.status in (SKIP, ERROR):
            return
        if self.measured is None:
            self.status = ERROR
            return
        if not self.targets:
            self.status = INFO
            return
        results = [target.check(self) for target in self.targets]
        if any(result is None for result in results):
            self.status = ERROR
        elif all(results):
            self.status = PASS
        else:
            self.status = MISS

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "unit": self.unit,
            "measured": asdict(self.measured) if self.measured else None,
            "anchor": asdict(self.anchor) if self.anchor else None,
            "anchor_label": self.anchor_label,
            "ratio": self.ratio,
            "targets": [target.description for target in self.targets],
            "status": self.status,
            "note": self.note,
            "details": self.details,
        }


# Formatting ------------------------------------------------------------------------------------


def _decimals(value: float, unit: str) -> int:
    return 0 if unit == "events/s" or abs(value) >= 100 else 2


def _number(value: float, unit: str, decimals: int | None = None) -> str:
    if decimals is None:
        decimals = _decimals(value, unit)
    return f"{value:,.{decimals}f}"


def _spread(summary: Summary | None, unit: str) -> str:
    if summary is None:
        return "-"
    if len(summary.runs) == 1:
        return f"{_number(summary.median, unit)} {unit}"
    # One precision for all three, the finest any of them needs, so that a spread reads
    # 9.36-126.00, not 9.36-126.
    decimals = max(_decimals(value, unit) for value in (summary.min, summary.median, summary.max))
    return (
        f"{_number(summary.median, unit, decimals)} {unit} "
        f"[{_number(summary.min, unit, decimals)}-{_number(summary.max, unit, decimals)}]"
    )


def render_table(rows: Sequence[Row]) -> str:
    """Return the rows as a plain-text table: median [min-max] of each figure."""
    header = (
        "Benchmark",
        "Forge, median [min-max]",
        "Anchor, median [min-max]",
        "Ratio",
        "Target",
        "Result",
    )
    lines = [header]
    for row in rows:
        anchor = _spread(row.anchor, row.unit)
        if row.anchor is not None and row.anchor_label:
            anchor = f"{anchor} ({row.anchor_label})"
        lines.append(
            (
                row.name,
                _spread(row.measured, row.unit),
                anchor,
                f"{row.ratio:.2f}x" if row.ratio is not None else "-",
                "; ".join(target.description for target in row.targets) or "-",
                row.status,
            )
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    rendered = []
    for index, line in enumerate(lines):
        rendered.append(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        )
        if index == 0:
            rendered.append("  ".join("-" * width for width in widths))
    notes = [f"- {row.name}: {row.note}" for row in rows if row.note]
    if notes:
        rendered.append("")
        rendered.append("Notes:")
        rendered.extend(notes)
    return "\n".join(line.rstrip() for line in rendered)


# Report ----------------------------------------------------------------------------------------


def machine_description() -> dict[str, Any]:
    """Return what a reader needs to compare two reports: CPUs, versions, commit."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).parent,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "commit": commit or None,
    }


def write_report(path: Path, rows: Sequence[Row], mode: str, runs: int) -> None:
    """Write the rows and the machine description as JSON to `path`."""
    import orjson

    report = {
        "generated_at": datetime.now(UTC).isoformat(),
        "mode": mode,
        "runs": runs,
        "machine": machine_description(),
        "rows": [row.to_json() for row in rows],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
