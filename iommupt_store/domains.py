"""IOMMU domains stored in the database: the API over the generic engine.

A ``Domain`` lives inside one ``Transaction``: its table frames are machine
pages (``page.domain_id``/``page.level``), its geometry a ``domain`` row that
is written back once, at flush. States: ``live`` (mutable), ``preserved``
(handed over for a live update: map/unmap refused), ``restored`` (immutable:
only ``free``), ``freed``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import func, insert, or_, select, update

from . import mappings
from .db.models import Boot, Device, Page
from .db.models import Domain as DomainRow
from .db.rows import reads_stored_rows, required
from .errors import BadData, Busy, InvalidArgument, IommuptError, NotFound, NotPermitted
from .formats import get_format
from .formats.base import TABLE_ITEMS_LG2, Feature, PageTableFormat, Prot, item_lg2sz
from .machine import Transaction, atomic
from .memory import PAGE_SHIFT, PAGE_SIZE, Memory
from .pagetable.engine import PageTable, range_vasz
from .pagetable.walker import HardwareWalker
from .reports import DomainInfo

OWNER = "iommupt"
#: table frames read in one query when a walk or a free goes through many of them
FETCH_BATCH = 512
#: frames a hardware walker holds at most (a larger domain is read as the walk goes)
WALK_FRAMES = 4096

#: what ``domain create FORMAT`` gets without options: the common hardware setups. Given only one
#: of ``top_level`` and ``vasz``, a format with a fixed top derives the other (see ``domain_alloc``).
DEFAULTS: dict[str, dict[str, Any]] = {
    "amdv1": {"top_level": 2, "vasz": 64, "features": frozenset()},
    "x86_64": {"top_level": 3, "vasz": 48, "features": frozenset({Feature.SIGN_EXTEND})},
    "vtdss": {"top_level": 3, "vasz": 48, "features": frozenset()},
    "riscv": {"top_level": None, "vasz": 48, "features": frozenset({Feature.SIGN_EXTEND})},
}


class MemoryFrames:
    """A FrameStore over machine memory: the frames of one domain."""

    def __init__(self, memory: Memory, domain_id: int, *, incoherent: bool = False) -> None:
        self.memory = memory
        self.domain_id = domain_id
        #: new tables are "started" for a non-coherent IOMMU (ioptdesc ``incoherent``)
        self.incoherent = incoherent

    def _pfn(self, phys: int) -> int:
        pfn = phys >> PAGE_SHIFT
        if phys & ((1 << PAGE_SHIFT) - 1) or not self.memory.is_allocated(pfn):
            raise BadData(f"table pointer {phys:#x} is not an allocated page")
        if self.memory.meta(pfn).get("domain_id") != self.domain_id:
            raise BadData(f"table pointer {phys:#x} is not a frame of domain {self.domain_id}")
        if self.memory.order(pfn):
            raise self._not_one_page(pfn)
        return pfn

    def _not_one_page(self, pfn: int) -> BadData:
        return BadData(f"page row (pfn {pfn:#x}) of domain {self.domain_id}: a table frame is not one whole page")

    def _frame(self, phys: int) -> int:
        """``_pfn``, for a frame whose bytes are used: they must be one page (a hand edit may resize them)."""
        pfn = self._pfn(phys)
        if self.memory.nbytes(pfn) != PAGE_SIZE:
            raise self._not_one_page(pfn)
        return pfn

    def alloc_table(self, level: int) -> int:
        return self.memory.alloc(OWNER, domain_id=self.domain_id, level=level, incoherent=self.incoherent) << PAGE_SHIFT

    def free_tables(self, tables: Iterable[int]) -> None:
        tables = list(tables)
        for i in range(0, len(tables), FETCH_BATCH):
            batch = tables[i : i + FETCH_BATCH]
            # a freed table's bytes are never read: its order and owner are enough
            self.memory.load_meta([phys >> PAGE_SHIFT for phys in batch])
            for phys in batch:
                self.memory.free(self._pfn(phys))

    def prefetch(self, tables: Iterable[int]) -> None:
        self.memory.load([phys >> PAGE_SHIFT for phys in tables])

    def read(self, phys: int) -> memoryview:
        return self.memory.words(self._frame(phys))

    def write(self, phys: int) -> memoryview:
        return self.memory.words_rw(self._frame(phys))


class Domain:
    """One IOMMU domain, bound to a transaction."""

    def __init__(self, tx: Transaction, row: dict[str, Any], pt: PageTable | None) -> None:
        self.tx = tx
        self.id: int = row["id"]
        self.format: str = row["format"]
        self.state: str = row["state"]
        self.boot_id: int = row["boot_id"]
        self._bind(pt)

    def _bind(self, pt: PageTable | None) -> None:
        self._pt = pt
        self._dirty = False
        if pt is not None:
            pt.on_top_change = self._touch

    def _reload(self, row: Any) -> None:
        """Take the state the database holds (after a failed call was rolled back)."""
        self.state = row["state"]
        self.boot_id = row["boot_id"]
        self._bind(None if row["state"] == "freed" else page_table_from_row(self.tx, row))

    def _touch(self) -> None:
        self._dirty = True

    @property
    def pt(self) -> PageTable:
        if self._pt is None:
            raise NotFound(f"domain {self.id} has been freed")
        return self._pt

    def _require_own_boot(self, op: str) -> None:
        if self.boot_id != self.tx.machine.boot_id and self.state != "freed":
            raise NotPermitted(
                f"domain {self.id} belongs to an earlier boot (the previous kernel's object): {op} refused; "
                "restore it in this boot"
            )

    def _require(self, op: str, *, allow_preserved: bool = False) -> PageTable:
        self._require_own_boot(op)
        if self.state == "restored":
            raise NotPermitted(f"domain {self.id} was restored after a live update and is immutable: {op} refused")
        if self.state == "preserved" and not allow_preserved:
            raise NotPermitted(f"domain {self.id} is preserved for a live update: {op} refused until unpreserved")
        return self.pt

    # -- operations -----------------------------------------------------------------
    @atomic
    def map_range(
        self,
        iova: int,
        paddr: int,
        length: int,
        prot: int = Prot.READ | Prot.WRITE,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Map ``length`` bytes (see ``PageTable.map_range``; ``progress(done, length)`` counts bytes)."""
        pt = self._require("map")
        segments = pt.map_range(iova, paddr, length, prot, progress)
        mappings.record_map(self.tx, self.id, mappings.segment_runs(pt, segments, prot))

    @atomic
    def unmap_range(self, iova: int, length: int) -> int:
        pt = self._require("unmap")
        unmapped = pt.unmap_range(iova, length)
        mappings.record_unmap(self.tx, self.id, mappings.removed_ranges(pt, iova, unmapped))
        return unmapped

    def iova_to_phys(self, iova: int) -> int:
        return self._require("iova_to_phys", allow_preserved=True).iova_to_phys(iova)

    @atomic
    def free(self) -> int:
        """Release every table frame (``deinit``); the only operation a restored domain accepts."""
        if self.state == "preserved":
            raise NotPermitted(f"domain {self.id} is preserved for a live update: unpreserve it before freeing")
        self._require_own_boot("free")
        attached = self.tx.conn.execute(select(Device.bdf).where(Device.domain_id == self.id)).scalars().all()
        if attached:
            raise Busy(f"domain {self.id} is attached to device(s) {', '.join(attached)}: detach or replace first")
        n = self.pt.free()
        mappings.drop_domain(self.tx, self.id)
        self._pt = None
        self.set_state("freed")
        return n

    def set_state(self, state: str) -> None:
        self.state = state
        self._dirty = True

    def walker(self) -> HardwareWalker:
        """A hardware walker over this domain's frames as stored in the database."""
        return hardware_walker(self.tx, self.id)

    def info(self) -> DomainInfo:
        boot = required(
            self.tx.conn.execute(select(Boot.number).where(Boot.id == self.boot_id)).scalar(),
            f"boot row {self.boot_id} (of domain {self.id})",
        )
        # a freed domain's geometry comes from its stored row (no frames are touched)
        pt = self._pt or page_table_from_row(
            self.tx, self.tx.conn.execute(select(DomainRow.__table__).where(DomainRow.id == self.id)).mappings().one()
        )
        return DomainInfo(
            id=self.id,
            format=self.format,
            state=self.state,
            boot=boot,
            top_phys=pt.top_phys if self._pt else None,
            top_level=pt.top_level,
            max_vasz_lg2=pt.max_vasz_lg2,
            range_vasz_lg2=pt.range_vasz(),
            max_oasz_lg2=pt.max_oasz_lg2,
            sign_extend=pt.sign_extend,
            features=sorted(f.value for f in pt.features),
            pgsize_bitmap=pt.pgsize_bitmap,
            frames=len(pt.collect_tables()) if self._pt else 0,
        )

    def _write_back(self) -> None:
        if not self._dirty:
            return
        pt = self._pt
        values: dict[str, Any] = {"state": self.state}
        if pt is not None:
            values.update(
                top_phys=pt.top_phys,
                top_level=pt.top_level,
                max_vasz_lg2=pt.max_vasz_lg2,
                features=sorted(f.value for f in pt.features),
            )
        else:
            values["top_phys"] = None
        self.tx.conn.execute(update(DomainRow).where(DomainRow.id == self.id).values(**values))
        self._dirty = False


