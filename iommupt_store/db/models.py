"""SQLAlchemy models: the schema every Alembic revision must match.

The database layer stores pages as opaque bytes; it knows nothing about the
entries inside them.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import CheckConstraint, ForeignKey, Index, MetaData, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import false

from .types import U64, BigInt, Blob, Flag, Int, Json, Text, Timestamp, label_columns

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    #: columns typed only by their annotation (foreign keys) get the checked types too
    type_annotation_map = {int: Int, str: Text}


class Machine(Base):
    """A host: a name and an amount of RAM. Its memory is its page rows."""

    __tablename__ = "machine"

    id: Mapped[int] = mapped_column(Int, primary_key=True)
    name: Mapped[str] = mapped_column(Text(64), unique=True)
    mem_bytes: Mapped[int] = mapped_column(U64)
    page_size: Mapped[int] = mapped_column(Int, default=4096)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp(timezone=True), default=utcnow)
    #: no pfn below this is free: where the allocator starts looking (a trigger lowers it on every free)
    free_from: Mapped[int] = mapped_column(BigInt, default=0, server_default="0")

    __table_args__ = (
        CheckConstraint("page_size = 4096", name="page_size_4k"),
        CheckConstraint("mem_bytes > 0", name="mem_positive"),
    )


class Boot(Base):
    """One running kernel of a machine. The newest row is the current boot."""

    __tablename__ = "boot"

    id: Mapped[int] = mapped_column(Int, primary_key=True)
    machine_id: Mapped[int] = mapped_column(ForeignKey("machine.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Int)
    started_at: Mapped[dt.datetime] = mapped_column(Timestamp(timezone=True), default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(Timestamp(timezone=True))
    #: how the boot ended: NULL while running, 'cold' or 'liveupdate'
    end_kind: Mapped[str | None] = mapped_column(Text(16))
    #: set by the seal of a live update: SHA-256 over the boot's whole handover
    #: (``liveupdate/digests.py``); NULL for a running boot or one ended cold
    handover_digest: Mapped[str | None] = mapped_column(Text(64))
    #: the kernel profile the boot runs (``abi/profiles.py``); boots from before profiles ran lu-v3
    kernel_profile: Mapped[str] = mapped_column(Text(32), default="lu-v3", server_default="lu-v3")
    #: why this boot discarded the previous boot's handover (a KHO mismatch boots as if cold); NULL: it did not
    handover_discarded: Mapped[str | None] = mapped_column(Text(200))

    __table_args__ = (
        UniqueConstraint("machine_id", "number", name="uq_boot_machine_number"),
        CheckConstraint("number >= 1", name="number_positive"),
        CheckConstraint("end_kind IS NULL OR end_kind IN ('cold', 'liveupdate')", name="end_kind_known"),
        CheckConstraint("(ended_at IS NULL) = (end_kind IS NULL)", name="ended_consistent"),
    )


class Page(Base):
    """One allocated block of 2**page_order pages. Free memory has no row."""

    __tablename__ = "page"

    machine_id: Mapped[int] = mapped_column(
        ForeignKey("machine.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    pfn: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=False)
    page_order: Mapped[int] = mapped_column(Int, default=0)
    #: who holds the page, e.g. 'iommupt', 'test'
    owner: Mapped[str] = mapped_column(Text(64))
    #: the boot in which the page was allocated (or last re-claimed)
    boot_id: Mapped[int] = mapped_column(ForeignKey("boot.id"), index=True)
    contents: Mapped[bytes] = mapped_column(Blob)
    #: for IOMMU page-table frames: the domain that owns the frame, and the table's level
    domain_id: Mapped[int | None] = mapped_column(ForeignKey("domain.id"), index=True)
    level: Mapped[int | None] = mapped_column(Int)
    #: the table was made visible to a non-coherent IOMMU (ioptdesc ``incoherent``);
    #: stale after a live update, so restore clears it
    incoherent: Mapped[bool] = mapped_column(Flag, default=False, server_default=false())

    __table_args__ = (
        CheckConstraint("page_order >= 0 AND page_order <= 18", name="order_range"),
        CheckConstraint("(domain_id IS NULL) = (level IS NULL)", name="frame_has_level"),
        CheckConstraint("length(contents) = (4096 << page_order)", name="contents_size"),
        # PostgreSQL keeps a 4 KiB frame in its row, never compressed (revision 0009)
        {"postgresql_with": {"toast_tuple_target": 8160}},
    )


DOMAIN_STATES = ("live", "preserved", "restored", "freed")


class Domain(Base):
    """An IOMMU domain on the generic page table: its format, geometry and top.

    Its table frames are the page rows with ``domain_id`` = this id.
    """

    __tablename__ = "domain"

    id: Mapped[int] = mapped_column(Int, primary_key=True)
    machine_id: Mapped[int] = mapped_column(ForeignKey("machine.id", ondelete="CASCADE"), index=True)
    #: the boot the domain belongs to (created in, or restored into)
    boot_id: Mapped[int] = mapped_column(ForeignKey("boot.id"), index=True)
    format: Mapped[str] = mapped_column(Text(16))
    #: live (mutable), preserved (handed over, frozen), restored (immutable), freed
    state: Mapped[str] = mapped_column(Text(16), default="live")
    top_phys: Mapped[int | None] = mapped_column(BigInt)
    top_level: Mapped[int] = mapped_column(Int)
    max_vasz_lg2: Mapped[int] = mapped_column(Int)
    max_oasz_lg2: Mapped[int] = mapped_column(Int)
    #: feature names (never bit numbers: the kernel renumbers them between versions)
    features: Mapped[list[str]] = mapped_column(Json)
    pgsize_bitmap: Mapped[int] = mapped_column(U64)
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp(timezone=True), default=utcnow)

    __table_args__ = (
        CheckConstraint(
            "state IN ('live', 'preserved', 'restored', 'freed')",
            name="state_known",
        ),
        CheckConstraint("(state = 'freed') = (top_phys IS NULL)", name="top_unless_freed"),
        CheckConstraint("top_level >= 0 AND top_level <= 5", name="top_level_range"),
        CheckConstraint("max_vasz_lg2 > 0 AND max_vasz_lg2 <= 64", name="vasz_range"),
    )


class Preservation(Base):
    """A KHO-style preservation: pages a boot hands over to the next one.

    Restorable only in the boot right after ``boot_id``, once, at the same
    order, with unchanged bytes (``content_hash``). Never restored, the pages
    stay reserved for that boot and are free memory in the one after.
    """

    __tablename__ = "preservation"

    id: Mapped[int] = mapped_column(Int, primary_key=True)
    machine_id: Mapped[int] = mapped_column(ForeignKey("machine.id", ondelete="CASCADE"), index=True)
    pfn: Mapped[int] = mapped_column(BigInt)
    page_order: Mapped[int] = mapped_column(Int, default=0)
    #: the boot that preserved the pages
    boot_id: Mapped[int] = mapped_column(ForeignKey("boot.id"), index=True)
    #: who preserved them, e.g. 'iommupt:domain/3'
    preserved_by: Mapped[str] = mapped_column(Text(64))
    #: sha256 of the contents when preserved
    content_hash: Mapped[str] = mapped_column(Text(64))
    restored_boot_id: Mapped[int | None] = mapped_column(ForeignKey("boot.id"))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp(timezone=True), default=utcnow)
    #: for a page-table frame: the domain it belonged to in the preserving boot, and its level
    domain_id: Mapped[int | None] = mapped_column(ForeignKey("domain.id"), index=True)
    level: Mapped[int | None] = mapped_column(Int)

    __table_args__ = (
        UniqueConstraint("machine_id", "boot_id", "pfn", name="uq_preservation_boot_pfn"),
        CheckConstraint("page_order >= 0 AND page_order <= 18", name="order_range"),
        CheckConstraint("restored_boot_id IS NULL OR restored_boot_id != boot_id", name="restored_later"),
    )


class HandoverEntry(Base):
    """One named entry of a boot's handover (a KHO subtree): a compatible
    string and a serialized descriptor, found by token in the next boot."""

    __tablename__ = "handover_entry"

    id: Mapped[int] = mapped_column(Int, primary_key=True)
    machine_id: Mapped[int] = mapped_column(ForeignKey("machine.id", ondelete="CASCADE"), index=True)
    #: the boot that wrote the entry
    boot_id: Mapped[int] = mapped_column(ForeignKey("boot.id"), index=True)
    token: Mapped[int] = mapped_column(U64)
    compatible: Mapped[str] = mapped_column(Text(64))
    descriptor: Mapped[dict[str, object]] = mapped_column(Json)
    #: the object it describes in the writing boot (e.g. the domain)
    domain_id: Mapped[int | None] = mapped_column(ForeignKey("domain.id"))
    restored_boot_id: Mapped[int | None] = mapped_column(ForeignKey("boot.id"))
    restored_domain_id: Mapped[int | None] = mapped_column(ForeignKey("domain.id"))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp(timezone=True), default=utcnow)
    #: the LUO session holding the object (NULL: held by the boot's handover directly)
    session_id: Mapped[int | None] = mapped_column(ForeignKey("luo_session.id"), index=True)
    #: what the entry describes: 'domain' or 'device'
    kind: Mapped[str] = mapped_column(Text(16), default="domain", server_default="domain")
    #: for a device entry: the device
    device_id: Mapped[int | None] = mapped_column(ForeignKey("device.id"))
    #: SHA-256 over the entry as written (``liveupdate/digests.py``): restore refuses an edited entry
    digest: Mapped[str] = mapped_column(Text(64))
    #: SHA-256 over (pfn, order, content hash) of the frames preserved for the entry's domain
    frames_digest: Mapped[str] = mapped_column(Text(64))
    #: the catalogue version of ``descriptor`` (``abi/catalogue.py``; not the kernel's own version field)
    abi_version: Mapped[int] = mapped_column(Int, default=1, server_default="1")
    #: the object header's flags: DELETED (bit 0: the slot is dead, its token never reused), INCOMING (bit 1)
    flags: Mapped[int] = mapped_column(Int, default=0, server_default="0")

    __table_args__ = (
        UniqueConstraint("boot_id", "token", name="uq_handover_entry_boot_token"),
        CheckConstraint("abi_version >= 1", name="abi_version_positive"),
        CheckConstraint("flags >= 0 AND flags <= 3", name="flags_known"),
    )


class LuoSession(Base):
    """A LUO session: a named container of preserved objects, found by name in the next boot.

    States: ``open`` (outgoing, mutable), ``sealed`` (handed over by a live update),
    ``retrieved`` and ``finished`` (in the next boot), ``discarded`` (never retrieved in time).
    """

    __tablename__ = "luo_session"

    id: Mapped[int] = mapped_column(Int, primary_key=True)
    machine_id: Mapped[int] = mapped_column(ForeignKey("machine.id", ondelete="CASCADE"), index=True)
    #: the boot that created (and hands over) the session
    boot_id: Mapped[int] = mapped_column(ForeignKey("boot.id"), index=True)
    name: Mapped[str] = mapped_column(Text(63))
    state: Mapped[str] = mapped_column(Text(16), default="open")
    retrieved_boot_id: Mapped[int | None] = mapped_column(ForeignKey("boot.id"))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp(timezone=True), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(Timestamp(timezone=True))

    __table_args__ = (
        UniqueConstraint("boot_id", "name", name="uq_luo_session_boot_name"),
        CheckConstraint("state IN ('open', 'sealed', 'retrieved', 'finished', 'discarded')", name="state_known"),
    )


class Device(Base):
    """A PCI device and its current attachment: the domain its DMA goes through, with a domain id."""

    __tablename__ = "device"

    id: Mapped[int] = mapped_column(Int, primary_key=True)
    machine_id: Mapped[int] = mapped_column(ForeignKey("machine.id", ondelete="CASCADE"), index=True)
    #: PCI segment:bus:device.function, e.g. 0000:3b:00.1
    bdf: Mapped[str] = mapped_column(Text(12))
    #: the DMA owner (e.g. the VFIO/iommufd user) that may attach or replace
    owner: Mapped[str | None] = mapped_column(Text(64))
    domain_id: Mapped[int | None] = mapped_column(ForeignKey("domain.id"))
    #: hardware domain id of the attachment (VT-d DID)
    did: Mapped[int | None] = mapped_column(Int)
    #: the boot that made the current attachment
    boot_id: Mapped[int | None] = mapped_column(ForeignKey("boot.id"))

    __table_args__ = (
        UniqueConstraint("machine_id", "bdf", name="uq_device_machine_bdf"),
        CheckConstraint("(domain_id IS NULL) = (did IS NULL)", name="attached_has_did"),
        CheckConstraint("did IS NULL OR (did >= 1 AND did <= 65535)", name="did_range"),
    )


class KhoRoot(Base):
    """The KHO root of a boot's handover (``kho-v4``: the root FDT), with what hangs off it directly:
    the kexec-metadata record and the LUO header. Written by the seal; an imported real handover fits too."""

    __tablename__ = "kho_root"

    id: Mapped[int] = mapped_column(Int, primary_key=True)
    machine_id: Mapped[int] = mapped_column(ForeignKey("machine.id", ondelete="CASCADE"), index=True)
    boot_id: Mapped[int] = mapped_column(ForeignKey("boot.id"), unique=True)
    compatible: Mapped[str] = mapped_column(Text(48))
    #: physical address of the preserved-memory map (the radix tree's root); NULL where not modelled
    preserved_memory_map: Mapped[int | None] = mapped_column(U64)
    #: the kernel profile that wrote it (NULL for an imported handover)
    writer_profile: Mapped[str | None] = mapped_column(Text(32))
    #: kexec-metadata: {u32 version; char previous_release[65]; u32 kexec_count}
    kexec_version: Mapped[int | None] = mapped_column(BigInt)
    previous_release: Mapped[str | None] = mapped_column(Text(65))
    kexec_count: Mapped[int | None] = mapped_column(BigInt)
    #: the LUO header: {compatible; u64 liveupdate_num}
    luo_compatible: Mapped[str | None] = mapped_column(Text(48))
    liveupdate_num: Mapped[int | None] = mapped_column(U64)

    __table_args__ = (
        CheckConstraint("(kexec_version IS NULL) = (kexec_count IS NULL)", name="kexec_metadata_whole"),
        CheckConstraint("(luo_compatible IS NULL) = (liveupdate_num IS NULL)", name="luo_header_whole"),
    )


class KhoSubnode(Base):
    """A subnode of the KHO root: a subsystem's blob (``preserved-data``, ``blob-size``)."""

    __tablename__ = "kho_subnode"

    id: Mapped[int] = mapped_column(Int, primary_key=True)
    machine_id: Mapped[int] = mapped_column(ForeignKey("machine.id", ondelete="CASCADE"), index=True)
    boot_id: Mapped[int] = mapped_column(ForeignKey("boot.id"), index=True)
    name: Mapped[str] = mapped_column(Text(64))
    preserved_data: Mapped[int] = mapped_column(U64)
    #: NULL before kho-v4, which added it
    blob_size: Mapped[int | None] = mapped_column(U64)
    #: a sub-FDT's own compatible (e.g. memblock-v1), if it has one
    compatible: Mapped[str | None] = mapped_column(Text(48))

    __table_args__ = (UniqueConstraint("boot_id", "name", name="uq_kho_subnode_boot_name"),)


