"""pytest fixtures for tracking pixels, loaded through the ``pytest11`` entry point.

Two fixtures, each started only when a test asks for it (installing the
package starts nothing):

- ``pixel_collector``: a real collector (:func:`~pixel_middleware.collector.create_app`
  with a memory store) on 127.0.0.1 and a free port, one per test session,
  emptied before each test. Point a page's ``<img>`` at ``pixel_collector.url``
  (or build the URL with :meth:`PixelCollector.pixel_url`), then assert::

      pixel_collector.wait_for(event="Email Opened", userId="u-42")
      pixel_collector.assert_received(call="page", properties__plan="pro")

- ``pixel_records``: a :class:`PixelRecords` around a fresh ``MemoryStore``
  for your own WSGI app: ``PixelMiddleware(app, store=pixel_records.store)``.

Filters are the collector API's (:mod:`pixel_middleware.record_filter`) as
keyword arguments: ``event``, ``call``, ``dialect``, ``userId``,
``anonymousId``, ``writeKey``, ``accepted`` (``True``/``False``), ``q``,
``since`` (a ``datetime`` or ISO text). A path into the event is spelled with
double underscores, ``properties__plan="pro"``, or given as a dict,
``properties={"plan": "pro"}``; a list or tuple means any of its values.

``wait_for`` and ``assert_received`` count accepted pixels only, unless
``accepted=False`` (or a list of both) is given: a rejected pixel is a bug, not
an arrival. ``events`` lists both.

A failed assertion says what arrived that was close: the records that failed
the fewest filters, each with ``expected ..., got ...`` for what differed, and
the rejected pixels' rule messages.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import pytest

from pixel_middleware._process import start_thread
from pixel_middleware.check import mismatch_lines, near_misses, problem_lines, record_summary
from pixel_middleware.core import PixelRecord
from pixel_middleware.encode import encode_pixel_url
from pixel_middleware.record_filter import FilterError, RecordFilter, parse_filter
from pixel_middleware.stores.memory import MemoryStore

if TYPE_CHECKING:
    from werkzeug.serving import BaseWSGIServer

    from pixel_middleware.middleware import PixelMiddleware

__all__ = ["PixelAssertions", "PixelCollector", "PixelRecords", "filter_params"]

#: The write key :meth:`PixelCollector.pixel_url` uses unless told otherwise.
TEST_WRITE_KEY: Final = "test-write-key"
#: Near misses and rejected pixels shown in a failed assertion's message.
SHOWN: Final = 3
# The most records read to explain a miss.
_EXPLAIN_SCAN: Final = 500
_POLL_SECONDS: Final = 0.02


def filter_params(filters: Mapping[str, object]) -> dict[str, list[str]]:
    """Keyword filters as the API's query parameters (``properties__plan`` → ``properties.plan``).

    Raises ``TypeError`` for a value no filter takes, ``ValueError`` for one
    the API would refuse.
    """
    params: dict[str, list[str]] = {}

    def add(name: str, value: object) -> None:
        if isinstance(value, Mapping):
            for key, child in value.items():
                add(f"{name}.{key}", child)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                add(name, item)
        else:
            params.setdefault(name, []).append(_text(name, value))

    for name, value in filters.items():
        add(name.replace("__", "."), value)
    try:
        parse_filter(params)
    except FilterError as exc:
        raise ValueError(str(exc)) from None
    return params


def _text(name: str, value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)  # as the filter compares: true, 3, null
    raise TypeError(f"the filter {name} takes text, a number, True/False or None")


def _describe(params: Mapping[str, Sequence[str]]) -> str:
    return (
        ", ".join(
            f"{name}={values[0]!r}" if len(values) == 1 else f"{name} in {values!r}"
            for name, values in params.items()
        )
        or "any pixel"
    )


class PixelAssertions:
    """``events``, ``wait_for`` and ``assert_received`` over some records.

    Subclasses say where records come from: :meth:`_records` (every record
    the filter keeps, oldest first) and :meth:`_recent` (the newest, for
    explanations).
    """

    def events(self, **filters: object) -> list[PixelRecord]:
        """The records matching ``filters``, oldest first."""
        return self._records(filter_params(filters))

    def wait_for(
        self, count: int = 1, timeout: float = 5.0, **filters: object
    ) -> list[PixelRecord]:
        """Wait until ``count`` records match and return them; AssertionError at ``timeout``."""
        __tracebackhide__ = True
        _check_count(count)
        params = _accepted_unless_said(filter_params(filters))
        deadline = time.monotonic() + timeout
        while True:
            found = self._records(params)
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise AssertionError(self._explain(params, found, f"at least {count}", timeout))
            time.sleep(_POLL_SECONDS)

    def assert_received(self, count: int | None = None, **filters: object) -> list[PixelRecord]:
        """Assert that records matching ``filters`` arrived: any, or exactly ``count``."""
        __tracebackhide__ = True
        if count is not None:
            _check_count(count, low=0)
        params = _accepted_unless_said(filter_params(filters))
        found = self._records(params)
        if (count is None and not found) or (count is not None and len(found) != count):
            wanted = "at least 1" if count is None else f"exactly {count}"
            raise AssertionError(self._explain(params, found, wanted, None))
        return found

    def _explain(
        self,
        params: Mapping[str, Sequence[str]],
        found: list[PixelRecord],
        wanted: str,
        timeout: float | None,
    ) -> str:
        flt: RecordFilter = parse_filter(params)
        recent = self._recent(_EXPLAIN_SCAN)
        waited = f" within {timeout:g} s" if timeout is not None else ""
        lines = [
            f"expected {wanted} pixel(s) matching {_describe(params)}{waited};"
            f" {len(found)} matched, of {len(recent)} received"
        ]
        misses = near_misses(flt, recent, limit=SHOWN)
        if misses:
            lines.append("nearest pixels (what differed):")
            for record, failed in misses:
                lines.append("  " + record_summary(record))
                lines.extend(f"    {line}" for line in mismatch_lines(flt, record, failed))
                lines.extend(f"    problem {line}" for line in problem_lines(record))
        rejected = [r for r in reversed(recent) if not r.get("accepted")]
        rejected = [r for r in rejected if all(r is not m for m, _ in misses)][:SHOWN]
        if rejected:
            lines.append("rejected pixels:")
            for record in rejected:
                lines.append("  " + record_summary(record))
                lines.extend(f"    {line}" for line in problem_lines(record))
        if not recent:
            lines.append("no pixel arrived at all")
        return "\n".join(lines)

    def _records(self, params: Mapping[str, Sequence[str]]) -> list[PixelRecord]:
        raise NotImplementedError

    def _recent(self, limit: int) -> list[PixelRecord]:
        raise NotImplementedError


def _accepted_unless_said(params: dict[str, list[str]]) -> dict[str, list[str]]:
    # A rejected pixel did not arrive as far as an assertion goes: it counts
    # only when the test asks for it (accepted=False).
    return params if "accepted" in params else {**params, "accepted": ["true"]}


def _check_count(count: object, low: int = 1) -> None:
    if not isinstance(count, int) or isinstance(count, bool) or count < low:
        raise ValueError(f"count must be a whole number >= {low}, got {count!r}")


class PixelRecords(PixelAssertions):
    """Records kept in a :class:`MemoryStore` that your own ``PixelMiddleware`` writes to.

    Usage::

        records = PixelRecords()
        app = PixelMiddleware(my_app, store=records.store)
        ...
        records.assert_received(event="Signed Up")
    """

    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = store if store is not None else MemoryStore()

    def all(self) -> list[PixelRecord]:
        return [record for _, record in self.store.read()]

    def clear(self) -> None:
        self.store.clear()

    def _records(self, params: Mapping[str, Sequence[str]]) -> list[PixelRecord]:
        flt = parse_filter(params)
        return [record for record in self.all() if flt.matches(record)]

    def _recent(self, limit: int) -> list[PixelRecord]:
        return [record for _, record in self.store.read(limit=limit)]


class PixelCollector(PixelAssertions):
    """A collector's records through its JSON API (``/api/events``, ``/api/reset``).

    :param url: The collector's address, e.g. ``http://127.0.0.1:8000``.
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def pixel_url(
        self,
        event: Mapping[str, Any],
        *,
        call: str = "track",
        write_key: str = TEST_WRITE_KEY,
        dialect: str = "segment",
    ) -> str:
        """A pixel URL on this collector (:func:`~pixel_middleware.encode.encode_pixel_url`)."""
        return encode_pixel_url(
            dict(event), call=call, write_key=write_key, dialect=dialect, base_url=self.url
        )

    def clear(self) -> None:
        """Forget every record (``POST /api/reset``)."""
        request = urllib.request.Request(self.url + "/api/reset", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()

    def _records(self, params: Mapping[str, Sequence[str]]) -> list[PixelRecord]:
        return self._get({**params, "order": ["asc"], "limit": ["1000"]})

    def _recent(self, limit: int) -> list[PixelRecord]:
        return list(reversed(self._get({"order": ["desc"], "limit": [str(limit)]})))

    def _get(self, params: Mapping[str, Sequence[str]]) -> list[PixelRecord]:
        query = urllib.parse.urlencode([(k, v) for k, vs in params.items() for v in vs])
        try:
            with urllib.request.urlopen(f"{self.url}/api/events?{query}", timeout=10) as answer:
                records: list[PixelRecord] = json.loads(answer.read())["records"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"the collector refused the query: {exc.read()[:500]!r}") from None
        return records


class _Server:
    """``create_app()`` with a memory store, served by werkzeug in a thread."""

    def __init__(self) -> None:
        from werkzeug.serving import WSGIRequestHandler, make_server

        from pixel_middleware.collector import create_app

        class QuietHandler(WSGIRequestHandler):
            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                pass  # pytest's output is the place for failures, not access logs

        self.app: PixelMiddleware = create_app(store="memory://")
        self.server: BaseWSGIServer = make_server(
            "127.0.0.1", 0, self.app, threaded=True, request_handler=QuietHandler
        )
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="pixel-collector",
            daemon=True,
        )
        start_thread(self._thread)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.app.close()


@pytest.fixture(scope="session")
def _pixel_collector_server() -> Iterator[_Server]:
    server = _Server()
    yield server
    server.close()


@pytest.fixture
def pixel_collector(_pixel_collector_server: _Server) -> PixelCollector:
    """A real collector on 127.0.0.1 (a memory store), emptied before each test."""
    collector = PixelCollector(_pixel_collector_server.url)
    collector.clear()
    return collector


@pytest.fixture
def pixel_records() -> PixelRecords:
    """A fresh :class:`PixelRecords`: pass ``pixel_records.store`` to your ``PixelMiddleware``."""
    return PixelRecords()
