"""What ``fsck`` checks of the live-update model: handovers, sessions and preserved devices.

Every check reads only, and reports problems as text instead of raising, so
that one damaged row does not hide the others. Whatever restore, retrieve or
finish would refuse is reported here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from ..abi import catalogue
from ..db.models import Boot, Device, LuoSession
from ..db.models import Domain as DomainRow
from ..devices import parse_bdf
from ..errors import BadData, IommuptError
from .integrity import StoredEntry, handover_problems, read_entries, restore_marker_problems
from .iommu import descriptor_mismatches, validate_geometry
from .sessions import preserved_device_mismatches


@dataclass(frozen=True)
class BootRow:
    id: int
    number: int
    end_kind: str | None


def guarded(what: str, check: Callable[..., list[str]], *args: Any, **kwargs: Any) -> list[str]:
    """``check(*args, **kwargs)``'s problems; a check that cannot read past damaged data reports that instead."""
    try:
        return check(*args, **kwargs)
    except IommuptError as e:
        return [f"{what}: {e}"]


def liveupdate_problems(conn: Connection, machine_id: int) -> list[str]:
    rows = conn.execute(
        select(Boot.id, Boot.number, Boot.end_kind).where(Boot.machine_id == machine_id).order_by(Boot.number)
    ).all()
    boots = [BootRow(*r) for r in rows]
    problems: list[str] = []
    for i, boot in enumerate(boots):
        nxt = boots[i + 1] if i + 1 < len(boots) else None
        problems += guarded(f"handover of boot {boot.number}", _boot_handover, conn, machine_id, boot, nxt)
        problems += guarded(f"sessions of boot {boot.number}", _sessions, conn, boot, nxt)
    problems += guarded("devices", _devices, conn, machine_id, boots)
    return problems


def _boot_handover(conn: Connection, machine_id: int, boot: BootRow, nxt: BootRow | None) -> list[str]:
    sealed, is_last = boot.end_kind == "liveupdate", nxt is None
    problems = handover_problems(conn, machine_id, boot.id, sealed=sealed)
    # entries of the running boot, or of a sealed boot whose next boot runs now, are still acted on
    current = is_last or (sealed and nxt is not None and nxt.end_kind is None)
    entries = read_entries(conn, machine_id, boot.id)
    by_token = {e.token: e for e in entries}
    for e in entries:
        problems += guarded(e.where, _entry, conn, e, by_token, nxt, current=current, sealed=sealed)
    return problems


def _entry(
    conn: Connection,
    e: StoredEntry,
    by_token: dict[int, StoredEntry],
    nxt: BootRow | None,
    *,
    current: bool,
    sealed: bool,
) -> list[str]:
    problems = restore_marker_problems(conn, e, nxt.id if nxt else None) if sealed else []
    if e.deleted:
        return problems  # a DELETED slot: nothing reads it
    if e.kind in catalogue.KINDS:
        try:
            expected = catalogue.compatible_of(e.kind, e.abi_version)
        except BadData as err:
            return [*problems, f"{e.where}: {err.args[0]}"]
        if e.compatible != expected:
            return [*problems, f"{e.where}: a {e.kind} entry with compatible {e.compatible!r}"]
    if e.kind == "domain":
        desc = catalogue.parse_descriptor("domain", e.abi_version, e.descriptor, f"descriptor of {e.where}")
        validate_geometry(desc)
        if e.domain_id is None:
            return [*problems, f"{e.where} names no domain"]
        if current and e.restored_boot_id is None:
            problems += [f"{e.where}: {m}" for m in descriptor_mismatches(conn, e.machine_id, desc, e.domain_id)]
        return problems
    if e.kind != "device":
        return [*problems, f"{e.where}: kind {e.kind!r} is neither domain nor device"]
    dev = catalogue.parse_descriptor("device", e.abi_version, e.descriptor, f"descriptor of {e.where}")
    dom = by_token.get(dev.domain_token)
    if dom is None or dom.kind != "domain" or dom.session_id != e.session_id or e.session_id is None:
        return [*problems, f"{e.where}: its domain token {dev.domain_token:#x} names no domain entry of its session"]
    if current and e.restored_boot_id is None:
        mismatches = preserved_device_mismatches(conn, e.machine_id, e.device_id, dev, dom.domain_id)
        problems += [f"{e.where}: {m}" for m in mismatches]
    return problems