class LuoFile(Base):
    """A file preserved in a LUO session: ``{compatible[48]; u64 data; u64 token}`` (e.g. a memfd)."""

    __tablename__ = "luo_file"

    id: Mapped[int] = mapped_column(Int, primary_key=True)
    machine_id: Mapped[int] = mapped_column(ForeignKey("machine.id", ondelete="CASCADE"), index=True)
    boot_id: Mapped[int] = mapped_column(ForeignKey("boot.id"), index=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("luo_session.id"), index=True)
    compatible: Mapped[str] = mapped_column(Text(48))
    data: Mapped[int] = mapped_column(U64)
    token: Mapped[int] = mapped_column(U64)

    __table_args__ = (UniqueConstraint("session_id", "token", name="uq_luo_file_session_token"),)


class LuoFlb(Base):
    """A LUO file-lifecycle-bound object (global per-subsystem data): ``{name[48]; u64 data; u64 count}``."""

    __tablename__ = "luo_flb"

    id: Mapped[int] = mapped_column(Int, primary_key=True)
    machine_id: Mapped[int] = mapped_column(ForeignKey("machine.id", ondelete="CASCADE"), index=True)
    boot_id: Mapped[int] = mapped_column(ForeignKey("boot.id"), index=True)
    name: Mapped[str] = mapped_column(Text(48))
    data: Mapped[int] = mapped_column(U64)
    count: Mapped[int] = mapped_column(U64)

    __table_args__ = (UniqueConstraint("boot_id", "name", name="uq_luo_flb_boot_name"),)


