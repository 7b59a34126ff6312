"""Writing many rows at once, by the fastest path each database offers.

- Inserts: on PostgreSQL, ``COPY ... FROM STDIN`` through psycopg's
  ``cursor.copy()`` (one stream instead of a statement per row, or per
  batch of rows); elsewhere an ``executemany``.
- Updates and other statements run once per row: an ``executemany``, which
  psycopg 3 sends in pipeline mode (no round trip per row).
- Deletes of many keys: ``IN`` lists in chunks.

Knows tables and rows, nothing about what the rows mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Column, ColumnElement, Connection, Executable, Table, delete, insert
from sqlalchemy.exc import DBAPIError

#: keys per IN list (SQLite allows 32766 bound parameters, PostgreSQL 65535)
_CHUNK = 500
#: below this many rows a plain INSERT costs no more than setting up a COPY
_COPY_MIN_ROWS = 64


def insert_rows(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows`` (dicts of column values) into ``table``; rows may differ in the columns they give."""
    by_keys: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        by_keys.setdefault(tuple(row), []).append(row)
    for keys, group in by_keys.items():
        if conn.dialect.driver == "psycopg" and len(group) >= _COPY_MIN_ROWS and _copyable(table, keys):
            _copy(conn, table, keys, group)
        else:
            conn.execute(insert(table), group)


def execute_many(conn: Connection, stmt: Executable, rows: Sequence[Mapping[str, Any]]) -> None:
    """Run ``stmt`` (an UPDATE with bound parameters, say) once per row, as one executemany."""
    if rows:
        conn.execute(stmt, list(rows))


def delete_in(
    conn: Connection, table: Table, column: Column[Any], keys: Sequence[Any], *where: ColumnElement[bool]
) -> None:
    """Delete the rows of ``table`` whose ``column`` is one of ``keys`` (and that match ``where``)."""
    for i in range(0, len(keys), _CHUNK):
        conn.execute(delete(table).where(*where, column.in_(keys[i : i + _CHUNK])))


def _copyable(table: Table, keys: Sequence[str]) -> bool:
    """COPY fills an omitted column with its server default only: every Python-side default must be given."""
    return all(c.name in keys for c in table.c if c.default is not None and c.server_default is None)


def _copy(conn: Connection, table: Table, keys: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    dialect = conn.dialect
    prep = dialect.identifier_preparer
    # the columns' own conversions (the checked types of db.types) apply as they would to an INSERT
    procs = [(k, table.c[k].type.bind_processor(dialect)) for k in keys]
    sql = f"COPY {prep.format_table(table)} ({', '.join(prep.quote(k) for k in keys)}) FROM STDIN"
    raw: Any = conn.connection.dbapi_connection  # a psycopg connection (its cursors have copy())
    assert raw is not None, "an open connection has a driver connection"
    try:
        with raw.cursor() as cur, cur.copy(sql) as copy:
            for row in rows:
                copy.write_row([row[k] if p is None else p(row[k]) for k, p in procs])
    except dialect.loaded_dbapi.Error as e:
        # as SQLAlchemy reports any driver error (translate_db_errors and callers expect its classes)
        raise DBAPIError.instance(sql, None, e, dialect.loaded_dbapi.Error, dialect=dialect) from e
