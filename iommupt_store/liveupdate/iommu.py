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

from typing import Any

from sqlalchemy import Connection, Table, delete, insert, select, update

from .. import mappings
from ..abi import catalogue
from ..abi.catalogue import FLAG_DELETED, DomainDescriptorV1, DomainDescriptorV2, dump_descriptor
from ..abi.profiles import read_path
from ..crash import crashpoint
from ..db.models import Domain as DomainRow
from ..db.models import HandoverEntry
from ..db.rows import reads_stored_rows
from ..domains import Domain, domain_alloc, get_domain, stored_geometry
from ..errors import AlreadyExists, BadData, Busy, InvalidArgument, IommuptError, NotFound, NotPermitted
from ..formats import get_format
from ..formats.base import ITEMS_PER_TABLE, EntryType, Feature, item_lg2sz
from ..machine import Transaction, atomic
from ..memory import PAGE_SHIFT, PAGE_SIZE
from . import kho
from .digests import frames_digest, owner_tag
from .integrity import LIVE, StoredEntry, compute_digests, read_entries, restore_marker_problems, verify_handover

MAX_TOKEN = (1 << 64) - 1
_ENTRIES: Table = HandoverEntry.__table__  # type: ignore[assignment]


#: an entry of the previous boot's handover, as ``incoming_entries`` lists it
IncomingEntry = StoredEntry


def preservation_problems(
    tx: Transaction,
    domain_id: int,
    reachable: set[int],
    boot_id: int,
    kept: dict[str, list[tuple[int, int, str]]] | None = None,
) -> list[str]:
    """How a preserved domain's frames differ from what was preserved for it in ``boot_id``:
    the reachable tables must be exactly the preserved frames, with the bytes they had.

    ``kept``: the boot's preservation records by owner (``frames_by_owner``), when the caller has read them."""
    if kept is None:
        preserved = {pfn: r.content_hash for pfn, r in kho.preserved_by(tx, owner_tag(domain_id), boot_id).items()}
    else:
        preserved = {pfn: h for pfn, _, h in kept.get(owner_tag(domain_id), [])}
    problems = []
    extra, missing = sorted(reachable - set(preserved)), sorted(set(preserved) - reachable)
    if extra or missing:
        problems.append(
            f"domain {domain_id} reaches {len(extra)} unpreserved frame(s) {[hex(p) for p in extra[:4]]} "
            f"and {len(missing)} preserved frame(s) are unreachable {[hex(p) for p in missing[:4]]}"
        )
    mem = tx.memory
    for batch in mem.batches(sorted(preserved)):
        for pfn in batch:
            if mem.is_allocated(pfn) and kho.content_hash(mem.view(pfn)) != preserved[pfn]:
                problems.append(f"frame {pfn:#x} of domain {domain_id} changed after preserve")
    return problems


# -- preserve / unpreserve (boot N) --------------------------------------------------------
@atomic
@reads_stored_rows
def preserve_domain(tx: Transaction, domain_id: int, token: int, *, session_id: int | None = None) -> Any:
    """Preserve the domain's tables and hand its descriptor over under ``token`` (in a session, if given)."""
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
    h = _ENTRIES.c  # Core columns: compiled without the ORM layer (see integrity.py)
    dup = tx.conn.execute(
        select(h.kind, h.domain_id, h.flags).where(h.boot_id == tx.machine.boot_id, h.token == token)
    ).first()
    if dup is not None:
        if dup.flags & FLAG_DELETED:
            raise AlreadyExists(f"token {token:#x} names a DELETED slot of this boot's handover: it is never reused")
        holder = f"domain {dup.domain_id}" if dup.domain_id is not None else f"a {dup.kind}"
        raise AlreadyExists(f"token {token:#x} is already used in this boot's handover (by {holder})")
    pt = dom.pt
    tables = pt.collect_tables()
    # the domain's records as written: the descriptor's frames digest and the entry's digests cover them
    own = kho.preserve_pages(
        tx, [(phys >> PAGE_SHIFT, 0) for phys in tables], owner_tag(domain_id), domain_id=domain_id
    )
    crashpoint("preserve")
    version = tx.machine.profile.writes
    desc = _domain_descriptor(
        version,
        format=dom.format,
        top_table_phys=pt.top_phys,
        top_level=pt.top_level,
        # the width the current top decodes: for a dynamic top the grown width, not the capability
        vasz=pt.range_vasz(),
        sign_extend=pt.sign_extend,
        oasz_lg2=pt.max_oasz_lg2,
        features=sorted(f.value for f in pt.features),
        frames_digest=frames_digest(own),
    )
    fields: dict[str, Any] = {
        "machine_id": tx.machine.id,
        "boot_id": tx.machine.boot_id,
        "token": token,
        "kind": "domain",
        "compatible": catalogue.compatible_of("domain", version),
        "descriptor": dump_descriptor(desc),
        "domain_id": domain_id,
        "session_id": session_id,
        "abi_version": version,
    }
    digests = compute_digests(tx.conn, **fields, frames={owner_tag(domain_id): own})
    tx.conn.execute(insert(_ENTRIES).values(**fields, **digests))
    dom.set_state("preserved")
    return desc


