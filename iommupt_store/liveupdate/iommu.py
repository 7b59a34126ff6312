"""The seed's iommupt callbacks: preserve, unpreserve and restore a domain.

preserve: collect every table reachable from the top (top included), preserve
them as one list, fill the descriptor (top_table_phys, top_level, vasz,
sign_extend) and store it in the handover under a token.
unpreserve: the exact inverse.
restore (next boot): validate the descriptor, allocate a fresh domain of the
same format, take the VA size from the descriptor, keep only SIGN_EXTEND, free
the fresh top, re-claim the preserved top and every lower table, and make the
domain immutable (it can only be freed).

Beyond the kernel: every descriptor is validated, every frame's bytes are
checked against the hash taken at preserve, the walk rejects cycles and
pointers to pages not preserved for this domain, and a failed restore is a
clean error that changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select, update

from .. import mappings
from ..crash import crashpoint
from ..db.models import Domain as DomainRow
from ..db.models import HandoverEntry
from ..descriptors import (
    DOMAIN_COMPATIBLE,
    DomainDescriptorV1,
    dump_descriptor,
    parse_device_descriptor,
    parse_domain_descriptor,
)
from ..domains import Domain, domain_alloc, get_domain
from ..errors import AlreadyExists, BadData, Busy, InvalidArgument, NotFound, NotPermitted
from ..formats import get_format
from ..formats.base import ITEMS_PER_TABLE, EntryType, Feature, item_lg2sz
from ..machine import Transaction
from ..memory import PAGE_SHIFT
from . import kho

MAX_TOKEN = (1 << 64) - 1


def owner_tag(domain_id: int) -> str:
    """The ``preserved_by`` of a domain's frames."""
    return f"iommupt:domain/{domain_id}"


@dataclass(frozen=True)
class IncomingEntry:
    id: int
    token: int
    compatible: str
    descriptor: Any
    domain_id: int | None
    restored_boot_id: int | None
    restored_domain_id: int | None
    session_id: int | None
    kind: str


def preservation_problems(tx: Transaction, domain_id: int, reachable: set[int], boot_id: int) -> list[str]:
    """How a preserved domain's frames differ from what was preserved for it in ``boot_id``:
    the reachable tables must be exactly the preserved frames, with the bytes they had."""
    preserved = kho.preserved_by(tx, owner_tag(domain_id), boot_id)
    problems = []
    extra, missing = sorted(reachable - set(preserved)), sorted(set(preserved) - reachable)
    if extra or missing:
        problems.append(
            f"domain {domain_id} reaches {len(extra)} unpreserved frame(s) {[hex(p) for p in extra[:4]]} "
            f"and {len(missing)} preserved frame(s) are unreachable {[hex(p) for p in missing[:4]]}"
        )
    tx.memory.load(preserved)
    for pfn, rec in preserved.items():
        if tx.memory.is_allocated(pfn) and kho.content_hash(tx.memory.view(pfn)) != rec.content_hash:
            problems.append(f"frame {pfn:#x} of domain {domain_id} changed after preserve")
    return problems


# -- preserve / unpreserve (boot N) --------------------------------------------------------
def preserve_domain(tx: Transaction, domain_id: int, token: int) -> DomainDescriptorV1:
    """Preserve the domain's tables and hand its descriptor over under ``token``."""
    if not 0 <= token <= MAX_TOKEN:
        raise InvalidArgument(f"token {token} is not a u64")
    dom = get_domain(tx, domain_id)
    _require_own_boot(tx, dom, "preserve")
    if dom.state == "preserved":
        raise AlreadyExists(f"domain {domain_id} is already preserved")
    if dom.state == "restored":
        raise NotPermitted(f"domain {domain_id} was restored after a live update and cannot be preserved again")
    if dom.state != "live":
        raise NotFound(f"domain {domain_id} has been freed")
    dup = tx.conn.execute(
        select(HandoverEntry.domain_id).where(HandoverEntry.boot_id == tx.machine.boot_id, HandoverEntry.token == token)
    ).first()
    if dup is not None:
        raise AlreadyExists(f"token {token:#x} is already used in this boot's handover (domain {dup[0]})")
    pt = dom.pt
    tables = pt.collect_tables()
    kho.preserve_pages(tx, [(phys >> PAGE_SHIFT, 0) for phys in tables], owner_tag(domain_id), domain_id=domain_id)
    crashpoint("preserve")
    desc = DomainDescriptorV1(
        format=dom.format,  # type: ignore[arg-type]
        top_table_phys=pt.top_phys,
        top_level=pt.top_level,
        # the width the current top decodes: for a dynamic top the grown width, not the capability
        vasz=pt.range_vasz(),
        sign_extend=pt.sign_extend,
    )
    tx.conn.execute(
        insert(HandoverEntry).values(
            machine_id=tx.machine.id,
            boot_id=tx.machine.boot_id,
            token=token,
            compatible=DOMAIN_COMPATIBLE,
            descriptor=dump_descriptor(desc),
            domain_id=domain_id,
        )
    )
    dom.set_state("preserved")
    return desc


