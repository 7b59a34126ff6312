"""allocator hint: machine.free_from, kept by the database when pages are freed

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 03:00:00.000000

Adds ``machine.free_from``: no pfn below it is free. The allocator searches
for free blocks from there instead of reading every allocated page number, so
a transaction's first allocation costs the same in a machine of any size. The
allocator raises it as it fills memory; a trigger lowers it whenever a page
row is deleted, by any statement (a free, a kexec dropping pages, a hand edit),
so it stays a true lower bound. A value that is wrong anyway (a hand edit) only
slows allocation down: the allocator rescans from the first pfn before it
reports memory exhausted.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SQLITE_TRIGGER = """
CREATE TRIGGER page_freed_lowers_free_from AFTER DELETE ON page
FOR EACH ROW WHEN OLD.pfn < (SELECT free_from FROM machine WHERE id = OLD.machine_id)
BEGIN
    UPDATE machine SET free_from = OLD.pfn WHERE id = OLD.machine_id;
END
"""

# one statement-level trigger: a bulk free of many pages updates each machine once
_PG_FUNCTION = """
CREATE FUNCTION page_freed_lowers_free_from() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE machine SET free_from = gone.lowest
    FROM (SELECT machine_id, min(pfn) AS lowest FROM freed_pages GROUP BY machine_id) AS gone
    WHERE machine.id = gone.machine_id AND machine.free_from > gone.lowest;
    RETURN NULL;
END
$$
"""
_PG_TRIGGER = """
CREATE TRIGGER page_freed_lowers_free_from AFTER DELETE ON page
REFERENCING OLD TABLE AS freed_pages FOR EACH STATEMENT
EXECUTE FUNCTION page_freed_lowers_free_from()
"""


def would_lose(conn: sa.Connection) -> list[str]:
    """Lossless: the hint is derived from the page rows."""
    return []


def upgrade() -> None:
    op.add_column("machine", sa.Column("free_from", sa.BigInteger(), server_default="0", nullable=False))
    if op.get_bind().dialect.name == "sqlite":
        op.execute(_SQLITE_TRIGGER)
    else:
        op.execute(_PG_FUNCTION)
        op.execute(_PG_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER page_freed_lowers_free_from")
    else:
        op.execute("DROP TRIGGER page_freed_lowers_free_from ON page")
        op.execute("DROP FUNCTION page_freed_lowers_free_from()")
    op.drop_column("machine", "free_from")
