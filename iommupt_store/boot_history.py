"""Whether a machine's boot rows tell a possible history.

Boots are numbered 1..N with no gap or repeat; only the last may be running;
every earlier one ended, cold or with a live update, and has both an end time
and an end kind; a live update sealed its handover (a seal digest) and a
cold end or a running boot has none. A new boot frees what the previous one did
not preserve, so a machine whose history was edited is refused before that.
"""

from __future__ import annotations

from sqlalchemy import Connection, Integer, String, select, type_coerce

from .db.models import Boot
from .errors import BadData

END_KINDS = ("cold", "liveupdate")


def boot_history_problems(conn: Connection, machine_id: int) -> list[str]:
    """Every way the machine's boot rows break the rules above, naming the rows."""
    b = Boot
    rows = conn.execute(
        # raw columns only (no timestamp parsing): the history must be judged even when a value is malformed
        select(
            b.id,
            type_coerce(b.number, Integer()),
            type_coerce(b.end_kind, String()),
            b.ended_at.is_(None),
            b.handover_digest.is_(None),
        )
        .where(b.machine_id == machine_id)
        .order_by(b.id)
    ).all()
    problems: list[str] = []
    numbered: list[tuple[int, int, str | None]] = []
    for boot_id, number, end_kind, running_time, unsealed in rows:
        name = f"boot row {boot_id} (number {number!r})"
        if not isinstance(number, int) or isinstance(number, bool):
            problems.append(f"{name}: the number is not an integer")
            continue
        numbered.append((number, boot_id, end_kind))
        if end_kind is not None and end_kind not in END_KINDS:
            problems.append(f"{name}: end kind {end_kind!r} is not one of {', '.join(END_KINDS)}")
        if (end_kind is None) != running_time:
            problems.append(f"{name}: end time and end kind disagree (one is set, the other is not)")
        if end_kind == "liveupdate" and unsealed:
            problems.append(f"{name}: ended with a live update but its handover carries no seal digest")
        if end_kind != "liveupdate" and not unsealed:
            problems.append(f"{name}: carries a handover seal but did not end with a live update")
    numbered.sort()
    numbers = [n for n, _, _ in numbered]
    if numbers != list(range(1, len(numbers) + 1)):
        problems.append(f"boot numbers are {_shown(numbers)}, not 1..{len(numbers)} (rows {_ids(numbered)})")
    running = [(n, i) for n, i, kind in numbered if kind is None]
    if len(running) > 1:
        problems.append(f"{len(running)} boots are running: {', '.join(f'number {n} (row {i})' for n, i in running)}")
    if running and numbered and running[-1][0] != numbered[-1][0]:
        n, i = running[0]
        problems.append(f"boot row {i} (number {n}) is running but is not the last boot (number {numbered[-1][0]})")
    return problems


def check_boot_history(conn: Connection, machine_id: int, machine_name: str) -> None:
    """Refuse (bad data) a machine whose boot history is not possible."""
    problems = boot_history_problems(conn, machine_id)
    if problems:
        raise BadData(f"machine {machine_name!r} has an impossible boot history: {'; '.join(problems)}")


def _shown(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:12])) + (", ..." if len(numbers) > 12 else "")


def _ids(numbered: list[tuple[int, int, str | None]]) -> str:
    return ", ".join(str(i) for _, i, _ in numbered[:12]) + (", ..." if len(numbered) > 12 else "")
