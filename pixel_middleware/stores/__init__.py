"""Where records go: one small interface, chosen everywhere by a store URL.

``sqlite:///path`` (the default, ``./pixel-events.sqlite3``), ``jsonl:///path``,
``memory://``, ``redis://``, ``forward+https://`` (forwarding) and ``fanout://``
(several of them at once).

Paths in ``sqlite:`` and ``jsonl:`` URLs follow SQLAlchemy's convention: after
the scheme come ``//`` (an empty host), then ``/``, then the path as written.
So three slashes start a path relative to the working directory and four an
absolute one::

    sqlite:///pixel-events.sqlite3      ./pixel-events.sqlite3
    sqlite:////var/lib/pixels.sqlite3   /var/lib/pixels.sqlite3
    jsonl:///events.jsonl               ./events.jsonl

A plain file path is a store too, chosen by its suffix (``.sqlite3``,
``.sqlite``, ``.db``, ``.jsonl``) and made absolute: ``./events.sqlite3``,
``/var/lib/pixels.jsonl``.

Usage::

    store = open_store("sqlite:///pixels.sqlite3")
    store.write([record])
    for position, record in store.read(accepted=False, limit=10):
        ...
    store.close()

Adding a store: write ``stores/<name>.py`` with a class that satisfies
:class:`Store` and can be made from its URL alone (its constructor, or a
``from_url`` class method), and add its schemes to ``_SCHEMES`` below. The
module is imported only when its scheme is opened, so a store's third-party
dependencies are never imported by the others.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pixel_middleware.core import PixelRecord
from pixel_middleware.display import terminal_text

__all__ = [
    "DEFAULT_STORE_URL",
    "PRIVATE_MODE",
    "STORE_ENV_VAR",
    "RecordError",
    "Store",
    "StoreError",
    "StoreNotFoundError",
    "open_store",
    "redact_url",
    "redacted_error",
    "store_identity",
    "store_schemes",
    "store_url_of_path",
]

DEFAULT_STORE_URL = "sqlite:///pixel-events.sqlite3"
STORE_ENV_VAR = "PIXEL_STORE"


class StoreError(Exception):
    """A store could not write or read; the records given to it were not kept."""


class StoreNotFoundError(StoreError):
    """The store a reader named does not exist (``open_store(url, create=False)``).

    A typo in a path, most often: reading never creates a store, so that a
    reader of ``jsonl:///typo.jsonl`` is told so instead of seeing it empty.
    """


class RecordError(StoreError):
    """A record cannot be kept by any store (a field missing, a value not JSON).

    Trying again will not help, unlike other store errors: the recorder sets
    such records aside (logging them) instead of retrying them forever.
    """


class Store(Protocol):
    """What every store does; see the module docstring for the URLs.

    A write that returned has been kept: it survives the writing process being
    killed (``kill -9``). Whether it survives a power loss is each store's
    option (``sqlite:...?synchronous=full``, ``jsonl:...?fsync=true``).
    Accepted and rejected records alike are kept. Positions are strings that
    only the store that gave them understands: hand them back as ``after``
    (``events --follow`` does) to read what came since.
    """

    # The store's URL, safe to show: passwords and secret query parameters
    # masked (redact_url). Stores also have ``spool_key``, the URL as given
    # (secrets included, so never shown), for a recorder to hash into its spool
    # directory: two stores that differ only in a password or a write key are
    # two stores, and must not share a spool. Not part of the Protocol, so that
    # a store of one's own needs none (use ``store_identity(store)``).
    url: str

    def write(self, records: Sequence[PixelRecord]) -> None:
        """Keep ``records`` durably, in order, all or none; raise StoreError on failure."""

    def read(
        self,
        *,
        accepted: bool | None = None,
        call: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[str, PixelRecord]]:
        """Matching records after position ``after``, oldest first, each with its position.

        ``limit`` caps how many: with ``after``, the OLDEST ``limit`` records
        after it, so that a reader paging forward (handing back the last
        position it got) sees every record however many arrived in between;
        without ``after``, the newest ``limit`` (the latest N, still oldest
        first).
        """

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Scheme:
    """Where the store for one URL scheme lives, imported on first use."""

    module: str
    # The callable in `module` that takes the URL and returns the store: a
    # class, or a dotted path such as "SQLiteStore.from_url".
    factory: str
    # The pip extra that brings the store's dependencies, named in the error
    # when they are missing.
    extra: str | None = None
    # Whether the factory takes ``create=`` (stores kept in a file of their own).
    takes_create: bool = False


_SCHEMES: dict[str, _Scheme] = {
    "sqlite": _Scheme("pixel_middleware.stores.sqlite", "SQLiteStore.from_url", takes_create=True),
    "jsonl": _Scheme("pixel_middleware.stores.jsonl", "JSONLStore.from_url", takes_create=True),
    "memory": _Scheme("pixel_middleware.stores.memory", "MemoryStore.from_url"),
    "redis": _Scheme("pixel_middleware.stores.redis", "RedisStore", extra="redis"),
    "rediss": _Scheme("pixel_middleware.stores.redis", "RedisStore", extra="redis"),
    "forward+http": _Scheme("pixel_middleware.stores.forward", "ForwardStore", extra="forward"),
    "forward+https": _Scheme("pixel_middleware.stores.forward", "ForwardStore", extra="forward"),
    "postgresql": _Scheme(
        "pixel_middleware.stores.postgresql",
        "PostgreSQLStore.from_url",
        extra="postgresql",
        takes_create=True,
    ),
    "postgres": _Scheme(
        "pixel_middleware.stores.postgresql",
        "PostgreSQLStore.from_url",
        extra="postgresql",
        takes_create=True,
    ),
    "fanout": _Scheme("pixel_middleware.stores.fanout", "FanoutStore.from_url", takes_create=True),
}


def store_schemes() -> list[str]:
    """The URL schemes :func:`open_store` knows, sorted."""
    return sorted(_SCHEMES)


def open_store(url: str | None = None, *, create: bool = True) -> Store:
    """Open the store ``url`` names.

    ``None`` means the ``PIXEL_STORE`` environment variable, else
    :data:`DEFAULT_STORE_URL`. A URL that is malformed or names an unknown
    scheme raises ``ValueError`` saying what would work; a store that cannot be
    opened (a directory that cannot be created, a missing dependency) raises
    ``ValueError`` or :class:`StoreError` from here, not at the first write.

    ``create=False`` is for readers: a ``sqlite:`` or ``jsonl:`` store whose
    file does not exist raises :class:`StoreNotFoundError` instead of being
    created empty. The other stores have no file of their own to create and
    open as usual.
    """
    if url is None:
        url = os.environ.get(STORE_ENV_VAR) or DEFAULT_STORE_URL
    url = store_url_of_path(url)
    scheme, sep, _ = url.partition("://")
    known = ", ".join(f"{name}://" for name in store_schemes())
    if not sep or not scheme:
        raise ValueError(f"store URL {redact_url(url)!r} has no scheme; expected one of {known}")
    entry = _SCHEMES.get(scheme.lower())
    if entry is None:
        raise ValueError(
            f"unknown store URL scheme {scheme!r} in {redact_url(url)!r}; expected one of {known}"
        )
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        if exc.name == entry.module:
            raise ValueError(
                f"the {scheme}:// store is not part of this version of pixel-middleware"
            ) from exc
        hint = f" (pip install 'pixel-middleware[{entry.extra}]')" if entry.extra else ""
        raise ValueError(
            f"the {scheme}:// store needs {exc.name or 'a missing module'}{hint}"
        ) from exc
    if create and entry.takes_create and scheme.lower() in _FILE_SUFFIXES.values():
        _check_parent_directory(url, scheme.lower())
    factory: Any = module
    for name in entry.factory.split("."):
        factory = getattr(factory, name)
    store: Store = factory(url, create=create) if entry.takes_create else factory(url)
    return store


# A plain file path is a store too, chosen by its suffix.
_FILE_SUFFIXES: dict[str, str] = {
    ".sqlite3": "sqlite",
    ".sqlite": "sqlite",
    ".db": "sqlite",
    ".jsonl": "jsonl",
}


def store_url_of_path(text: str) -> str:
    """The store URL for ``text``: a URL as it is, or a plain file path made into one.

    ``./events.sqlite3``, ``/var/lib/pixels.jsonl``: the store is chosen by the
    suffix (``.sqlite3``, ``.sqlite``, ``.db``: SQLite; ``.jsonl``: JSON Lines) and
    the path made absolute, so that what is shown is where the file is.
    ``sqlite:pixels.sqlite3`` (a scheme without ``//``) raises ``ValueError``
    explaining the ``///`` form; so does a path with another suffix.
    """
    if "://" in text:
        return text
    head, colon, rest = text.partition(":")
    if colon and head.lower() in _SCHEMES and "/" not in head:
        scheme = head.lower()
        example = rest.lstrip("/") or "pixels.sqlite3"
        raise ValueError(
            f"store URL {redact_url(text)!r} needs '//' after '{scheme}:':"
            f" {scheme}:///{example} is {example} relative to the working directory,"
            f" {scheme}:////abs/path one from the root (or give the file path alone)"
        )
    suffix = os.path.splitext(text)[1].lower()
    file_scheme = _FILE_SUFFIXES.get(suffix)
    if file_scheme is None or not text.strip() or "?" in text or "#" in text:
        suffixes = ", ".join(_FILE_SUFFIXES)
        known = ", ".join(f"{name}://" for name in store_schemes())
        raise ValueError(
            f"store {redact_url(text)!r} is neither a store URL ({known}) nor a file"
            f" path ending in {suffixes} (without '?' or '#')"
        )
    # Three slashes, then the absolute path (which starts with its own "/").
    return f"{file_scheme}:///{os.path.abspath(os.path.expanduser(text))}"


def _check_parent_directory(url: str, scheme: str) -> None:
    """A store file's directory must exist: say so, naming it, instead of ENOENT."""
    path, _ = _file_url_parts(url, scheme)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StoreError(
            f"the directory {directory} does not exist, so the store file"
            f" {os.path.basename(path)} cannot be created there: create it"
            f" (mkdir -p {directory}) or choose another path"
        )


# Query parameters whose values are secrets, compared without case and without
# "_" or "-" (so writeKey, write_key and write-key are one name).
_SECRET_PARAMS = frozenset(
    {
        "writekey",
        "token",
        "accesstoken",
        "authtoken",
        "password",
        "passwd",
        "pass",
        "pwd",
        "secret",
        "apikey",
        "key",
        "auth",
        "authorization",
        "credentials",
    }
)
# scheme://user:password@host: the password is everything between the first
# ":" after "//" and the last "@" before the path.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/?#@:\s]*:)[^/?#\s]*(?=@)")
_QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[^=&;#\s]+)=)(?P<value>[^&;#\s]*)")
MASK = "***"


def redact_url(url: str) -> str:
    """``url`` safe to print, log, put in an error or show on a page.

    The password in ``scheme://user:password@host`` and the value of every
    secret query parameter (write keys, tokens, passwords, API keys) become
    ``***``. Works on any text holding URLs, such as a ``fanout://`` URL that
    lists several, each masked in turn::

        >>> redact_url("fanout://redis://:s3cret@cache:6379/0 forward+https://api.segment.io?write_key=wk")
        'fanout://redis://:***@cache:6379/0 forward+https://api.segment.io?write_key=***'
    """
    url = _USERINFO.sub(lambda m: m["head"] + MASK, url)
    return _QUERY_PARAM.sub(_mask_param, url)


def store_identity(store: object) -> str:
    """What tells ``store`` apart from every other store, secrets included: never show it.

    Its ``spool_key`` (the URL it was opened with, password and write key
    included), else its ``url``, else its type's name. A recorder hashes this
    into the name of its default spool directory, so that two stores differing
    only in a secret never share a spool, and a store opened from the same URL
    as before finds the spool it left.
    """
    for attribute in ("spool_key", "url"):
        value = getattr(store, attribute, None)
        if isinstance(value, str) and value:
            return value
    return type(store).__name__


def redacted_error(exc: BaseException, limit: int = 500) -> str:
    """An error's text fit to show or log: secrets masked (:func:`redact_url`),
    escaped to one line, and cut to ``limit`` characters. A store's error may
    quote its URL, and a network error what a server said."""
    return terminal_text(redact_url(str(exc)))[:limit]


def _mask_param(match: re.Match[str]) -> str:
    name = match["name"].lower().replace("_", "").replace("-", "")
    if name in _SECRET_PARAMS and match["value"]:
        return match["head"] + MASK
    return match[0]


# Shared by the stores in this package; not public API.


def _file_url_parts(url: str, scheme: str) -> tuple[str, dict[str, str]]:
    """The path and the query options of a ``scheme:///path?name=value`` URL.

    Three slashes then a relative path, or four then an absolute one, as in
    SQLAlchemy's ``sqlite:`` URLs. The path is taken as written (no
    percent-decoding), so any file name can be spelled.
    """
    prefix = f"{scheme}://"
    shown = redact_url(url)
    if not url.lower().startswith(prefix):
        raise ValueError(f"not a {prefix} URL: {shown!r}")
    rest, _, query = url[len(prefix) :].partition("?")
    if not rest.startswith("/") or len(rest) < 2:
        raise ValueError(
            f"{shown!r} names no file: write {prefix}/relative/path or {prefix}//absolute/path"
        )
    options: dict[str, str] = {}
    for item in query.split("&") if query else []:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ValueError(f"an option in {shown!r} is not name=value")
        options[name] = value
    return rest[1:], options


def _unknown_options(url: str, options: dict[str, str], known: Sequence[str]) -> ValueError:
    names = ", ".join(sorted(options))
    allowed = ", ".join(known) or "none"
    return ValueError(
        f"unknown option(s) {names} in {redact_url(url)!r}; this store takes: {allowed}"
    )


# The largest position a store that numbers its records can give: SQLite's
# INTEGER (and a file offset) is a signed 64-bit number.
_MAX_POSITION = 2**63 - 1
_POSITION = re.compile(r"[0-9]{1,19}")
# What of a bad position an error repeats: enough to recognise it, no more.
_SHOWN = 40


def _parse_position(after: str) -> int:
    """A position given back to a store that numbers its records (0 to 2**63 - 1).

    Only plain ASCII digits, as the stores write them: ``int()`` alone would also
    take ``" 7"``, ``"+7"``, ``"1_0"`` and other scripts' digits, and a number
    past 2**63 - 1 would overflow SQLite (an ``OverflowError``, not a clear answer).
    """
    if not isinstance(after, str) or not _POSITION.fullmatch(after) or int(after) > _MAX_POSITION:
        shown = after[:_SHOWN] + "..." if isinstance(after, str) and len(after) > _SHOWN else after
        raise ValueError(f"not a position of this store: {shown!r}")
    return int(after)


# Files that hold records are private to the user that runs the store: pixels
# carry user ids, IP addresses and write keys.
PRIVATE_MODE = 0o600

_UNWRITABLE_HINT = (
    "check the permissions of the file and of its directory (ls -l) and that the"
    " file is not immutable (lsattr; chattr -i clears it), or choose another path"
)


def _create_private(path: str | os.PathLike[str]) -> bool:
    """Create ``path`` empty with mode 0600 if it does not exist; whether it was created.

    The mode is set with ``fchmod`` too, so a umask cannot widen or narrow it. A
    file that exists keeps its mode: its owner chose it. Errors other than the
    file existing are raised (``OSError``).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_MODE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, PRIVATE_MODE)
    finally:
        os.close(fd)
    return True


def _unwritable(path: str | os.PathLike[str], reason: object) -> StoreError:
    """The error of a store whose file can be opened but not written."""
    return StoreError(
        f"{os.fspath(path)} cannot be written ({reason}), so every record would go to"
        f" the spool: {_UNWRITABLE_HINT}"
    )


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a count of 0 or more, got {limit!r}")