def unpreserve_domain(tx: Transaction, token: int) -> int:
    """Undo ``preserve_domain`` for the entry with ``token``; returns the domain id."""
    row = tx.conn.execute(
        select(HandoverEntry.id, HandoverEntry.domain_id).where(
            HandoverEntry.boot_id == tx.machine.boot_id, HandoverEntry.token == token
        )
    ).first()
    if row is None or row.domain_id is None:
        raise NotFound(f"no domain is preserved under token {token:#x} in this boot")
    users = tx.conn.execute(
        select(HandoverEntry.descriptor).where(
            HandoverEntry.boot_id == tx.machine.boot_id, HandoverEntry.kind == "device"
        )
    ).scalars()
    if any(parse_device_descriptor(d).domain_token == token for d in users):
        raise Busy(f"a preserved device uses the domain under token {token:#x}: close its session instead")
    dom = get_domain(tx, row.domain_id)
    tables = dom.pt.collect_tables()
    kho.unpreserve_pages(tx, [(phys >> PAGE_SHIFT, 0) for phys in tables], owner_tag(dom.id))
    crashpoint("unpreserve")
    tx.conn.execute(delete(HandoverEntry).where(HandoverEntry.id == row.id))
    dom.set_state("live")
    return dom.id


def _require_own_boot(tx: Transaction, dom: Domain, op: str) -> None:
    if dom.boot_id != tx.machine.boot_id:
        raise NotPermitted(f"domain {dom.id} belongs to an earlier boot: {op} refused (restore it first)")


# -- restore (boot N+1) ----------------------------------------------------------------------
def incoming_entries(tx: Transaction) -> list[IncomingEntry]:
    """The handover of the previous boot (empty if it did not end with a live update)."""
    try:
        prev = kho.incoming_boot_id(tx)
    except NotFound:
        return []
    h = HandoverEntry
    rows = tx.conn.execute(
        select(
            h.id,
            h.token,
            h.compatible,
            h.descriptor,
            h.domain_id,
            h.restored_boot_id,
            h.restored_domain_id,
            h.session_id,
            h.kind,
        )
        .where(h.machine_id == tx.machine.id, h.boot_id == prev)
        .order_by(h.token)
    )
    return [IncomingEntry(*r) for r in rows]


def _find_incoming(tx: Transaction, token: int) -> IncomingEntry:
    prev = kho.incoming_boot_id(tx)  # explains a cold reboot or a first boot
    for entry in incoming_entries(tx):
        if entry.token == token:
            return entry
    older = tx.conn.execute(
        select(HandoverEntry.boot_id).where(
            HandoverEntry.machine_id == tx.machine.id, HandoverEntry.token == token, HandoverEntry.boot_id != prev
        )
    ).first()
    if older is not None:
        raise NotFound(
            f"token {token:#x} was handed over by an older boot, not the previous one: it can no longer be restored"
        )
    raise NotFound(f"the previous boot handed nothing over under token {token:#x}")


def _validate_geometry(desc: DomainDescriptorV1) -> None:
    fmt = get_format(desc.format)
    if desc.top_level > fmt.max_top_level:
        raise BadData(f"descriptor top_level {desc.top_level} exceeds {fmt.name}'s maximum {fmt.max_top_level}")
    lo, hi = item_lg2sz(desc.top_level), item_lg2sz(desc.top_level) + 9
    if not lo < desc.vasz <= min(hi, fmt.max_va_lg2):
        raise BadData(
            f"descriptor vasz {desc.vasz} does not fit a level-{desc.top_level} {fmt.name} top "
            f"(must be {lo + 1}..{min(hi, fmt.max_va_lg2)})"
        )
    if desc.sign_extend and Feature.SIGN_EXTEND not in fmt.supported:
        raise BadData(f"descriptor sets sign_extend but {fmt.name} has no sign extension")
    if desc.flags & 1:
        raise BadData("descriptor is flagged DELETED")


def _walk_preserved(
    tx: Transaction, desc: DomainDescriptorV1, preserved: dict[int, kho.PreservedPage], old_domain: int
) -> list[tuple[int, int]]:
    """The preserved tables reachable from the descriptor's top, pre-order, as (pfn, level).

    Every table must be a page preserved for this domain, reached once.
    """
    fmt = get_format(desc.format)
    features = frozenset({Feature.SIGN_EXTEND}) if desc.sign_extend else frozenset()
    mem = tx.memory
    out: list[tuple[int, int]] = []
    seen: set[int] = set()

    def visit(pfn: int, level: int, n: int, via: str) -> None:
        if pfn not in preserved:
            raise BadData(f"{via} points to pfn {pfn:#x}, which was not preserved for domain {old_domain}")
        if pfn in seen:
            raise BadData(f"{via} points to pfn {pfn:#x} a second time (cycle or shared table)")
        meta = mem.meta(pfn)
        if meta.get("domain_id") != old_domain or meta.get("level") != level:
            raise BadData(f"{via} points to pfn {pfn:#x}, which is not a level-{level} table of domain {old_domain}")
        seen.add(pfn)
        out.append((pfn, level))
        if level == 0:
            return
        for i, raw in enumerate(mem.words(pfn)[:n]):
            if raw:
                d = fmt.decode(raw, level, features)
                if d.type is EntryType.TABLE:
                    visit(d.addr >> PAGE_SHIFT, level - 1, ITEMS_PER_TABLE, f"entry {i} of table {pfn:#x}")

    top_pfn = desc.top_table_phys >> PAGE_SHIFT
    mem.load([top_pfn, *preserved])
    if not mem.is_allocated(top_pfn):
        raise BadData(f"descriptor top_table_phys {desc.top_table_phys:#x} is not a page of this machine")
    visit(top_pfn, desc.top_level, 1 << (desc.vasz - item_lg2sz(desc.top_level)), "descriptor top_table_phys")
    return out


