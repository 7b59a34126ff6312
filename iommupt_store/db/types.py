"""Column types: the stock SQLAlchemy types, checked when a value is read back.

SQLite stores whatever a statement gives it in any column (``UPDATE page SET
contents = 'x'``), and the stock result processing then fails deep inside a
caller (``json.loads``, ``bytes('x')``, ``'abc' << 12``) or, worse, silently
turns the value into something else (``bytes(5)`` is five zero bytes). Every
column of the models uses one of the types below: a value of the wrong kind is
a ``MalformedValue`` (bad data, exit 65) naming the column and the value.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Integer, LargeBinary, String
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

from ..errors import BadData

_2_63 = 1 << 63
_2_64 = 1 << 64


class MalformedValue(BadData):
    """A stored value is not of its column's kind (only SQLite lets that happen)."""

    def __init__(self, column: str, value: Any, expected: str) -> None:
        shown = repr(value)
        if len(shown) > 40:
            shown = shown[:37] + "..."
        super().__init__(f"stored data is malformed: {column} holds {shown}, not {expected} (run 'iommupt-store fsck')")
        self.column = column
        self.value = value


class _Checked(TypeDecorator[Any]):
    """A stock type whose read-back values are checked (see the module docstring)."""

    cache_ok = True
    #: what the column holds, for messages
    expected = "a value"
    #: the Python types the database driver hands back for this column (under SQLite)
    raw_types: tuple[type, ...] = (object,)
    #: "table.column", set once the models are defined (``label_columns``)
    label = "a column"

    def result_processor(self, dialect: Dialect, coltype: Any) -> Callable[[Any], Any] | None:
        inner = super().result_processor(dialect, coltype)
        strict_raw = dialect.name == "sqlite"
        # exact classes first: the common case costs one set lookup (a bool is never an int here)
        exact = frozenset(t for t in self.raw_types if t is not object)

        def process(value: Any) -> Any:
            if value is None:
                return None
            if (
                strict_raw
                and value.__class__ not in exact
                and (not isinstance(value, self.raw_types) or isinstance(value, bool))
            ):
                raise MalformedValue(self.label, value, self.expected)
            if inner is None:
                return value
            try:
                return inner(value)
            except (ValueError, TypeError, OverflowError) as e:
                raise MalformedValue(self.label, value, self.expected) from e

        return process


class Int(_Checked):
    cache_ok = True
    impl = Integer
    expected = "an integer"
    raw_types = (int,)


class BigInt(_Checked):
    cache_ok = True
    impl = BigInteger
    expected = "an integer"
    raw_types = (int,)


class Text(_Checked):
    cache_ok = True
    impl = String
    expected = "text"
    raw_types = (str,)


class Blob(_Checked):
    cache_ok = True
    impl = LargeBinary
    expected = "a blob"
    raw_types = (bytes, memoryview)


class Json(_Checked):
    cache_ok = True
    impl = JSON
    expected = "JSON text"
    raw_types = (str, bytes)


class Timestamp(_Checked):
    cache_ok = True
    impl = DateTime
    expected = "a timestamp"
    raw_types = (str, dt.datetime)


class Flag(_Checked):
    cache_ok = True
    impl = Boolean
    expected = "0 or 1"
    raw_types = (int,)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return value


class U64(_Checked):
    """An unsigned 64-bit value stored in a signed BIGINT as two's complement.

    Upper-half addresses and raw PTEs with bit 63 set do not fit a BIGINT
    (SQLite raises OverflowError, PostgreSQL NumericValueOutOfRange). In SQL
    such a value reads as negative: ``value & 0xffffffffffffffff`` in a
    ``sqlite3`` session shows nothing useful, so use ``printf('0x%x', col)``,
    which prints the two's-complement bit pattern as the unsigned value.
    """

    cache_ok = True
    impl = BigInteger
    expected = "a 64-bit integer"
    raw_types = (int,)

    def process_bind_param(self, value: int | None, dialect: Dialect) -> int | None:
        if value is None:
            return None
        if not 0 <= value < _2_64:
            raise ValueError(f"{value:#x} is not an unsigned 64-bit value")
        return value - _2_64 if value >= _2_63 else value

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        if value is None:
            return None
        v = int(value)
        return v + _2_64 if v < 0 else v


def label_columns(tables: Any) -> None:
    """Give each checked column type its "table.column" (one type object per column)."""
    for table in tables:
        for col in table.columns:
            if isinstance(col.type, _Checked):
                col.type = col.type.copy()
                col.type.label = f"{table.name}.{col.name}"


def checked_kind(type_: TypeEngine[Any]) -> str | None:
    """The SQLite storage class a checked column must hold ('integer', 'text', 'blob'), or None."""
    if isinstance(type_, Int | BigInt | U64 | Flag):
        return "integer"
    if isinstance(type_, Text | Json | Timestamp):
        return "text"
    if isinstance(type_, Blob):
        return "blob"
    return None