def _domain_descriptor(version: int, **fields: Any) -> Any:
    """The descriptor of catalogue ``version`` for a domain: version 1 and 2 are built, a user's
    version is converted from version 2 through its registered converters."""
    v1_fields = {k: fields[k] for k in ("format", "top_table_phys", "top_level", "vasz", "sign_extend")}
    if version == 1:
        return DomainDescriptorV1(**v1_fields)
    return catalogue.written_as("domain", version, DomainDescriptorV2(**fields))


@atomic
@reads_stored_rows
def unpreserve_domain(tx: Transaction, token: int) -> int:
    """Undo ``preserve_domain`` for the entry with ``token``; returns the domain id.

    A version-1 entry (series v3) is removed; a later version's slot stays, flagged DELETED, and its
    token is never reused in this boot (the newest series)."""
    row = tx.conn.execute(
        select(HandoverEntry.id, HandoverEntry.domain_id).where(
            HandoverEntry.boot_id == tx.machine.boot_id, HandoverEntry.token == token, LIVE
        )
    ).first()
    if row is None or row.domain_id is None:
        raise NotFound(f"no domain is preserved under token {token:#x} in this boot")
    users = tx.conn.execute(
        select(HandoverEntry.descriptor, HandoverEntry.abi_version).where(
            HandoverEntry.boot_id == tx.machine.boot_id, HandoverEntry.kind == "device", LIVE
        )
    ).all()
    if any(catalogue.parse_descriptor("device", v, d).domain_token == token for d, v in users):
        raise Busy(f"a preserved device uses the domain under token {token:#x}: close its session instead")
    dom = get_domain(tx, row.domain_id)
    tables = dom.pt.collect_tables()
    kho.unpreserve_pages(tx, [(phys >> PAGE_SHIFT, 0) for phys in tables], owner_tag(dom.id))
    crashpoint("unpreserve")
    drop_entry(tx, row.id)
    dom.set_state("live")
    return dom.id


def drop_entry(tx: Transaction, entry_id: int) -> None:
    """Take an entry out of this boot's handover: a version-1 entry is removed, a later one is
    flagged DELETED (in its row and its descriptor's header), leaves its session and is re-digested."""
    h = HandoverEntry
    e = tx.conn.execute(select(h.__table__).where(h.id == entry_id)).mappings().one()
    if e["abi_version"] == 1:
        tx.conn.execute(delete(h).where(h.id == entry_id))
        return
    desc = dict(e["descriptor"]) if isinstance(e["descriptor"], dict) else e["descriptor"]
    if isinstance(desc, dict) and "flags" in desc:
        desc["flags"] = int(desc["flags"]) | FLAG_DELETED
    fields: dict[str, Any] = {
        k: e[k] for k in ("machine_id", "boot_id", "token", "kind", "compatible", "domain_id", "device_id")
    }
    fields.update(descriptor=desc, session_id=None, abi_version=e["abi_version"], flags=e["flags"] | FLAG_DELETED)
    digests = compute_digests(tx.conn, **fields)
    tx.conn.execute(
        update(h).where(h.id == entry_id).values(descriptor=desc, session_id=None, flags=fields["flags"], **digests)
    )


def _require_own_boot(tx: Transaction, dom: Domain, op: str) -> None:
    if dom.boot_id != tx.machine.boot_id:
        raise NotPermitted(f"domain {dom.id} belongs to an earlier boot: {op} refused (restore it first)")


# -- restore (boot N+1) ----------------------------------------------------------------------
@reads_stored_rows
def incoming_entries(tx: Transaction) -> list[StoredEntry]:
    """The handover of the previous boot (empty if it did not end with a live update)."""
    try:
        prev = kho.incoming_boot_id(tx)
    except NotFound:
        return []
    return [e for e in read_entries(tx.conn, tx.machine.id, prev) if not e.deleted]


def _find_incoming(tx: Transaction, token: int) -> IncomingEntry:
    prev = kho.incoming_boot_id(tx)  # explains a cold reboot or a first boot
    for entry in incoming_entries(tx):
        if entry.token == token:
            return entry
    verify_handover(tx.conn, tx.machine.id, prev)
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


def validate_geometry(desc: Any) -> None:
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