# -- transaction-level registry -----------------------------------------------------------
def _loaded(tx: Transaction) -> dict[int, Domain]:
    domains: dict[int, Domain] | None = tx.cache.get("domains")
    if domains is None:
        domains = {}
        tx.cache["domains"] = domains

        def write_back() -> None:
            for d in domains.values():
                d._write_back()

        def reload() -> None:
            rows = {
                r["id"]: r
                for r in tx.conn.execute(select(DomainRow.__table__).where(DomainRow.id.in_(list(domains))))
                .mappings()
                .all()
            }
            for domain_id in list(domains):
                if domain_id in rows:
                    domains[domain_id]._reload(rows[domain_id])
                else:  # made by the call that failed
                    del domains[domain_id]

        tx.before_flush.append(write_back)
        tx.after_rollback.append(reload)
    return domains


@atomic
def domain_alloc(
    tx: Transaction,
    format: str,
    *,
    top_level: int | None = None,
    vasz: int | None = None,
    oasz: int | None = None,
    features: Iterable[Feature | str] | None = None,
) -> Domain:
    """Allocate a domain (``pt_iommu_<fmt>_init``) with its own top table.

    Without ``top_level`` and ``vasz`` the format's usual setup is built
    (``DEFAULTS``). A format whose top is fixed (x86_64, vtdss, riscv) derives
    one from the other: ``top_level`` alone selects the VA width its top
    decodes (2 -> 39, 3 -> 48, 4 -> 57 bits), ``vasz`` alone the smallest top
    that decodes it. amdv1 grows its top on demand: ``top_level`` is where it
    starts and ``vasz`` the hardware's limit, each defaulted on its own.

    ``features`` *replaces* the format's default features (x86_64 and riscv
    default to ``SIGN_EXTEND``: pass it again to keep it); None keeps the
    defaults. A format's force-enabled features are always added.
    """
    fmt = get_format(format)
    defaults = DEFAULTS[fmt.name]
    try:
        feats = defaults["features"] if features is None else frozenset(Feature(f) for f in features)
    except ValueError as e:
        raise InvalidArgument(f"{e}; features are {', '.join(f.value for f in Feature)}") from None
    top_level, vasz = _geometry_request(fmt, top_level, vasz, feats)
    conn = tx.conn
    machine = tx.machine
    domain_id = conn.execute(
        insert(DomainRow)
        .values(
            machine_id=machine.id,
            boot_id=machine.boot_id,
            format=fmt.name,
            state="live",
            top_phys=0,
            top_level=0,
            max_vasz_lg2=1,
            max_oasz_lg2=1,
            features=[],
            pgsize_bitmap=0,
        )
        .returning(DomainRow.id)
    ).scalar_one()
    pt = PageTable.create(
        fmt,
        MemoryFrames(tx.memory, domain_id, incoherent=fmt.effective(Feature.DMA_INCOHERENT, feats)),
        top_level=top_level,
        hw_max_vasz_lg2=vasz,
        hw_max_oasz_lg2=oasz,
        features=feats,
    )
    conn.execute(
        update(DomainRow)
        .where(DomainRow.id == domain_id)
        .values(
            top_phys=pt.top_phys,
            top_level=pt.top_level,
            max_vasz_lg2=pt.max_vasz_lg2,
            max_oasz_lg2=pt.max_oasz_lg2,
            features=sorted(f.value for f in pt.features),
            pgsize_bitmap=pt.pgsize_bitmap,
        )
    )
    row = {"id": domain_id, "format": fmt.name, "state": "live", "boot_id": machine.boot_id}
    dom = Domain(tx, row, pt)
    _loaded(tx)[domain_id] = dom
    return dom