def _allowed_states(boot: BootRow, nxt: BootRow | None) -> tuple[str, ...]:
    """The states a session created in ``boot`` can be in, given how that boot and the next went."""
    if boot.end_kind is None:
        return ("open",)
    if nxt is None:
        return ("open",) if boot.end_kind == "cold" else ("sealed",)
    if boot.end_kind == "cold":
        return ("discarded",)
    if nxt.end_kind is None:
        return ("sealed", "retrieved", "finished")
    return ("finished", "discarded")


def _sessions(conn: Connection, boot: BootRow, nxt: BootRow | None) -> list[str]:
    s = LuoSession
    problems = []
    for sid, name, state, retrieved, finished_at_unset in conn.execute(
        select(s.id, s.name, s.state, s.retrieved_boot_id, s.finished_at.is_(None)).where(s.boot_id == boot.id)
    ):
        where = f"luo_session row {sid} ({name!r}, boot {boot.number})"
        allowed = _allowed_states(boot, nxt)
        if state not in allowed:
            problems.append(f"{where} is {state!r}; after that boot it can only be {' or '.join(allowed)}")
        if retrieved not in _retrieved_in(state, nxt):
            problems.append(f"{where} ({state}) names boot row {retrieved} as the boot that retrieved it")
        if finished_at_unset != (state != "finished"):
            problems.append(f"{where} ({state}) {'lacks' if finished_at_unset else 'has'} a finish time")
    return problems


def _retrieved_in(state: str, nxt: BootRow | None) -> tuple[int | None, ...]:
    """Which boot row may be recorded as having retrieved a session in ``state``: only the next boot."""
    if state in ("retrieved", "finished"):
        return (nxt.id,) if nxt else ()
    if state == "discarded":
        return (None, nxt.id) if nxt else (None,)
    return (None,)


def _devices(conn: Connection, machine_id: int, boots: list[BootRow]) -> list[str]:
    current = boots[-1] if boots and boots[-1].end_kind is None else None
    numbers = {b.id: b.number for b in boots}
    problems = []
    dids: dict[int, set[int]] = {}
    d, dom = Device, DomainRow
    rows = conn.execute(
        select(d.id, d.bdf, d.domain_id, d.did, d.boot_id, dom.state, dom.boot_id)
        .join(dom, dom.id == d.domain_id, isouter=True)
        .where(d.machine_id == machine_id)
    ).all()
    for dev_id, bdf, domain_id, did, boot_id, state, domain_boot in rows:
        where = f"device row {dev_id} ({bdf!r})"
        try:
            if parse_bdf(bdf) != bdf:
                problems.append(f"{where}: the PCI address is not in its canonical form")
        except IommuptError:
            problems.append(f"{where}: {bdf!r} is not a PCI address")
        if domain_id is None:
            if boot_id is not None:
                problems.append(f"{where} is detached but names boot row {boot_id} for its attachment")
            continue
        if did is not None:
            dids.setdefault(did, set()).add(domain_id)
        if state is None or state == "freed":
            problems.append(f"device {bdf} is attached to domain {domain_id}, which is freed or missing")
        elif boot_id not in numbers:
            problems.append(f"{where} is attached but names boot row {boot_id} for its attachment")
        elif current is not None and boot_id == current.id and domain_boot != current.id:
            problems.append(
                f"{where} was attached in this boot to domain {domain_id} of boot {numbers.get(domain_boot)}"
            )
        elif current is not None and boot_id != current.id and state != "preserved":
            problems.append(f"{where} still uses its preserved attachment but domain {domain_id} is {state}")
    for did, domains in sorted(dids.items()):
        if len(domains) > 1:
            problems.append(f"domain id {did} is used by {len(domains)} domains: {sorted(domains)}")
    return problems