class MappingRun(Base):
    """One maximal run of leaves of a domain (see ``mappings.py``): a stretch of
    one page size, contiguous in IOVA and physical address, with one set of
    permissions and attribute bits. Written with the frames; read by the
    ``mapping`` view."""

    __tablename__ = "mapping_run"

    id: Mapped[int] = mapped_column(Int, primary_key=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domain.id", ondelete="CASCADE"))
    #: first and last IOVA (two's complement at and above 2^63, like every u64 here)
    iova: Mapped[int] = mapped_column(U64)
    last_iova: Mapped[int] = mapped_column(U64)
    phys: Mapped[int] = mapped_column(BigInt)
    size: Mapped[int] = mapped_column(BigInt)
    page_size: Mapped[int] = mapped_column(BigInt)
    readable: Mapped[bool] = mapped_column(Flag)
    writable: Mapped[bool] = mapped_column(Flag)
    #: JSON array of the names of the attribute bits set in every leaf of the run
    flags: Mapped[str] = mapped_column(Text(400))

    __table_args__ = (
        Index("ix_mapping_run_domain_iova", "domain_id", "iova"),
        Index("ix_mapping_run_domain_last", "domain_id", "last_iova"),
        CheckConstraint("size > 0 AND page_size > 0", name="sizes_positive"),
    )


label_columns(Base.metadata.tables.values())
