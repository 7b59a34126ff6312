"""The store's status: its SQL and how the rows become the report, without importing SQLAlchemy.

One set of statements and one assembly serve both readers: ``Store.status()``
runs the statements through SQLAlchemy with the checked column types
(``store.py``), and the ``status`` command on a local SQLite file runs the same
text through the standard library's ``sqlite3``, read-only (``status_fast.py``),
because importing SQLAlchemy alone costs more than the whole command may.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..units import PAGE_SIZE

#: runs one of the statements below with its parameters and returns its rows
Run = Callable[[str, dict[str, Any]], Sequence[Sequence[Any]]]

#: the schema revision (Alembic's version table)
REVISION = "SELECT version_num FROM alembic_version"
MACHINES = "SELECT id, name, mem_bytes, page_size FROM machine ORDER BY name"
USAGE = "SELECT coalesce(sum(length(contents)), 0) FROM page WHERE machine_id = :machine_id"
BOOTS = (
    "SELECT number, started_at, ended_at, end_kind, kernel_profile, handover_discarded "
    "FROM boot WHERE machine_id = :machine_id ORDER BY number"
)

#: the stored columns each statement returns, as "table.column" and their kind (``db/types.py``):
#: int, u64, text or timestamp. A reader checks every value against its kind.
COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    MACHINES: (
        ("machine.id", "int"),
        ("machine.name", "text"),
        ("machine.mem_bytes", "u64"),
        ("machine.page_size", "int"),
    ),
    BOOTS: (
        ("boot.number", "int"),
        ("boot.started_at", "timestamp"),
        ("boot.ended_at", "timestamp"),
        ("boot.end_kind", "text"),
        ("boot.kernel_profile", "text"),
        ("boot.handover_discarded", "text"),
    ),
}


def read_status(run: Run, url: str, revision: str) -> dict[str, Any]:
    """Every machine with its memory use and boots: the fields of ``reports.StoreStatus``, as plain data."""
    machines = []
    for machine_id, name, mem_bytes, page_size in run(MACHINES, {}):
        used = run(USAGE, {"machine_id": machine_id})[0][0]
        boots = [
            {
                "number": number,
                "started_at": started_at,
                "ended_at": ended_at,
                "end_kind": end_kind,
                "kernel_profile": kernel_profile,
                "handover_discarded": handover_discarded,
            }
            for number, started_at, ended_at, end_kind, kernel_profile, handover_discarded in run(
                BOOTS, {"machine_id": machine_id}
            )
        ]
        machines.append(
            {
                "name": name,
                "mem_bytes": mem_bytes,
                "page_size": page_size,
                "pages_allocated": used // PAGE_SIZE,
                "bytes_allocated": used,
                "boots": boots,
            }
        )
    return {"url": url, "revision": revision, "machines": machines}
