"""One row per measurement, its target, and the table ``./dev bench`` prints."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Target:
    """A bound on a row's ratio: ``ratio >= value`` or ``ratio <= value``."""

    op: str  # ">=" or "<="
    value: float

    def met(self, ratio: float) -> bool:
        return ratio >= self.value if self.op == ">=" else ratio <= self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}x"


def at_least(value: float) -> Target:
    return Target(">=", value)


def at_most(value: float) -> Target:
    return Target("<=", value)


@dataclass
class Row:
    """One line of the table.

    ``ours`` and ``baseline`` are in ``unit``; ``ratio`` is ours / baseline unless the
    row says otherwise in ``note``; ``samples`` are the per-round ratios it is the
    median of.
    """

    bench: str
    name: str
    ours: float | None
    baseline: float | None
    unit: str
    ratio: float | None
    target: Target | str | None = None
    baseline_name: str = ""
    note: str = ""
    samples: list[float] = field(default_factory=list)
    # Whether a target given as text (not a bound on the ratio) was met.
    check: bool | None = None

    @property
    def met(self) -> bool | None:
        if isinstance(self.target, Target):
            return None if self.ratio is None else self.target.met(self.ratio)
        return self.check


def median_ratio(ours: Sequence[float], baseline: Sequence[float]) -> tuple[float, list[float]]:
    """The median of the per-round ratios ours[i] / baseline[i], and those ratios.

    Pairing each round with its own baseline (run next to it) cancels the slow drift
    of a shared machine better than a ratio of two medians would.
    """
    ratios = [o / b for o, b in zip(ours, baseline, strict=True) if b]
    return statistics.median(ratios), ratios


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in {"x", "ratio"}:
        return f"{value:.3f}"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}"


def spread(samples: Sequence[float]) -> str:
    """The per-round ratios' range and coefficient of variation, or "-" for one round."""
    if len(samples) < 2:
        return "-"
    mean = statistics.mean(samples)
    cv = statistics.stdev(samples) / mean if mean else 0.0
    return f"{min(samples):.2f}-{max(samples):.2f} (cv {cv:.2f})"


def render_table(rows: Iterable[Row]) -> str:
    """A Markdown table: readable in a terminal and pasteable into docs/benchmarks.md."""
    rows = list(rows)
    head = ["benchmark", "ours", "baseline", "ratio", "spread", "target", "met"]
    lines = [head]
    for row in rows:
        met = {True: "met", False: "NOT MET", None: "-"}[row.met]
        baseline = _number(row.baseline, row.unit)
        if row.baseline_name:
            baseline = (
                f"{baseline} ({row.baseline_name})"
                if row.baseline is not None
                else row.baseline_name
            )
        lines.append(
            [
                f"{row.bench}: {row.name}",
                _number(row.ours, row.unit),
                baseline,
                "-" if row.ratio is None else f"{row.ratio:.3f}x",
                spread(row.samples),
                "-" if row.target is None else str(row.target),
                met,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        out.append(
            "| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + " |"
        )
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    notes = [f"- {row.bench}: {row.name}: {row.note}" for row in rows if row.note]
    return "\n".join(out + (["", *notes] if notes else []))


def write_json(rows: Iterable[Row], path: Path, meta: dict[str, object]) -> None:
    data = {
        "meta": meta,
        "rows": [
            {
                **asdict(row),
                "target": None if row.target is None else str(row.target),
                "met": row.met,
            }
            for row in rows
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
