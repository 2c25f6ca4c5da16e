"""``pixel-middleware check``: did the pixels a CI run expects arrive, and none rejected?

Usage (the command line wires its arguments to :func:`run_check`)::

    pixel-middleware check --store sqlite:///pixels.sqlite3 \\
        --expect 'Email Opened>=1' --expect 'page>=2' --no-rejected --since 10m
    pixel-middleware check --url http://127.0.0.1:8000 --expect 'track==3' --junit check.xml

An expectation is ``NAME OP COUNT``: ``NAME`` is a call (``track``, ``page``,
...) or else an event name (the track event, the page or screen name);
``call:NAME`` or ``event:NAME`` says which when a name could be both. ``OP`` is
one of ``>=``, ``<=``, ``==``, ``>``, ``<``. Expectations count the records that
match the filters (the API's: :mod:`pixel_middleware.record_filter`) and, unless
a verdict filter says otherwise, only accepted ones: a rejected pixel is a
failure, not an arrival. ``--no-rejected`` fails when any record in the
filters' scope was rejected.

The records come from a store (read only, never created) or from a running
collector's JSON API (``/api/counts`` and ``/api/events``), with a read token
sent as ``Authorization: Bearer`` when one is given.

This module also explains near misses for the pytest plugin
(:func:`near_misses`, :func:`mismatch_lines`): the records that matched all but
a few filters, with what each held instead.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

from pixel_middleware.core import CALLS, PixelRecord
from pixel_middleware.display import event_name, pixel_line, terminal_text
from pixel_middleware.record_filter import (
    FilterError,
    RecordFilter,
    count_records,
    parse_filter,
)
from pixel_middleware.stores import StoreError, StoreNotFoundError, open_store, redact_url

__all__ = [
    "MAX_SCAN",
    "OPERATORS",
    "ApiSource",
    "CheckError",
    "CheckResult",
    "Expectation",
    "ExpectationResult",
    "RecordSource",
    "StoreSource",
    "mismatch_lines",
    "near_misses",
    "parse_expectation",
    "parse_since",
    "problem_lines",
    "run_check",
]

#: The most records read from a store (its newest) for one check.
MAX_SCAN: Final = 100_000
#: The comparisons an expectation may use, longest first (so ``>=`` is not ``>``).
OPERATORS: Final[dict[str, Callable[[int, int], bool]]] = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}
#: Records shown under a failed expectation.
SHOWN_RECORDS: Final = 3
#: The longest expectation, in characters.
MAX_EXPECTATION_CHARS: Final = 300
#: The most bytes read from one answer of a collector.
MAX_ANSWER_BYTES: Final = 8 * 1024 * 1024
#: Seconds to wait for a collector's answer.
HTTP_TIMEOUT: Final = 15.0

_ALL_CALLS: Final = frozenset(call for calls in CALLS.values() for call in calls)
_EXPECTATION: Final = re.compile(r"^(?P<name>.+?)\s*(?P<op>>=|<=|==|>|<)\s*(?P<count>\d{1,9})\s*$")
_DURATION: Final = re.compile(r"^(?P<amount>\d{1,9}(?:\.\d{1,6})?)(?P<unit>[smhd])$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_VALUE_CHARS: Final = 80
# The newest records searched for near misses outside the filters.
_NEAR_MISS_SCAN: Final = 500


class CheckError(Exception):
    """The check could not run (a bad argument, an unreadable source); exit status 2."""


# --- expectations --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expectation:
    """``count(records named name) op value``; ``kind``: ``call``, ``event`` or ``rejected``."""

    kind: str
    name: str
    op: str
    value: int

    @property
    def text(self) -> str:
        if self.kind == "rejected":
            return "no rejected pixels"
        return f"{self.name} {self.op} {self.value}"

    def holds(self, count: int) -> bool:
        return OPERATORS[self.op](count, self.value)


def parse_expectation(text: str) -> Expectation:
    """``'Email Opened>=1'``, ``'page >= 2'``, ``'event:page==1'``; raises :class:`CheckError`."""
    if len(text) > MAX_EXPECTATION_CHARS:
        raise CheckError(f"an --expect is at most {MAX_EXPECTATION_CHARS} characters")
    found = _EXPECTATION.match(text.strip())
    if found is None:
        raise CheckError(
            "an --expect is NAME OP COUNT, such as 'Email Opened>=1' or 'page==2'"
            f" (OP: {', '.join(OPERATORS)})"
        )
    name = found["name"].strip()
    if name[-1] in "=<>!":
        # 'page=>1' or 'page!=1': a mistyped operator, not an event named 'page='.
        raise CheckError(f"an --expect's operator is one of {', '.join(OPERATORS)}")
    kind = "call" if name in _ALL_CALLS else "event"
    for prefix in ("call:", "event:"):
        if name.startswith(prefix):
            kind, name = prefix[:-1], name[len(prefix) :].strip()
    if not name:
        raise CheckError("an --expect needs a call or event name before its operator")
    if kind == "call" and name not in _ALL_CALLS:
        raise CheckError(f"call: names one of {', '.join(sorted(_ALL_CALLS))}")
    return Expectation(kind, name, found["op"], int(found["count"]))


def parse_since(text: str, *, now: datetime | None = None) -> str:
    """``--since``: a duration back from now (``90s``, ``10m``, ``2h``, ``1d``) or an ISO time.

    Returns the ISO 8601 time the ``since`` filter takes.
    """
    found = _DURATION.match(text.strip())
    if found is not None:
        seconds = float(found["amount"]) * _UNITS[found["unit"]]
        moment = (now or datetime.now(UTC)) - timedelta(seconds=seconds)
        return moment.isoformat()
    try:
        parse_filter({"since": [text]})
    except FilterError:
        raise CheckError(
            "--since takes a duration (90s, 10m, 2h, 1d) or an ISO 8601 time (2025-01-31T12:00:00Z)"
        ) from None
    return text


# --- where records come from ------------------------------------------------------


Params = dict[str, list[str]]


class RecordSource(Protocol):
    """Records by filter parameters (the API's names); ``describe`` is safe to show."""

    describe: str

    def counts(self, params: Mapping[str, Sequence[str]]) -> dict[str, Any]:
        """``/api/counts``'s answer: total, accepted, rejected, byCall, byEvent, byRule."""
        ...

    def newest(self, params: Mapping[str, Sequence[str]], limit: int) -> list[PixelRecord]:
        """The newest ``limit`` matching records, oldest first."""
        ...


class StoreSource:
    """Reads a store once (its newest :data:`MAX_SCAN` records) and filters here."""

    def __init__(self, url: str | None) -> None:
        try:
            store = open_store(url, create=False)
        except StoreNotFoundError as exc:
            raise CheckError(f"{exc} (check --store)") from None
        except (ValueError, StoreError) as exc:
            raise CheckError(str(exc)) from None
        self.describe = redact_url(str(getattr(store, "url", url or "")))
        try:
            self._records = [record for _, record in store.read(limit=MAX_SCAN)]
        except StoreError as exc:
            raise CheckError(f"reading the store failed: {exc}") from None
        finally:
            store.close()

    def _matching(self, params: Mapping[str, Sequence[str]]) -> list[PixelRecord]:
        flt = _parse(params)
        return [record for record in self._records if flt.matches(record)]

    def counts(self, params: Mapping[str, Sequence[str]]) -> dict[str, Any]:
        return count_records(self._matching(params)).as_json()

    def newest(self, params: Mapping[str, Sequence[str]], limit: int) -> list[PixelRecord]:
        return self._matching(params)[-limit:]


class ApiSource:
    """A running collector's JSON API; ``token`` goes in ``Authorization: Bearer``."""

    def __init__(self, url: str, *, token: str | None = None) -> None:
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
            raise CheckError(
                "--url is the collector's address, such as http://127.0.0.1:8000"
                " (http or https, no query)"
            )
        self._base = urllib.parse.urlunsplit(
            (parts.scheme, parts.netloc, parts.path.rstrip("/"), "", "")
        )
        self.describe = redact_url(self._base)
        self._token = token or None

    def counts(self, params: Mapping[str, Sequence[str]]) -> dict[str, Any]:
        return self._get("/api/counts", params)

    def newest(self, params: Mapping[str, Sequence[str]], limit: int) -> list[PixelRecord]:
        answer = self._get("/api/events", {**params, "limit": [str(limit)], "order": ["desc"]})
        records = answer.get("records")
        return list(reversed(records)) if isinstance(records, list) else []

    def _get(self, path: str, params: Mapping[str, Sequence[str]]) -> dict[str, Any]:
        query = urllib.parse.urlencode([(k, v) for k, vs in params.items() for v in vs])
        request = urllib.request.Request(f"{self._base}{path}?{query}")
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as answer:
                body = answer.read(MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise CheckError(self._refusal(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CheckError(
                f"cannot reach the collector at {self.describe}: {terminal_text(str(reason))}"
            ) from None
        if len(body) > MAX_ANSWER_BYTES:
            raise CheckError(f"the collector at {self.describe} answered more than expected")
        try:
            value = json.loads(body)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise CheckError(
                f"{self.describe} did not answer as a pixel collector's API does"
                " (is --url the collector's address?)"
            )
        return value

    def _refusal(self, exc: urllib.error.HTTPError) -> str:
        if exc.code in (401, 403):
            return (
                f"the collector at {self.describe} refused to be read (HTTP {exc.code}):"
                " give its read token with --token or PIXEL_READ_TOKEN"
            )
        try:
            message = str(json.loads(exc.read(64 * 1024)).get("error", ""))
        except (ValueError, AttributeError, OSError):
            message = ""
        said = f": {terminal_text(message[:200])}" if message else ""
        return f"the collector at {self.describe} answered HTTP {exc.code}{said}"


def _parse(params: Mapping[str, Sequence[str]]) -> RecordFilter:
    try:
        return parse_filter(params)
    except FilterError as exc:
        raise CheckError(str(exc)) from None


# --- near misses ----------------------------------------------------------------


def near_misses(
    flt: RecordFilter, records: Sequence[Mapping[str, Any]], *, limit: int = SHOWN_RECORDS
) -> list[tuple[Mapping[str, Any], list[str]]]:
    """The records that failed the fewest filters (and at least one), newest first.

    Each comes with the names of the filters it failed: a record failing one
    filter only is most likely the one a person meant.
    """
    scored = []
    for age, record in enumerate(reversed(records)):
        failed = flt.mismatches(record)
        if failed:
            scored.append((len(failed), age, record, failed))
    scored.sort(key=lambda item: (item[0], item[1]))
    return [(record, failed) for _, _, record, failed in scored[:limit]]


def mismatch_lines(
    flt: RecordFilter, record: Mapping[str, Any], failed: Sequence[str]
) -> list[str]:
    """For each failed filter: ``properties.plan: expected "pro", got "free"`` (escaped)."""
    lines = []
    for name in failed:
        expected, actual = _expected_and_actual(flt, record, name)
        lines.append(f"{terminal_text(name)}: expected {expected}, got {actual}")
    return lines


def problem_lines(record: Mapping[str, Any]) -> list[str]:
    """``[rule] message`` for each problem of a rejected record (escaped)."""
    lines = []
    for problem in record.get("problems") or ():
        if isinstance(problem, dict):
            rule = terminal_text(str(problem.get("rule", "")))
            message = terminal_text(_cut(str(problem.get("message", "")), 300))
            lines.append(f"[{rule}] {message}")
    return lines


def record_summary(record: Mapping[str, Any]) -> str:
    """When it arrived, then :func:`~pixel_middleware.display.pixel_line`."""
    received = terminal_text(_cut(str(record.get("receivedAt", "")), 40))
    return f"{received} {pixel_line(record)}"


def _expected_and_actual(
    flt: RecordFilter, record: Mapping[str, Any], name: str
) -> tuple[str, str]:
    event = record.get("event")
    event = event if isinstance(event, dict) else {}
    wanted: Sequence[object]
    if name == "accepted":
        wanted, actual = [flt.accepted], record.get("accepted")
    elif name == "dialect":
        wanted, actual = flt.dialects, record.get("dialect")
    elif name == "call":
        wanted, actual = flt.calls, record.get("call")
    elif name == "since":
        wanted = [f"at or after {flt.since.isoformat() if flt.since else ''}"]
        actual = record.get("receivedAt")
    elif name == "event":
        wanted, actual = flt.events, event_name(record)
    elif name == "writeKey":
        wanted, actual = flt.write_keys, record.get("writeKey")
    elif name == "userId":
        wanted, actual = flt.user_ids, event.get("userId", _ABSENT)
    elif name == "anonymousId":
        wanted, actual = flt.anonymous_ids, event.get("anonymousId", _ABSENT)
    elif name == "q":
        return _values(flt.texts), "a record without that text"
    else:
        path = tuple(name.split("."))
        wanted = next((values for p, values in flt.fields if p == path), ())
        actual = _lookup(event, path)
    return _values(wanted), _value(actual)


_ABSENT: Final[Any] = object()


def _lookup(value: Any, path: tuple[str, ...]) -> Any:
    for segment in path:
        if isinstance(value, dict) and segment in value:
            value = value[segment]
        elif isinstance(value, list) and segment.isdigit() and int(segment) < len(value):
            value = value[int(segment)]
        else:
            return _ABSENT
    return value


def _values(values: Sequence[object]) -> str:
    shown = [_value(v) for v in values]
    return shown[0] if len(shown) == 1 else "one of " + ", ".join(shown)


def _value(value: object) -> str:
    if value is _ABSENT:
        return "nothing (absent)"
    text = json.dumps(value, ensure_ascii=False, default=str)
    return terminal_text(_cut(text, _VALUE_CHARS))


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the check ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExpectationResult:
    expectation: Expectation
    count: int
    passed: bool
    #: What to show under a failure: the nearest records, the rule messages.
    details: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CheckResult:
    source: str
    filters: Params
    results: tuple[ExpectationResult, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return all(result.passed for result in self.results)

    @property
    def failures(self) -> int:
        return sum(not result.passed for result in self.results)

    def lines(self, *, ascii_only: bool = False) -> list[str]:
        """The summary: one line per expectation with ✓/✗ and the count, details below."""
        good, bad = ("PASS", "FAIL") if ascii_only else ("✓", "✗")
        out = []
        for result in self.results:
            mark = good if result.passed else bad
            out.append(f"{mark} {terminal_text(result.expectation.text)}: {result.count}")
            out.extend(f"    {line}" for line in result.details)
        failed = self.failures
        verdict = (
            f"{len(self.results)} expectation(s) held"
            if not failed
            else f"{failed} of {len(self.results)} expectation(s) failed"
        )
        out.append(f"{verdict} ({self.source})")
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "failures": self.failures,
            "source": self.source,
            "filters": self.filters,
            "expectations": [
                {
                    "expectation": r.expectation.text,
                    "kind": r.expectation.kind,
                    "name": r.expectation.name,
                    "operator": r.expectation.op,
                    "value": r.expectation.value,
                    "count": r.count,
                    "passed": r.passed,
                    "details": list(r.details),
                }
                for r in self.results
            ],
        }

    def junit_xml(self) -> bytes:
        """JUnit XML: one testsuite, one testcase per expectation, a failure for each miss."""
        suite = ET.Element(
            "testsuite",
            name="pixel-middleware check",
            tests=str(len(self.results)),
            failures=str(self.failures),
            errors="0",
            skipped="0",
        )
        properties = ET.SubElement(suite, "properties")
        ET.SubElement(properties, "property", name="source", value=self.source)
        for result in self.results:
            case = ET.SubElement(
                suite,
                "testcase",
                classname="pixel-middleware.check",
                name=terminal_text(result.expectation.text),
            )
            if not result.passed:
                failure = ET.SubElement(
                    case,
                    "failure",
                    message=f"{terminal_text(result.expectation.text)}: counted {result.count}",
                    type="ExpectationFailed",
                )
                failure.text = "\n".join(result.details)
        root = ET.Element(
            "testsuites", tests=str(len(self.results)), failures=str(self.failures), errors="0"
        )
        root.append(suite)
        xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
        return xml


def run_check(
    source: RecordSource,
    *,
    expectations: Sequence[Expectation],
    no_rejected: bool = False,
    filters: Mapping[str, Sequence[str]] | None = None,
) -> CheckResult:
    """Check ``expectations`` (and ``no_rejected``) against ``source``'s records.

    ``filters``: the API's filter parameters; they set the scope of every
    expectation. Without an ``accepted`` filter, expectations count accepted
    records only.
    """
    scope: Params = {name: list(values) for name, values in (filters or {}).items() if values}
    _parse(scope)  # bad filters are a usage error before anything is read
    if not expectations and not no_rejected:
        raise CheckError("nothing to check: give at least one --expect or --no-rejected")
    counted_params = scope if "accepted" in scope else {**scope, "accepted": ["true"]}
    unverdicted = {name: values for name, values in scope.items() if name != "accepted"}
    counts = source.counts(counted_params)
    everything: dict[str, Any] | None = None
    results = []
    for expectation in expectations:
        by = counts.get("byCall" if expectation.kind == "call" else "byEvent") or {}
        count = int(by.get(expectation.name, 0))
        passed = expectation.holds(count)
        details: list[str] = []
        if not passed:
            if everything is None:
                everything = source.counts(unverdicted)
            details = _explain(source, expectation, unverdicted, everything)
        results.append(ExpectationResult(expectation, count, passed, tuple(details)))
    if no_rejected:
        rejected_params = {**unverdicted, "accepted": ["false"]}
        rejected = int(source.counts(rejected_params).get("total", 0))
        details = []
        if rejected:
            for record in reversed(source.newest(rejected_params, SHOWN_RECORDS)):
                details.append(record_summary(record))
                details.extend(f"  {line}" for line in problem_lines(record))
            if rejected > SHOWN_RECORDS:
                details.append(f"... and {rejected - SHOWN_RECORDS} more rejected")
        results.append(
            ExpectationResult(
                Expectation("rejected", "", "==", 0), rejected, not rejected, tuple(details)
            )
        )
    return CheckResult(source=source.describe, filters=scope, results=tuple(results))


def _explain(
    source: RecordSource,
    expectation: Expectation,
    scope: Params,
    everything: Mapping[str, Any],
) -> list[str]:
    """What arrived instead: that name with another verdict, similar names, or the newest."""
    lines: list[str] = []
    named = {**scope, expectation.kind: [expectation.name]}
    same_name = source.newest(named, SHOWN_RECORDS)
    if same_name:
        lines.append(f"the newest records named {terminal_text(expectation.name)} in scope:")
        for record in reversed(same_name):
            lines.append("  " + record_summary(record))
            lines.extend(f"    {line}" for line in problem_lines(record))
    if expectation.kind == "event":
        names = [str(name) for name in (everything.get("byEvent") or {}) if name]
        close = difflib.get_close_matches(expectation.name, names, n=3, cutoff=0.6)
        close = [name for name in close if name != expectation.name]
        if close:
            lines.append(
                "similar event names that arrived: "
                + ", ".join(f'"{terminal_text(_cut(n, 80))}"' for n in close)
            )
    if not lines and scope:
        # Nothing of that name in scope: the records of that name that the
        # filters left out, with what each held instead.
        wanted = _parse(named)
        for record, failed in near_misses(wanted, source.newest({}, _NEAR_MISS_SCAN)):
            if expectation.kind not in failed:
                if not lines:
                    lines.append("records the filters left out:")
                lines.append("  " + record_summary(record))
                lines.extend(f"    {line}" for line in mismatch_lines(wanted, record, failed))
    if not lines:
        newest = source.newest(scope, SHOWN_RECORDS)
        total = int(everything.get("total", 0))
        if newest:
            lines.append(f"the newest of the {total} record(s) in scope:")
            lines.extend("  " + record_summary(record) for record in reversed(newest))
        else:
            lines.append("no records at all in scope" + (" (check the filters)" if scope else ""))
    return lines


def write_private(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (it quotes records)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)
