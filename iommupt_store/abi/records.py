"""The KHO/LUO records of a handover, as the real kernel (Linux 7.3, ``kho-v4``/``luo-v5``) writes them.

- the KHO root: ``compatible``, ``preserved-memory-map`` and subnodes
  (``preserved-data``, ``blob-size``, a sub-FDT's own compatible);
- ``kexec-metadata``: ``{u32 version; char previous_release[65]; u32 kexec_count}``;
- the LUO header ``{compatible; u64 liveupdate_num}``, sessions ``{name[64]; files}``,
  files ``{compatible[48]; u64 data; u64 token}``, FLBs ``{name[48]; u64 data; u64 count}``.

The seal writes the root, kexec-metadata, the LUO header and the IOMMU FLB of
every live update; a captured real handover fits the same tables (its
sessions become ``luo_session`` rows, its files ``luo_file`` rows).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Connection, Table, insert, select

from ..db.models import KhoRoot, LuoFile, LuoFlb, LuoSession
from ..db.models import KhoSubnode as KhoSubnodeRow
from ..errors import BadData
from .catalogue import HexU64, describe_errors

U32 = Annotated[int, Field(ge=0, lt=1 << 32)]
Compatible = Annotated[str, Field(min_length=1, max_length=47)]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class KexecMetadata(_Record):
    version: U32 = 1
    #: the release of the kernel that wrote the handover (``uname -r``)
    previous_release: Annotated[str, Field(max_length=64)]
    #: live updates since the last cold boot, this one included (the outgoing kernel writes the new count)
    kexec_count: U32


class LuoHeader(_Record):
    compatible: Compatible
    liveupdate_num: HexU64


class KhoSubnodeRecord(_Record):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    preserved_data: HexU64
    #: added by kho-v4
    blob_size: HexU64 | None = None
    compatible: Compatible | None = None


class LuoFileRecord(_Record):
    compatible: Compatible
    data: HexU64
    token: HexU64


class LuoSessionRecord(_Record):
    name: Annotated[str, Field(min_length=1, max_length=63)]
    files: list[LuoFileRecord] = []


class LuoFlbRecord(_Record):
    name: Compatible
    data: HexU64
    count: HexU64


class KhoRootRecord(_Record):
    """A boot's whole handover header: what a real kernel's root FDT and LUO blob say."""

    compatible: Compatible
    preserved_memory_map: HexU64 | None = None
    #: the kernel profile that wrote it (None for an imported handover)
    writer_profile: Annotated[str, Field(max_length=32)] | None = None
    kexec: KexecMetadata | None = None
    luo: LuoHeader | None = None
    subnodes: list[KhoSubnodeRecord] = []
    sessions: list[LuoSessionRecord] = []
    flbs: list[LuoFlbRecord] = []


def write_records(conn: Connection, machine_id: int, boot_id: int, rec: KhoRootRecord) -> None:
    """Store ``rec`` as the handover records of ``boot_id`` (sessions not yet stored become sealed sessions)."""
    root: Table = KhoRoot.__table__  # type: ignore[assignment]  # Core: compiled without the ORM layer
    conn.execute(
        insert(root).values(
            machine_id=machine_id,
            boot_id=boot_id,
            compatible=rec.compatible,
            preserved_memory_map=rec.preserved_memory_map,
            writer_profile=rec.writer_profile,
            kexec_version=rec.kexec.version if rec.kexec else None,
            previous_release=rec.kexec.previous_release if rec.kexec else None,
            kexec_count=rec.kexec.kexec_count if rec.kexec else None,
            luo_compatible=rec.luo.compatible if rec.luo else None,
            liveupdate_num=rec.luo.liveupdate_num if rec.luo else None,
        )
    )
    owner = {"machine_id": machine_id, "boot_id": boot_id}
    _insert_many(conn, KhoSubnodeRow, [{**owner, **sub.model_dump()} for sub in rec.subnodes])
    files: list[dict[str, Any]] = []
    for session in rec.sessions:
        sid = conn.execute(
            select(LuoSession.id).where(LuoSession.boot_id == boot_id, LuoSession.name == session.name)
        ).scalar()
        if sid is None:
            sid = conn.execute(
                insert(LuoSession)
                .values(machine_id=machine_id, boot_id=boot_id, name=session.name, state="sealed")
                .returning(LuoSession.id)
            ).scalar_one()
        files += [{**owner, "session_id": sid, **f.model_dump()} for f in session.files]
    _insert_many(conn, LuoFile, files)
    _insert_many(conn, LuoFlb, [{**owner, **flb.model_dump()} for flb in rec.flbs])


def _insert_many(conn: Connection, model: Any, rows: list[dict[str, Any]]) -> None:
    """One executemany per table (an empty list inserts nothing: executemany needs a row)."""
    if rows:
        conn.execute(insert(model.__table__), rows)


def read_records(conn: Connection, boot_id: int) -> KhoRootRecord | None:
    """The handover records of ``boot_id``, validated (None: the boot wrote none)."""
    root = conn.execute(select(KhoRoot.__table__).where(KhoRoot.boot_id == boot_id)).mappings().first()
    if root is None:
        return None
    sub = KhoSubnodeRow.__table__
    files: dict[int, list[dict[str, Any]]] = {}
    for f in conn.execute(
        select(LuoFile.session_id, LuoFile.compatible, LuoFile.data, LuoFile.token)
        .where(LuoFile.boot_id == boot_id)
        .order_by(LuoFile.id)
    ).mappings():
        files.setdefault(f["session_id"], []).append(
            {"compatible": f["compatible"], "data": f["data"], "token": f["token"]}
        )
    data: dict[str, Any] = {
        "compatible": root["compatible"],
        "preserved_memory_map": root["preserved_memory_map"],
        "writer_profile": root["writer_profile"],
        "kexec": None
        if root["kexec_version"] is None
        else {
            "version": root["kexec_version"],
            "previous_release": root["previous_release"],
            "kexec_count": root["kexec_count"],
        },
        "luo": None
        if root["luo_compatible"] is None
        else {"compatible": root["luo_compatible"], "liveupdate_num": root["liveupdate_num"]},
        "subnodes": [
            {k: r[k] for k in ("name", "preserved_data", "blob_size", "compatible")}
            for r in conn.execute(select(sub).where(sub.c.boot_id == boot_id).order_by(sub.c.name)).mappings()
        ],
        "sessions": [
            {"name": name, "files": files.get(sid, [])}
            for sid, name in conn.execute(
                select(LuoSession.id, LuoSession.name).where(LuoSession.boot_id == boot_id).order_by(LuoSession.name)
            )
            if sid in files
        ],
        "flbs": [
            {"name": r.name, "data": r.data, "count": r.count}
            for r in conn.execute(
                select(LuoFlb.name, LuoFlb.data, LuoFlb.count).where(LuoFlb.boot_id == boot_id).order_by(LuoFlb.name)
            )
        ],
    }
    try:
        return KhoRootRecord.model_validate(data)
    except ValidationError as e:
        raise BadData(describe_errors(e, f"handover records of boot row {boot_id}")) from None


def records_json(conn: Connection, boot_id: int, *, written: KhoRootRecord | None = None) -> Any:
    """The records as JSON (what the seal digest covers), or None.

    ``written``: the record just stored for the boot. It is used as it is, without reading the rows
    back, when the rows would give it back unchanged: it has no subnodes or sessions and at most one
    FLB, so no order of the database's choosing is involved."""
    if written is not None and not written.subnodes and not written.sessions and len(written.flbs) <= 1:
        return written.model_dump(mode="json")
    rec = read_records(conn, boot_id)
    return None if rec is None else rec.model_dump(mode="json")
