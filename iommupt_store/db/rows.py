"""Reading rows that may have been edited by hand: dangling references and malformed values.

The column types refuse a malformed value when it is read (``types.py``);
``malformed_rows`` finds every such value up front, and every row that breaks a
CHECK constraint of the models (SQLite enforces neither when a tamperer turns
the checks off), naming the table and the row. The database layer knows
nothing of what the values mean.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, Protocol, TypeVar

from sqlalchemy import (
    CheckConstraint,
    Column,
    Connection,
    Integer,
    String,
    Table,
    and_,
    func,
    or_,
    select,
    text,
    type_coerce,
)

from ..errors import BadData
from .models import Base
from .types import Json, MalformedValue, Timestamp, checked_kind

T = TypeVar("T")
P = ParamSpec("P")
#: at most this many rows are named per table and problem
_SHOWN = 5


def required(row: T | None, what: str) -> T:
    """``row``, or bad data naming what a stored reference points to and is not there."""
    if row is None:
        raise BadData(f"{what} does not exist (a dangling reference in the database)")
    return row


def _row_name(table: Table, pk: tuple[Any, ...]) -> str:
    cols = [c.name for c in table.primary_key.columns]
    shown = ", ".join(f"{c}={v!r}" for c, v in zip(cols, pk, strict=True))
    return f"{table.name} row ({shown})"


def _raw(col: Column[Any]) -> Any:
    return type_coerce(col, String()) if checked_kind(col.type) == "text" else type_coerce(col, Integer())


def _column_checks(col: Column[Any]) -> list[tuple[str, Any]]:
    """(what is wrong, SQL condition true for a bad row) for one column, under SQLite."""
    kind = checked_kind(col.type)
    if kind is None:
        return []
    bad: list[tuple[str, Any]] = [(f"{col.name} is not stored as {kind}", func.typeof(col).not_in((kind, "null")))]
    if isinstance(col.type, Json):
        bad.append((f"{col.name} is not valid JSON", func.json_valid(type_coerce(col, String())) == 0))
    if isinstance(col.type, Timestamp):
        raw = type_coerce(col, String())
        bad.append((f"{col.name} is not a timestamp", and_(raw.is_not(None), func.julianday(raw).is_(None))))
    return bad


def malformed_rows(conn: Connection, machine_id: int | None = None, tables: list[str] | None = None) -> list[str]:
    """Rows (of one machine, when given) whose values are not of their column's kind or that break a
    CHECK constraint. Only SQLite can hold such rows; elsewhere the database refuses them."""
    if conn.dialect.name != "sqlite":
        return []
    problems = []
    for table in Base.metadata.sorted_tables:
        if tables is not None and table.name not in tables:
            continue
        conds: list[tuple[str, Any]] = []
        for col in table.columns:
            conds += _column_checks(col)
        conds += [
            (f"breaks the check {c.name}", text(f"NOT ({c.sqltext})"))
            for c in table.constraints
            if isinstance(c, CheckConstraint)
        ]
        scope = _machine_scope(table, machine_id)
        pk = [_raw(c) for c in table.primary_key.columns]
        for what, cond in conds:
            where = cond if scope is None else and_(cond, scope)
            rows = conn.execute(select(*pk).where(where).limit(_SHOWN + 1)).all()
            for row in rows[:_SHOWN]:
                problems.append(f"{_row_name(table, tuple(row))}: {what}")
            if len(rows) > _SHOWN:
                problems.append(f"{table.name}: more rows where {what}")
    return problems


def _machine_scope(table: Table, machine_id: int | None) -> Any:
    if machine_id is None:
        return None
    if "machine_id" in table.c:
        return or_(table.c.machine_id == machine_id, func.typeof(table.c.machine_id) != "integer")
    if table.name == "machine":
        return table.c.id == machine_id
    return None


@contextlib.contextmanager
def naming_rows(conn: Connection, machine_id: int | None = None) -> Iterator[None]:
    """Turn a malformed value met while reading into bad data that also names its row."""
    try:
        yield
    except MalformedValue as e:
        rows = malformed_rows(conn, machine_id, [e.column.split(".")[0]])
        if not rows:
            raise
        more = f" (and {len(rows) - 1} more: run 'iommupt-store fsck')" if len(rows) > 1 else ""
        raise BadData(f"stored data is malformed: {rows[0]}{more}") from e


class _HasMachine(Protocol):
    id: int


class _Unit(Protocol):
    """What the readers get: a connection and the machine they read for (a ``Transaction``)."""

    conn: Connection
    machine: _HasMachine


def reads_stored_rows(fn: Callable[P, T]) -> Callable[P, T]:
    """For a reader whose first argument is a transaction: malformed values it meets name their rows."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        tx: _Unit = args[0]  # type: ignore[assignment]
        with naming_rows(tx.conn, tx.machine.id):
            return fn(*args, **kwargs)

    return wrapper
