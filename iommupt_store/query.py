"""``iommupt-store query``: one read-only SQL statement, with PTE helpers on SQLite.

On SQLite the connection gets a few functions the stock shell lacks:

- ``le64(blob, index)``: the little-endian u64 at item ``index`` of a frame,
  as a signed 64-bit integer (two's complement at and above 2^63, like every
  u64 the store keeps);
- ``pte_decode(format, level, entry)``: JSON text saying what an entry means
  (see ``formats/describe.py``);
- ``hex64(value)``: ``'0x...'`` of a u64 kept in two's complement;
- ``sha256(blob)``: the hex SHA-256 that ``preservation.content_hash`` holds.

PostgreSQL gets the statement as it is (``sha256`` and ``get_byte`` are built in there).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgument
from .formats import get_format
from .machine import Machine

_U64 = 1 << 64


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def _unsigned(v: int) -> int:
    return v + _U64 if v < 0 else v


def le64(blob: bytes | None, index: int | None) -> int | None:
    if blob is None or index is None or not isinstance(blob, bytes) or not 0 <= index < len(blob) // 8:
        return None
    v = int.from_bytes(blob[index * 8 : index * 8 + 8], "little")
    return v - _U64 if v >= 1 << 63 else v


def pte_decode(fmt_name: str | None, level: int | None, entry: int | None) -> str | None:
    from .formats.describe import describe_entry

    if fmt_name is None or level is None or entry is None:
        return None
    try:
        fmt = get_format(str(fmt_name))
        return json.dumps(describe_entry(fmt, int(level), _unsigned(int(entry))))
    except Exception as e:  # a helper must answer, not abort the query: the reason is the answer
        return json.dumps({"error": str(e)})


def hex64(value: int | None) -> str | None:
    return None if value is None else f"{_unsigned(int(value)):#x}"


def sha256(blob: bytes | None) -> str | None:
    return None if blob is None else hashlib.sha256(bytes(blob)).hexdigest()


def register_helpers(dbapi_conn: sqlite3.Connection) -> None:
    dbapi_conn.create_function("le64", 2, le64, deterministic=True)
    dbapi_conn.create_function("pte_decode", 3, pte_decode, deterministic=True)
    dbapi_conn.create_function("hex64", 1, hex64, deterministic=True)
    dbapi_conn.create_function("sha256", 1, sha256, deterministic=True)


def run_query(machine: Machine, sql: str) -> QueryResult:
    """Run one read-only statement on the machine's store, exactly as written (no parameters).

    Any machine's rows are visible: the SQL decides what to look at."""
    if not sql.strip():
        raise InvalidArgument("the query is empty")
    with machine.transaction(write=False) as tx:
        raw = tx.conn.connection.dbapi_connection
        assert raw is not None, "an open connection has a driver connection"
        if isinstance(raw, sqlite3.Connection):
            register_helpers(raw)
        cur = raw.cursor()  # the driver's own cursor: the statement goes through untouched
        try:
            cur.execute(sql)
            if cur.description is None:
                raise InvalidArgument("the statement returns no rows: query runs SELECT statements only")
            columns = [d[0] for d in cur.description]
            rows = [tuple(r) for r in cur.fetchall()]
        except Exception as e:  # the driver's error types differ (sqlite3, psycopg): all mean a failed query
            if isinstance(e, InvalidArgument):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidArgument(f"query failed: {msg}") from None
        finally:
            cur.close()
    return QueryResult(columns, rows)
