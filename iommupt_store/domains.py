"""IOMMU domains stored in the database: the API over the generic engine.

A ``Domain`` lives inside one ``Transaction``: its table frames are machine
pages (``page.domain_id``/``page.level``), its geometry a ``domain`` row that
is written back once, at flush. States: ``live`` (mutable), ``preserved``
(handed over for a live update: map/unmap refused), ``restored`` (immutable:
only ``free``), ``freed``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, insert, select, update

from . import mappings
from .db.models import Boot, Device, Page
from .db.models import Domain as DomainRow
from .errors import BadData, Busy, NotFound, NotPermitted
from .formats import get_format
from .formats.base import Feature, Prot
from .machine import Transaction
from .memory import PAGE_SHIFT, Memory
from .pagetable.engine import PageTable, range_vasz
from .pagetable.walker import HardwareWalker
from .reports import DomainInfo

OWNER = "iommupt"

#: what ``domain create FORMAT`` gets without options: the common hardware setups
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
        return pfn

    def alloc_table(self, level: int) -> int:
        return self.memory.alloc(OWNER, domain_id=self.domain_id, level=level, incoherent=self.incoherent) << PAGE_SHIFT

    def free_tables(self, tables: Iterable[int]) -> None:
        for phys in tables:
            self.memory.free(self._pfn(phys))

    def read(self, phys: int) -> memoryview:
        return self.memory.words(self._pfn(phys))

    def write(self, phys: int) -> memoryview:
        return self.memory.words_rw(self._pfn(phys))


class Domain:
    """One IOMMU domain, bound to a transaction."""

    def __init__(self, tx: Transaction, row: dict[str, Any], pt: PageTable | None) -> None:
        self.tx = tx
        self.id: int = row["id"]
        self.format: str = row["format"]
        self.state: str = row["state"]
        self.boot_id: int = row["boot_id"]
        self._pt = pt
        self._dirty = False
        if pt is not None:
            pt.on_top_change = self._touch

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
    def map_range(self, iova: int, paddr: int, length: int, prot: int = Prot.READ | Prot.WRITE) -> None:
        pt = self._require("map")
        segments = pt.map_range(iova, paddr, length, prot)
        mappings.record_map(self.tx, self.id, mappings.segment_runs(pt, segments, prot))

    def unmap_range(self, iova: int, length: int) -> int:
        pt = self._require("unmap")
        unmapped = pt.unmap_range(iova, length)
        mappings.record_unmap(self.tx, self.id, mappings.removed_ranges(pt, iova, unmapped))
        return unmapped

    def iova_to_phys(self, iova: int) -> int:
        return self._require("iova_to_phys", allow_preserved=True).iova_to_phys(iova)

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
        boot = self.tx.conn.execute(select(Boot.number).where(Boot.id == self.boot_id)).scalar_one()
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

        tx.before_flush.append(write_back)
    return domains


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

    Options left as None take the format's usual setup (``DEFAULTS``).
    """
    fmt = get_format(format)
    defaults = DEFAULTS[fmt.name]
    feats = defaults["features"] if features is None else frozenset(Feature(f) for f in features)
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
        top_level=defaults["top_level"] if top_level is None else top_level,
        hw_max_vasz_lg2=defaults["vasz"] if vasz is None else vasz,
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


def get_domain(tx: Transaction, domain_id: int) -> Domain:
    """The domain with ``domain_id`` on this machine, in any state."""
    domains = _loaded(tx)
    if domain_id in domains:
        return domains[domain_id]
    row = (
        tx.conn.execute(
            select(DomainRow.__table__).where(DomainRow.id == domain_id, DomainRow.machine_id == tx.machine.id)
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"no domain {domain_id} on machine {tx.machine.name!r}")
    pt = None
    if row["state"] != "freed":
        tx.memory.load_matching(domain_id=domain_id)
        pt = page_table_from_row(tx, row)
    dom = Domain(tx, dict(row), pt)
    domains[domain_id] = dom
    return dom


def page_table_from_row(tx: Transaction, row: Any) -> PageTable:
    try:
        fmt = get_format(row["format"])
        features = frozenset(Feature(f) for f in row["features"])
    except (ValueError, NotFound) as e:
        raise BadData(f"domain {row['id']}: {e}") from e
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


def list_domains(tx: Transaction, *, include_freed: bool = False) -> list[DomainInfo]:
    q = select(DomainRow.id).where(DomainRow.machine_id == tx.machine.id).order_by(DomainRow.id)
    if not include_freed:
        q = q.where(DomainRow.state != "freed")
    return [get_domain(tx, i).info() for i in tx.conn.execute(q).scalars()]


def frame_counts(tx: Transaction) -> dict[int, int]:
    """Frames per domain as stored (flushes this transaction's changes first)."""
    tx.flush()
    rows = tx.conn.execute(
        select(Page.domain_id, func.count())
        .where(Page.machine_id == tx.machine.id, Page.domain_id.is_not(None))
        .group_by(Page.domain_id)
    )
    return {d: n for d, n in rows if d is not None}


def hardware_walker(tx: Transaction, domain_id: int) -> HardwareWalker:
    """A walker that sees only what the database holds for the domain: its row
    and its frames' bytes (this transaction's changes are flushed first)."""
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
    fmt = get_format(row["format"])
    frames: dict[int, bytes] = {
        int(pfn) << PAGE_SHIFT: bytes(contents)
        for pfn, contents in tx.conn.execute(
            select(Page.pfn, Page.contents).where(Page.machine_id == tx.machine.id, Page.domain_id == domain_id)
        )
    }
    features = frozenset(Feature(f) for f in row["features"])
    sign_extend = fmt.effective(Feature.SIGN_EXTEND, features)
    vasz = range_vasz(fmt, row["top_level"], row["max_vasz_lg2"], features)
    return HardwareWalker(
        fmt, frames, top_phys=row["top_phys"], top_level=row["top_level"], vasz=vasz, sign_extend=sign_extend
    )