def _walk_preserved(tx: Transaction, desc: Any, unvisited: set[int], old_domain: int) -> list[int]:
    """The preserved tables reachable from the descriptor's top, pre-order (pfns).

    Every table must be a page preserved for this domain, reached once. ``unvisited`` holds
    the domain's preserved pfns; each is taken out as it is reached (one set for both checks:
    the walk holds nothing else per table), so what is left is what the walk did not reach.
    """
    fmt = get_format(desc.format)
    features = frozenset({Feature.SIGN_EXTEND}) if desc.sign_extend else frozenset()
    mem = tx.memory
    out: list[int] = []

    def visit(pfn: int, level: int, n: int, via: str) -> None:
        if pfn not in unvisited:
            if pfn in out:  # only on the way to an error: a linear search is fine
                raise BadData(f"{via} points to pfn {pfn:#x} a second time (cycle or shared table)")
            raise BadData(f"{via} points to pfn {pfn:#x}, which was not preserved for domain {old_domain}")
        if not mem.is_allocated(pfn):
            raise BadData(f"{via} points to pfn {pfn:#x}, which was preserved but holds no stored page")
        meta = mem.meta(pfn)
        # a leaf table's bytes are not read here: restore_pages checks them against their hash
        if mem.order(pfn) != 0 or (level > 0 and len(mem.view(pfn)) != PAGE_SIZE):
            raise BadData(f"{via} points to pfn {pfn:#x}, whose stored contents are not one page")
        if meta.get("domain_id") != old_domain or meta.get("level") != level:
            raise BadData(f"{via} points to pfn {pfn:#x}, which is not a level-{level} table of domain {old_domain}")
        unvisited.remove(pfn)
        out.append(pfn)
        if level == 0:
            return
        children = []
        for i, raw in enumerate(mem.words(pfn)[:n]):
            if raw:
                d = fmt.decode(raw, level, features)
                if d.type is EntryType.TABLE:
                    children.append((i, d.addr >> PAGE_SHIFT))
        # one query for the table's children
        (mem.load if level > 1 else mem.load_meta)([child for _, child in children])
        for i, child in children:
            visit(child, level - 1, ITEMS_PER_TABLE, f"entry {i} of table {pfn:#x}")

    top_pfn = desc.top_table_phys >> PAGE_SHIFT
    mem.load([top_pfn])
    if not mem.is_allocated(top_pfn):
        raise BadData(f"descriptor top_table_phys {desc.top_table_phys:#x} is not a page of this machine")
    visit(top_pfn, desc.top_level, 1 << (desc.vasz - item_lg2sz(desc.top_level)), "descriptor top_table_phys")
    return out


#: every field of a domain descriptor that says how its frames translate
GEOMETRY_FIELDS = ("format", "top_table_phys", "top_level", "vasz", "sign_extend")


def descriptor_mismatches(
    conn: Connection,
    machine_id: int,
    desc: Any,
    domain_id: int,
    fields: tuple[str, ...] = GEOMETRY_FIELDS,
) -> list[str]:
    """How a domain descriptor differs from the preserved domain it names (its row keeps the geometry)."""
    d = DomainRow.__table__.c  # the statement get_domain runs (compiled once)
    row = conn.execute(select(DomainRow.__table__).where(d.id == domain_id, d.machine_id == machine_id)).first()
    if row is None:
        return [f"it names domain {domain_id}, which does not exist"]
    fmt, features, vasz = stored_geometry(row._mapping)
    if row.state != "preserved":
        return [f"it names domain {domain_id}, which is {row.state}, not preserved"]
    stored = {
        "format": row.format,
        "top_table_phys": row.top_phys,
        "top_level": row.top_level,
        "vasz": vasz,
        "sign_extend": fmt.effective(Feature.SIGN_EXTEND, features),
    }
    return [
        f"{field} is {_shown(getattr(desc, field))} but domain {domain_id} has {_shown(value)}"
        for field, value in stored.items()
        if field in fields and getattr(desc, field) != value
    ]


