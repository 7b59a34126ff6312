"""Proving a handover unchanged: record digests when it is written and sealed, check them when it is read.

Writers (preserve, device preserve) store an entry's digests with the entry;
the seal stores the boot's seal digest. Restore, session retrieve and finish,
and ``fsck`` recompute them from the rows and refuse (bad data) when anything
differs. See ``digests.py`` for what each digest covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table, select, update

from ..abi.catalogue import FLAG_DELETED
from ..abi.records import KhoRootRecord, records_json
from ..db.models import Boot, HandoverEntry, LuoSession, Preservation
from ..db.models import Domain as DomainRow
from ..errors import BadData
from .digests import entry_digest, frames_digest, owner_tag, seal_digest


@dataclass(frozen=True)
class StoredEntry:
    """A handover entry as stored, with what the next boot did with it."""

    id: int
    machine_id: int
    boot_id: int
    token: int
    kind: str
    compatible: str
    descriptor: Any
    domain_id: int | None
    device_id: int | None
    session_id: int | None
    digest: str
    frames_digest: str
    restored_boot_id: int | None
    restored_domain_id: int | None
    abi_version: int = 1
    flags: int = 0

    @property
    def deleted(self) -> bool:
        return bool(self.flags & FLAG_DELETED)

    @property
    def where(self) -> str:
        return f"handover entry {self.token:#x} (handover_entry row {self.id})"


# Core columns (``__table__.c``) in the statements every seal and restore runs: without the ORM layer each
# compiles (once per engine, i.e. once per process) in about half the time
_BOOT: Table = Boot.__table__  # type: ignore[assignment]
_H, _P, _B = HandoverEntry.__table__.c, Preservation.__table__.c, _BOOT.c
_ENTRY_COLUMNS = [_H[name] for name in StoredEntry.__dataclass_fields__]
#: SQL: the entry's slot is live (a DELETED slot stays, so its token is never reused, but nothing reads it)
LIVE = HandoverEntry.flags.bitwise_and(FLAG_DELETED) == 0


def read_entries(conn: Connection, machine_id: int, boot_id: int) -> list[StoredEntry]:
    """Every handover entry ``boot_id`` wrote, in token order."""
    h = _H
    rows = conn.execute(select(*_ENTRY_COLUMNS).where(h.machine_id == machine_id, h.boot_id == boot_id)).all()
    return sorted((StoredEntry(*r) for r in rows), key=lambda e: e.token)


def frames_by_owner(conn: Connection, machine_id: int, boot_id: int) -> dict[str, list[tuple[int, int, str]]]:
    """(pfn, order, content hash) of the boot's preservation records, by who preserved them."""
    p = _P
    out: dict[str, list[tuple[int, int, str]]] = {}
    for pfn, order, who, h in conn.execute(
        select(p.pfn, p.page_order, p.preserved_by, p.content_hash).where(
            p.machine_id == machine_id, p.boot_id == boot_id
        )
    ).all():  # fetchall: much cheaper per row than iterating the cursor
        out.setdefault(who, []).append((pfn, order, h))
    return out


def _boot_number(conn: Connection, boot_id: int) -> int:
    number = conn.execute(select(_B.number).where(_B.id == boot_id)).scalar()
    if number is None:
        raise BadData(f"boot row {boot_id} does not exist")
    return int(number)


def _session_names(conn: Connection, boot_id: int) -> dict[int, str]:
    s = LuoSession.__table__.c
    rows = conn.execute(select(s.id, s.name).where(s.boot_id == boot_id)).all()
    return {i: n for i, n in rows}


