"""Column types the stock SQLAlchemy types lack."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

_2_63 = 1 << 63
_2_64 = 1 << 64


class U64(TypeDecorator[int]):
    """An unsigned 64-bit value stored in a signed BIGINT as two's complement.

    Upper-half addresses and raw PTEs with bit 63 set do not fit a BIGINT
    (SQLite raises OverflowError, PostgreSQL NumericValueOutOfRange). In SQL
    such a value reads as negative: ``value & 0xffffffffffffffff`` in a
    ``sqlite3`` session shows nothing useful, so use ``printf('0x%x', col)``,
    which prints the two's-complement bit pattern as the unsigned value.
    """

    impl = BigInteger
    cache_ok = True

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