def _geometry_request(
    fmt: PageTableFormat, top_level: int | None, vasz: int | None, features: frozenset[Feature]
) -> tuple[int | None, int | None]:
    """The (top_level, vasz) to build: the caller's, completed as ``domain_alloc`` documents."""
    defaults = DEFAULTS[fmt.name]
    if (top_level is None and vasz is None) or fmt.effective(Feature.DYNAMIC_TOP, features):
        return (
            defaults["top_level"] if top_level is None else top_level,
            defaults["vasz"] if vasz is None else vasz,
        )
    if vasz is None and top_level is not None:
        # a fixed top decodes exactly one width: asking for less would leave its upper entries unused
        return top_level, min(fmt.max_va_lg2, TABLE_ITEMS_LG2 + item_lg2sz(top_level))
    return top_level, vasz  # no top level: the format picks the smallest that decodes vasz


@reads_stored_rows
def get_domain(tx: Transaction, domain_id: int) -> Domain:
    """The domain with ``domain_id`` on this machine, in any state."""
    domains = _loaded(tx)
    if domain_id in domains:
        return domains[domain_id]
    d = DomainRow.__table__.c  # Core columns: compiled without the ORM layer
    q = select(DomainRow.__table__).where(d.id == domain_id, d.machine_id == tx.machine.id)
    row = tx.conn.execute(q).mappings().first()
    if row is None:
        raise NotFound(f"no domain {domain_id} on machine {tx.machine.name!r}")
    # frames are read (and checked to be whole pages) only when a walk reaches them
    pt = None if row["state"] == "freed" else page_table_from_row(tx, row)
    dom = Domain(tx, dict(row), pt)
    domains[domain_id] = dom
    return dom


