"""Writing many rows at once, by the fastest path each database offers.

- Inserts: on PostgreSQL, ``COPY ... FROM STDIN`` through psycopg's
  ``cursor.copy()`` (one stream instead of a statement per row, or per
  batch of rows), in the binary format when every column's type has a
  binary form (a 4 KiB frame then travels as its 4096 bytes, not as 8 KiB
  of hex text the server has to parse); elsewhere an ``executemany``.
- Updates and other statements run once per row: an ``executemany``, which
  psycopg 3 sends in pipeline mode (no round trip per row).
- Many keys: ``IN`` lists in chunks; on PostgreSQL ``= ANY(array)``, one
  parameter instead of one per key (the server parses and plans a query of
  hundreds of ``$n::BIGINT`` far more slowly than one array).

Knows tables and rows, nothing about what the rows mean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    ARRAY,
    Column,
    ColumnDefault,
    ColumnElement,
    Connection,
    Dialect,
    Executable,
    Table,
    any_,
    delete,
    insert,
    literal,
)
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


def one_of(conn: Connection, column: ColumnElement[Any], keys: Sequence[Any]) -> ColumnElement[bool]:
    """``column IN keys``, spelt as the database reads fastest (give at most a chunk of keys)."""
    if conn.dialect.name == "postgresql":
        return column == any_(literal(list(keys), ARRAY(column.type)))
    return column.in_(keys)


def delete_in(
    conn: Connection, table: Table, column: Column[Any], keys: Sequence[Any], *where: ColumnElement[bool]
) -> None:
    """Delete the rows of ``table`` whose ``column`` is one of ``keys`` (and that match ``where``)."""
    for i in range(0, len(keys), _CHUNK):
        conn.execute(delete(table).where(*where, one_of(conn, column, keys[i : i + _CHUNK])))


def _python_defaults(table: Table, keys: Sequence[str]) -> list[Column[Any]]:
    """The omitted columns whose default SQLAlchemy computes in Python (COPY knows server defaults only)."""
    return [c for c in table.c if c.name not in keys and c.default is not None and c.server_default is None]


def _copyable(table: Table, keys: Sequence[str]) -> bool:
    """COPY can give every omitted column its value: a server default, or a Python one computed here."""
    return all(
        isinstance(c.default, ColumnDefault) and (c.default.is_scalar or c.default.is_callable)
        for c in _python_defaults(table, keys)
    )


def _default_value(column: Column[Any]) -> Any:
    """What an INSERT would have put in the omitted ``column``. A callable default (SQLAlchemy wraps the
    argument-less ones to take an execution context) gets none: the models' defaults never read it."""
    default = column.default
    assert isinstance(default, ColumnDefault)
    return default.arg(None) if default.is_callable else default.arg


def _as_is(value: Any) -> Any:
    return value


def _int_range(bits: int) -> Callable[[Any], bool]:
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    return lambda v: type(v) is int and lo <= v < hi


#: PostgreSQL types (as SQLAlchemy spells them, without a length) that a binary COPY may carry, each with
#: the values it takes as they are. psycopg's binary dumpers would wrap an integer too large for its
#: column instead of refusing it, and raise a bare TypeError for a value of another type: a batch with
#: any such value goes as text, where the server refuses or converts it exactly as it would an INSERT's.
_BINARY: dict[str, Callable[[Any], bool]] = {
    "smallint": _int_range(16),
    "integer": _int_range(32),
    "bigint": _int_range(64),
    "bytea": lambda v: isinstance(v, bytes | bytearray | memoryview),
    "varchar": lambda v: type(v) is str,
    "boolean": lambda v: type(v) is bool,
}


def _binary_types(columns: Sequence[Column[Any]], rows: Sequence[Sequence[Any]], dialect: Dialect) -> list[str] | None:
    """The type names to declare for a binary COPY of ``rows`` into ``columns``, or None: text it is."""
    names = [c.type.compile(dialect=dialect).split("(")[0].strip().lower() for c in columns]
    if not all(n in _BINARY for n in names):
        return None
    checks = [_BINARY[n] for n in names]
    ok = all(v is None or check(v) for row in rows for check, v in zip(checks, row, strict=True))
    return names if ok else None


def _copy(conn: Connection, table: Table, keys: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    dialect = conn.dialect
    prep = dialect.identifier_preparer
    # an omitted column's Python default is computed once for the whole COPY
    defaults = {c.name: _default_value(c) for c in _python_defaults(table, keys)}
    names = [*keys, *defaults]
    # the columns' own conversions (the checked types of db.types) apply as they would to an INSERT
    procs = [(k, table.c[k].type.bind_processor(dialect) or _as_is) for k in names]
    values = [[p(row.get(k, defaults.get(k))) for k, p in procs] for row in rows]
    types = _binary_types([table.c[k] for k in names], values, dialect)
    sql = f"COPY {prep.format_table(table)} ({', '.join(prep.quote(k) for k in names)}) FROM STDIN"
    if types:
        sql += " (FORMAT BINARY)"
    raw: Any = conn.connection.dbapi_connection  # a psycopg connection (its cursors have copy())
    assert raw is not None, "an open connection has a driver connection"
    try:
        with raw.cursor() as cur, cur.copy(sql) as copy:
            if types:
                copy.set_types(types)
            for row_values in values:
                copy.write_row(row_values)
    except dialect.loaded_dbapi.Error as e:
        # as SQLAlchemy reports any driver error (translate_db_errors and callers expect its classes)
        raise DBAPIError.instance(sql, None, e, dialect.loaded_dbapi.Error, dialect=dialect) from e
