"""``status`` on a local SQLite file, read through the standard library's ``sqlite3``.

Importing SQLAlchemy alone takes about 13 times as long as starting Python,
more than the whole ``status`` command may. So when the store is a plain
SQLite file at this package's head revision, ``status`` runs the statements of
``status_sql`` through ``sqlite3``, read-only (``mode=ro``: it can never write).
Anything out of the ordinary (a URL, a missing or unreadable file, another
revision, a locked or damaged database, a stored value of the wrong kind) gives
None, and the caller opens the store the usual way, which reports it exactly.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..locations import sqlite_file_url
from . import status_sql
from .migrate import SCHEMA_HEAD

#: paths whose URL SQLAlchemy parses and shows back unchanged (others take the usual way)
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_./~-]+")
#: how SQLAlchemy writes a DATETIME into SQLite; any other text takes the usual way
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d{6})?")
_U64 = 1 << 64


class _Unusual(Exception):
    """A value the usual path would read differently or refuse."""


def _checked(kind: str, value: Any) -> Any:
    """``value`` as the checked column type of ``kind`` reads it (``db/types.py``)."""
    if value is None:
        return None
    if kind in ("int", "u64") and type(value) is int:
        return value + _U64 if kind == "u64" and value < 0 else value
    if kind == "text" and type(value) is str:
        return value
    if kind == "timestamp" and type(value) is str and _TIMESTAMP.fullmatch(value):
        return dt.datetime.fromisoformat(value)
    raise _Unusual(kind, value)


def _runner(conn: sqlite3.Connection) -> status_sql.Run:
    def run(sql: str, params: dict[str, Any]) -> Sequence[Sequence[Any]]:
        rows = conn.execute(sql, params).fetchall()
        kinds = status_sql.COLUMNS.get(sql)
        if kinds is None:
            return rows
        return [tuple(_checked(kind, v) for (_, kind), v in zip(kinds, row, strict=True)) for row in rows]

    return run


def read(location: str) -> dict[str, Any] | None:
    """The status (``status_sql.read_status``) of the SQLite file at ``location``, or None when the
    usual path must answer."""
    if "://" in location or not location.strip():
        return None
    url = sqlite_file_url(location)
    path = Path(url.removeprefix("sqlite:///"))
    if not _PLAIN_PATH.fullmatch(str(path)) or not path.is_file():
        return None
    try:
        # timeout 0: a database busy with a writer's checkpoint takes the usual way, which waits
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=0, isolation_level=None)
    except sqlite3.Error:
        return None
    try:
        conn.execute("BEGIN")  # one snapshot for every statement
        if conn.execute(status_sql.REVISION).fetchall() != [(SCHEMA_HEAD,)]:
            return None
        return status_sql.read_status(_runner(conn), url, SCHEMA_HEAD)
    except (sqlite3.Error, _Unusual, ArithmeticError, TypeError, ValueError):
        return None
    finally:
        conn.close()