_FEATURE_NAMES: TypeAdapter[list[Feature]] = TypeAdapter(list[Feature])


def stored_geometry(row: Any) -> tuple[PageTableFormat, frozenset[Feature], int]:
    """A domain row's format, features and the VA width its top decodes, checked: a row edited
    by hand is bad data naming the row, never a walk that indexes past a table."""
    where = f"domain row {row['id']}"
    try:
        fmt = get_format(row["format"])
    except IommuptError as e:
        raise BadData(f"{where}: {e}") from None
    try:
        features = frozenset(_FEATURE_NAMES.validate_python(row["features"]))
    except ValidationError:
        raise BadData(f"{where}: features {row['features']!r} is not a list of known feature names") from None
    top_level = row["top_level"]
    if not 0 <= top_level <= fmt.max_top_level:
        raise BadData(f"{where}: top_level {top_level} is outside {fmt.name}'s 0..{fmt.max_top_level}")
    vasz = range_vasz(fmt, top_level, row["max_vasz_lg2"], features)
    if not item_lg2sz(top_level) < vasz <= min(item_lg2sz(top_level) + TABLE_ITEMS_LG2, fmt.max_va_lg2):
        raise BadData(f"{where}: a VA width of {vasz} bits does not fit a level-{top_level} {fmt.name} top")
    return fmt, features, vasz


def page_table_from_row(tx: Transaction, row: Any) -> PageTable:
    fmt, features, _ = stored_geometry(row)
    return PageTable(
        fmt,
        MemoryFrames(tx.memory, row["id"], incoherent=fmt.effective(Feature.DMA_INCOHERENT, features)),
        top_phys=row["top_phys"],
        top_level=row["top_level"],
        max_vasz_lg2=row["max_vasz_lg2"],
        max_oasz_lg2=row["max_oasz_lg2"],
        features=features,
        pgsize_bitmap=row["pgsize_bitmap"],
    )


@reads_stored_rows
def list_domains(tx: Transaction, *, include_freed: bool = False) -> list[DomainInfo]:
    q = select(DomainRow.id).where(DomainRow.machine_id == tx.machine.id).order_by(DomainRow.id)
    if not include_freed:
        q = q.where(DomainRow.state != "freed")
    return [get_domain(tx, i).info() for i in tx.conn.execute(q).scalars()]


@reads_stored_rows
def frame_counts(tx: Transaction) -> dict[int, int]:
    """Frames per domain as stored (flushes this transaction's changes first)."""
    tx.flush()
    rows = tx.conn.execute(
        select(Page.domain_id, func.count())
        .where(Page.machine_id == tx.machine.id, Page.domain_id.is_not(None))
        .group_by(Page.domain_id)
    )
    return {d: n for d, n in rows if d is not None}


def frame_bytes(pfn: int, order: int, contents: bytes) -> bytes:
    """A table frame's contents, which must be one whole page (a hand edit may have shortened them)."""
    if order != 0 or len(contents) != PAGE_SIZE:
        raise BadData(f"page row (pfn {pfn:#x}): a table frame of {len(contents)} bytes at order {order}")
    return bytes(contents)