def compute_digests(
    conn: Connection,
    *,
    machine_id: int,
    boot_id: int,
    token: int,
    kind: str,
    compatible: str,
    descriptor: Any,
    domain_id: int | None = None,
    device_id: int | None = None,
    session_id: int | None = None,
    frames: dict[str, list[tuple[int, int, str]]] | None = None,
    abi_version: int = 1,
    flags: int = 0,
) -> dict[str, str]:
    """``digest`` and ``frames_digest`` of an entry with these fields, from the rows as stored now
    (a DELETED slot owns no frames: its domain may be preserved again under another token)."""
    if frames is None:
        frames = frames_by_owner(conn, machine_id, boot_id)
    owns_frames = kind == "domain" and not flags & FLAG_DELETED
    own = frames.get(owner_tag(domain_id), []) if owns_frames and domain_id is not None else []
    session_name = _session_names(conn, boot_id).get(session_id) if session_id is not None else None
    return {
        "digest": entry_digest(
            machine_id=machine_id,
            boot_id=boot_id,
            boot_number=_boot_number(conn, boot_id),
            token=token,
            kind=kind,
            compatible=compatible,
            descriptor=descriptor,
            domain_id=domain_id,
            device_id=device_id,
            session_id=session_id,
            session_name=session_name,
            abi_version=abi_version,
            flags=flags,
        ),
        "frames_digest": frames_digest(own),
    }


def _recompute(conn: Connection, e: StoredEntry, frames: dict[str, list[tuple[int, int, str]]]) -> dict[str, str]:
    return compute_digests(
        conn,
        machine_id=e.machine_id,
        boot_id=e.boot_id,
        token=e.token,
        kind=e.kind,
        compatible=e.compatible,
        descriptor=e.descriptor,
        domain_id=e.domain_id,
        device_id=e.device_id,
        session_id=e.session_id,
        frames=frames,
        abi_version=e.abi_version,
        flags=e.flags,
    )


def _seal(
    conn: Connection,
    boot_id: int,
    entries: list[StoredEntry],
    frames: dict[str, list[tuple[int, int, str]]],
    records: Any,
) -> str:
    return seal_digest(
        boot_id=boot_id,
        boot_number=_boot_number(conn, boot_id),
        entries=[(e.token, e.digest, e.frames_digest) for e in entries],
        sessions=list(_session_names(conn, boot_id).items()),
        preservations=[(pfn, order, who, h) for who, own in frames.items() for pfn, order, h in own],
        profile=_boot_profile(conn, boot_id),
        records=records,
    )


def _boot_profile(conn: Connection, boot_id: int) -> str:
    return str(conn.execute(select(_B.kernel_profile).where(_B.id == boot_id)).scalar())


def handover_problems(
    conn: Connection,
    machine_id: int,
    boot_id: int,
    *,
    sealed: bool,
    entries: list[StoredEntry] | None = None,
    frames: dict[str, list[tuple[int, int, str]]] | None = None,
) -> list[str]:
    """How the handover ``boot_id`` wrote differs from what was recorded (with its seal, when ``sealed``).

    ``entries`` and ``frames``: what ``read_entries`` and ``frames_by_owner`` give, when the caller has read them."""
    entries = read_entries(conn, machine_id, boot_id) if entries is None else entries
    frames = frames_by_owner(conn, machine_id, boot_id) if frames is None else frames
    number = _boot_number(conn, boot_id)
    names = _session_names(conn, boot_id)
    problems = []
    for e in entries:
        if e.session_id is not None and e.session_id not in names:
            problems.append(f"{e.where} of boot {number} names session row {e.session_id}, not one of boot {number}")
        now = _recompute(conn, e, frames)
        if now["digest"] != e.digest:
            problems.append(
                f"{e.where} of boot {number} differs from what was recorded when it was written "
                "(its token, kind, compatible, descriptor, version, flags, domain, device or session was edited)"
            )
        if now["frames_digest"] != e.frames_digest:
            problems.append(
                f"{e.where} of boot {number}: the frames preserved for it differ from those recorded at preserve "
                "(a preservation row's pfn, order, content hash, preserved_by or boot was edited)"
            )
    if sealed:
        stored = conn.execute(select(Boot.handover_digest).where(Boot.id == boot_id)).scalar()
        if stored is None:
            problems.append(f"boot {number} ended with a live update but its handover carries no seal digest")
        elif _seal(conn, boot_id, entries, frames, records_json(conn, boot_id)) != stored:
            problems.append(
                f"the handover of boot {number} differs from what its seal recorded "
                "(an entry, session, preservation record, the kernel profile, kexec metadata or another KHO/LUO "
                "record was added, removed or edited)"
            )
    return problems