def _shown(value: object) -> str:
    return hex(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0xFFFF else str(value)


def _check_against_old_domain(
    tx: Transaction, desc: Any, domain_id: int, token: int, fields: tuple[str, ...] = GEOMETRY_FIELDS
) -> None:
    """The descriptor must describe the domain whose frames it hands over, field by field: the same
    frames under another format, top, level, VA size or sign extension translate other IOVAs."""
    problems = descriptor_mismatches(tx.conn, tx.machine.id, desc, domain_id, fields)
    if problems:
        raise BadData(f"descriptor of token {token:#x}: {'; '.join(problems)}")


def _check_restorable(tx: Transaction, prev: int, entry: StoredEntry) -> None:
    """The entry names a domain that may be restored now: not yet restored, its session retrieved."""
    from .sessions import require_retrieved

    token = entry.token
    try:
        if entry.kind != "domain":
            raise InvalidArgument(f"token {token:#x} names a preserved {entry.kind}, not a domain")
        markers = restore_marker_problems(tx.conn, entry, tx.machine.boot_id)
        if markers:
            raise BadData(markers[0])
        if entry.session_id is not None:
            require_retrieved(tx, entry.session_id)
        if entry.restored_boot_id is not None:
            raise AlreadyExists(f"token {token:#x} has already been restored, as domain {entry.restored_domain_id}")
    except IommuptError as e:
        if not isinstance(e, BadData):
            # an edited handover is bad data, even where it would otherwise look like a plain refusal
            verify_handover(tx.conn, tx.machine.id, prev)
        raise


def read_descriptor(tx: Transaction, entry: StoredEntry) -> Any:
    """The entry's descriptor as this boot's kernel profile reads it: natively, or converted to a
    version it reads (a scripted migration of the serialization format, run at restore)."""
    token = entry.token
    what = f"descriptor of token {token:#x}"
    try:
        expected = catalogue.compatible_of(entry.kind, entry.abi_version)
    except BadData as e:
        raise BadData(f"handover entry {token:#x}: {e}") from None
    if entry.compatible != expected:
        raise BadData(f"handover entry {token:#x} has compatible {entry.compatible!r}: no handler for it")
    profile = tx.machine.profile
    path = read_path(profile, entry.kind, entry.abi_version)
    if path is None:
        raise BadData(
            f"handover entry {token:#x} is a version-{entry.abi_version} {entry.kind} descriptor, which kernel "
            f"profile {profile.name!r} neither reads nor converts"
        )
    return catalogue.read_along(entry.kind, path, entry.descriptor, what)


def _checked_handover(tx: Transaction, prev: int, entry: StoredEntry) -> tuple[Any, int, list[int]]:
    """The entry's descriptor, old domain and preserved tables (pfns), once everything that
    describes them is proven to be what the previous boot recorded."""
    token = entry.token
    desc = read_descriptor(tx, entry)
    validate_geometry(desc)
    if entry.domain_id is None:
        raise BadData(f"handover entry {token:#x} names no domain")
    old = entry.domain_id
    # a wrong format or sign extension would make the walk below decode the frames as something else
    _check_against_old_domain(tx, desc, old, token, ("format", "sign_extend"))
    unreached = kho.preserved_pfns(tx, owner_tag(old), prev)
    frames = _walk_preserved(tx, desc, unreached, old)
    if unreached:
        # the descriptor decodes less than was handed over (e.g. a narrowed vasz): restoring it would
        # change translations and leave preserved tables behind
        raise BadData(
            f"descriptor of token {token:#x} does not reach {len(unreached)} frame(s) preserved for domain "
            f"{old}: {[hex(p) for p in sorted(unreached)[:4]]}"
        )
    _check_against_old_domain(tx, desc, old, token)
    # nothing is trusted that the previous boot did not record: the whole handover must match its seal
    verify_handover(tx.conn, tx.machine.id, prev)
    return desc, old, frames


@atomic
@reads_stored_rows
def restore_domain(tx: Transaction, token: int) -> Domain:
    """Restore the domain the previous boot preserved under ``token``: all or nothing."""
    from .sessions import reattach_devices

    prev = kho.incoming_boot_id(tx)  # explains a cold reboot or a first boot
    entry = _find_incoming(tx, token)
    _check_restorable(tx, prev, entry)
    desc, old_id, frames = _checked_handover(tx, prev, entry)

    # A fresh domain of the same format, whose own top is freed in favour of the preserved one.
    dom = domain_alloc(tx, desc.format)
    pt = dom.pt
    pt.frames.free_tables([pt.top_phys])
    # the frames change hands (the walk proved each one's level); the old kernel's per-frame
    # state (incoherent) is stale
    kho.restore_pages(
        tx, [(pfn, 0) for pfn in frames], owner_tag(old_id), meta={"domain_id": dom.id, "incoherent": False}
    )
    crashpoint("restore")
    features = frozenset({Feature.SIGN_EXTEND}) if desc.sign_extend else frozenset()
    pt.adopt(top_phys=desc.top_table_phys, top_level=desc.top_level, max_vasz_lg2=desc.vasz, features=features)
    # the row's page sizes were those of the default domain allocated above
    tx.conn.execute(update(DomainRow).where(DomainRow.id == dom.id).values(pgsize_bitmap=pt.pgsize_bitmap))
    dom.set_state("restored")
    tx.conn.execute(update(DomainRow).where(DomainRow.id == old_id).values(state="freed", top_phys=None))
    mappings.move_domain(tx, old_id, dom.id)
    old = tx.cache.get("domains", {}).pop(old_id, None)
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