class StoredFrames(Mapping[int, bytes]):
    """A domain's frames as the database holds them, by physical address, read on demand.

    Frames come in batches (``prefetch``: the walker names a table's children
    before it visits them) and at most ``WALK_FRAMES`` are kept, so a walk of any
    size holds a bounded number. Valid while its transaction lasts.
    """

    def __init__(self, tx: Transaction, domain_id: int) -> None:
        self.tx = tx
        self.domain_id = domain_id
        self._held: dict[int, bytes | None] = {}

    def _where(self) -> list[Any]:
        return [Page.machine_id == self.tx.machine.id, Page.domain_id == self.domain_id]

    def prefetch(self, tables: Iterable[int]) -> None:
        wanted = [phys for phys in tables if phys not in self._held and not phys & (PAGE_SIZE - 1)]
        for i in range(0, len(wanted), FETCH_BATCH):
            batch = wanted[i : i + FETCH_BATCH]
            if len(self._held) + len(batch) > WALK_FRAMES:
                for phys in list(self._held)[: len(self._held) // 2]:
                    del self._held[phys]
            self._held.update(dict.fromkeys(batch))  # None: not a frame of the domain
            rows = self.tx.conn.execute(
                select(Page.pfn, Page.page_order, Page.contents).where(
                    *self._where(), Page.pfn.in_([phys >> PAGE_SHIFT for phys in batch])
                )
            ).all()
            for pfn, order, contents in rows:
                self._held[pfn << PAGE_SHIFT] = frame_bytes(pfn, order, contents)

    def __getitem__(self, phys: int) -> bytes:
        if phys not in self._held:
            self.prefetch([phys])
        data = self._held.get(phys)
        if data is None:
            raise KeyError(phys)
        return data

    def __iter__(self) -> Iterator[int]:
        pfns = self.tx.conn.execute(select(Page.pfn).where(*self._where()).order_by(Page.pfn)).scalars()
        return (pfn << PAGE_SHIFT for pfn in pfns)

    def __len__(self) -> int:
        return int(self.tx.conn.execute(select(func.count()).select_from(Page).where(*self._where())).scalar_one())


def walkable_row(tx: Transaction, domain_id: int) -> Any:
    """The row of a domain that has tables to walk, as stored (this transaction's changes are
    flushed first); NotFound for an unknown or freed domain."""
    tx.flush()
    row = (
        tx.conn.execute(
            select(DomainRow.__table__).where(DomainRow.id == domain_id, DomainRow.machine_id == tx.machine.id)
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"no domain {domain_id} on machine {tx.machine.name!r}")
    if row["top_phys"] is None:
        raise NotFound(f"domain {domain_id} has been freed")
    return row


@reads_stored_rows
def hardware_walker(tx: Transaction, domain_id: int) -> HardwareWalker:
    """A walker that sees only what the database holds for the domain: its row
    and its frames' bytes (this transaction's changes are flushed first).

    A domain of up to ``WALK_FRAMES`` frames is read at once (the walker keeps
    that snapshot); a larger one is read in batches as the walk goes, so that
    walking it holds a bounded number of frames.
    """
    row = walkable_row(tx, domain_id)
    fmt, features, vasz = stored_geometry(row)
    mine = [Page.machine_id == tx.machine.id, Page.domain_id == domain_id]
    count = tx.conn.execute(select(func.count()).select_from(Page).where(*mine)).scalar_one()
    frames: Mapping[int, bytes]
    if count > WALK_FRAMES:
        bad = tx.conn.execute(
            select(Page.pfn, Page.page_order, Page.contents)
            .where(*mine, or_(Page.page_order != 0, func.length(Page.contents) != PAGE_SIZE))
            .limit(1)
        ).first()
        if bad is not None:
            frame_bytes(*bad)  # raises, naming the row
        frames = StoredFrames(tx, domain_id)
    else:
        frames = {
            pfn << PAGE_SHIFT: frame_bytes(pfn, order, contents)
            for pfn, order, contents in tx.conn.execute(select(Page.pfn, Page.page_order, Page.contents).where(*mine))
        }
    sign_extend = fmt.effective(Feature.SIGN_EXTEND, features)
    return HardwareWalker(
        fmt, frames, top_phys=row["top_phys"], top_level=row["top_level"], vasz=vasz, sign_extend=sign_extend
    )