def verify_handover(conn: Connection, machine_id: int, boot_id: int, *, sealed: bool = True) -> None:
    """Refuse (bad data) a handover that differs from what was recorded; the first problems are named."""
    problems = handover_problems(conn, machine_id, boot_id, sealed=sealed)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s): run 'iommupt-store fsck')" if len(problems) > 1 else ""
        raise BadData(f"{problems[0]}{more}")


def seal_handover(
    conn: Connection,
    boot_id: int,
    entries: list[StoredEntry],
    frames: dict[str, list[tuple[int, int, str]]],
    records: KhoRootRecord | None,
) -> None:
    """Record the seal digest over the boot's whole handover (at the seal, before the boot ends): its
    ``entries`` and ``frames`` as read in the sealing transaction, and the ``records`` it just wrote."""
    digest = _seal(conn, boot_id, entries, frames, records_json(conn, boot_id, written=records))
    conn.execute(update(_BOOT).where(_B.id == boot_id).values(handover_digest=digest))


def restore_marker_problems(conn: Connection, e: StoredEntry, current_boot_id: int | None = None) -> list[str]:
    """Whether an entry's restored markers agree with its frames' and with the domain it was restored as.

    Restore marks the entry and every frame it re-claims in the same boot, the one right after the
    entry's; an entry restored as a domain names a domain of that boot. ``current_boot_id``, when
    the entry's boot is the previous one, is that next boot.
    """
    p = Preservation
    problems = []
    frames: set[int | None] = set()
    if e.kind == "domain" and e.domain_id is not None:
        frames = set(
            conn.execute(
                select(p.restored_boot_id).where(
                    p.machine_id == e.machine_id, p.boot_id == e.boot_id, p.preserved_by == owner_tag(e.domain_id)
                )
            ).scalars()
        )
    nxt = current_boot_id if current_boot_id is not None else _next_boot_id(conn, e.machine_id, e.boot_id)
    if e.restored_boot_id is None:
        if e.restored_domain_id is not None:
            problems.append(f"{e.where} is not marked restored but names restored domain {e.restored_domain_id}")
        if frames - {None}:
            problems.append(f"{e.where} is not marked restored but frames preserved for it are")
        return problems
    if e.restored_boot_id != nxt:
        problems.append(f"{e.where} is marked restored in boot row {e.restored_boot_id}, not in the boot after its own")
    if e.kind == "device":
        if e.restored_domain_id is not None:
            problems.append(f"{e.where} is a device entry but names restored domain {e.restored_domain_id}")
        return problems
    if frames != {e.restored_boot_id}:
        problems.append(f"{e.where} is marked restored but not every frame preserved for it is, in that boot")
    if e.restored_domain_id is None:
        problems.append(f"{e.where} is marked restored but names no restored domain")
        return problems
    dom = conn.execute(
        select(DomainRow.boot_id, DomainRow.state).where(
            DomainRow.id == e.restored_domain_id, DomainRow.machine_id == e.machine_id
        )
    ).first()
    if dom is None or dom.boot_id != e.restored_boot_id or dom.state not in ("restored", "freed"):
        problems.append(
            f"{e.where} names restored domain {e.restored_domain_id}, which is not a restored domain of the boot "
            "that restored it"
        )
    return problems


def _next_boot_id(conn: Connection, machine_id: int, boot_id: int) -> int | None:
    number = _boot_number(conn, boot_id)
    return conn.execute(select(Boot.id).where(Boot.machine_id == machine_id, Boot.number == number + 1)).scalar()