def _check_against_old_domain(tx: Transaction, desc: DomainDescriptorV1, domain_id: int, token: int) -> None:
    """The descriptor must describe the domain whose frames it hands over: same format, same sign extension
    (either one changed makes the same frames translate other IOVAs, or decode as another format)."""
    row = tx.conn.execute(
        select(DomainRow.format, DomainRow.features).where(
            DomainRow.id == domain_id, DomainRow.machine_id == tx.machine.id
        )
    ).first()
    if row is None:
        raise BadData(f"handover entry {token:#x} names domain {domain_id}, which does not exist")
    if desc.format != row.format:
        raise BadData(
            f"descriptor of token {token:#x} says format {desc.format}, but domain {domain_id} is {row.format}"
        )
    fmt = get_format(row.format)
    try:
        old_se = fmt.effective(Feature.SIGN_EXTEND, frozenset(Feature(f) for f in row.features))
    except ValueError as e:
        raise BadData(f"domain {domain_id}: {e}") from e
    if desc.sign_extend != old_se:
        raise BadData(
            f"descriptor of token {token:#x} has sign_extend={desc.sign_extend}, but domain {domain_id} "
            f"{'is' if old_se else 'is not'} sign-extended"
        )


def restore_domain(tx: Transaction, token: int) -> Domain:
    """Restore the domain the previous boot preserved under ``token``: all or nothing."""
    from .sessions import reattach_devices, require_retrieved

    entry = _find_incoming(tx, token)
    if entry.kind != "domain":
        raise InvalidArgument(f"token {token:#x} names a preserved {entry.kind}, not a domain")
    if entry.session_id is not None:
        require_retrieved(tx, entry.session_id)
    if entry.restored_boot_id is not None:
        raise AlreadyExists(f"token {token:#x} has already been restored (as domain {entry.restored_domain_id})")
    if entry.compatible != DOMAIN_COMPATIBLE:
        raise BadData(f"handover entry {token:#x} has compatible {entry.compatible!r}: no handler for it")
    desc = parse_domain_descriptor(entry.descriptor, f"descriptor of token {token:#x}")
    _validate_geometry(desc)
    if entry.domain_id is None:
        raise BadData(f"handover entry {token:#x} names no domain")
    _check_against_old_domain(tx, desc, entry.domain_id, token)
    preserved = kho.preserved_by(tx, owner_tag(entry.domain_id), kho.incoming_boot_id(tx))
    frames = _walk_preserved(tx, desc, preserved, entry.domain_id)
    unreached = sorted(set(preserved) - {pfn for pfn, _ in frames})
    if unreached:
        # the descriptor decodes less than was handed over (e.g. a narrowed vasz): restoring it would
        # change translations and leave preserved tables behind
        raise BadData(
            f"descriptor of token {token:#x} does not reach {len(unreached)} frame(s) preserved for domain "
            f"{entry.domain_id}: {[hex(p) for p in unreached[:4]]}"
        )

    # A fresh domain of the same format, whose own top is freed in favour of the preserved one.
    dom = domain_alloc(tx, desc.format)
    pt = dom.pt
    pt.frames.free_tables([pt.top_phys])
    kho.restore_pages(tx, [(pfn, 0) for pfn, _ in frames], owner_tag(entry.domain_id))
    for pfn, level in frames:
        # the frames change hands; the old kernel's per-frame state (incoherent) is stale
        tx.memory.set_meta(pfn, domain_id=dom.id, level=level, incoherent=False)
    crashpoint("restore")
    pt.max_vasz_lg2 = desc.vasz
    pt.features = frozenset({Feature.SIGN_EXTEND}) if desc.sign_extend else frozenset()
    pt.top_phys, pt.top_level = desc.top_table_phys, desc.top_level
    dom.set_state("restored")
    tx.conn.execute(update(DomainRow).where(DomainRow.id == entry.domain_id).values(state="freed", top_phys=None))
    mappings.move_domain(tx, entry.domain_id, dom.id)
    old = tx.cache.get("domains", {}).pop(entry.domain_id, None)
    if old is not None:
        old._dirty = False
    tx.conn.execute(
        update(HandoverEntry)
        .where(HandoverEntry.id == entry.id)
        .values(restored_boot_id=tx.machine.boot_id, restored_domain_id=dom.id)
    )
    if entry.session_id is not None:
        reattach_devices(tx, entry.session_id, token, dom.id)
    return dom
