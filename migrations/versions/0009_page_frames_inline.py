"""page frames inline: PostgreSQL keeps a 4 KiB frame in its row, uncompressed

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 03:00:00.000000

A ``page`` row of a 4 KiB frame is over PostgreSQL's TOAST threshold (about
2 KiB), so by default every write first tries to compress ``contents`` and then
moves it out of line in chunks, and every read fetches and decompresses it.
For page tables that work buys little and costs most of a bulk write. Raising
the table's ``toast_tuple_target`` to its maximum (8160 bytes) keeps a row that
fits in a heap page exactly as written: no compression attempt, no TOAST
fetch. Larger blocks (order 1 and up) are toasted as before. Rows stored
earlier keep their form until rewritten; both forms read the same.

Nothing changes on SQLite. Downgrade resets the option: lossless.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: the largest toast_tuple_target PostgreSQL accepts (a heap page less its header)
TOAST_TUPLE_TARGET = 8160


def would_lose(conn: sa.Connection) -> list[str]:
    """Lossless: a storage option, no data."""
    return []


def _postgresql() -> bool:
    return op.get_context().dialect.name == "postgresql"


def upgrade() -> None:
    if _postgresql():
        op.execute(f"ALTER TABLE page SET (toast_tuple_target = {TOAST_TUPLE_TARGET})")


def downgrade() -> None:
    if _postgresql():
        op.execute("ALTER TABLE page RESET (toast_tuple_target)")
