"""LUO sessions and preserved devices.

A session is a named container (name up to 63 bytes) of preserved objects,
held by token: domains and the devices that DMA through them. Closing an
outgoing session before the seal unpreserves everything in it. In the next
boot a session is retrieved by name, once; its domains are restored (which
re-attaches their preserved devices with the preserved domain ids), devices may
then be moved to new domains ("replace"), and ``finish`` completes it: every
object is asked first whether it can finish (all or nothing, EBUSY otherwise),
then the report lists what was never reclaimed.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Connection, Table, delete, insert, select, update

from ..abi import catalogue
from ..abi.catalogue import DeviceDescriptorV1, DeviceDescriptorV2, dma_owner_token, dump_descriptor
from ..abi.profiles import read_path
from ..crash import crashpoint
from ..db.models import Boot, Device, HandoverEntry, LuoSession
from ..db.rows import reads_stored_rows, required
from ..devices import bdf_fields, get_device, reattach_restored
from ..errors import AlreadyExists, BadData, Busy, InvalidArgument, NotFound, NotPermitted
from ..machine import Transaction, atomic
from ..names import SESSION_NAME_BYTES, check_session_name
from ..reports import FinishReport, SessionInfo
from . import kho
from .digests import owner_tag
from .integrity import LIVE, StoredEntry, compute_digests, verify_handover
from .iommu import drop_entry, preserve_domain, unpreserve_domain

MAX_NAME_BYTES = SESSION_NAME_BYTES
SESSION_STATES = ("open", "sealed", "retrieved", "finished", "discarded")


def _check_name(name: str) -> None:
    check_session_name(name)


def _outgoing(tx: Transaction, name: str) -> Any:
    row = (
        tx.conn.execute(
            select(LuoSession.__table__).where(
                LuoSession.machine_id == tx.machine.id,
                LuoSession.boot_id == tx.machine.boot_id,
                LuoSession.name == name,
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"no session {name!r} in this boot")
    return row


def _incoming(tx: Transaction, name: str) -> Any:
    """A session the previous boot handed over; the handover must be as that boot sealed it."""
    prev = kho.incoming_boot_id(tx)
    verify_handover(tx.conn, tx.machine.id, prev)
    row = (
        tx.conn.execute(
            select(LuoSession.__table__).where(
                LuoSession.machine_id == tx.machine.id, LuoSession.boot_id == prev, LuoSession.name == name
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"the previous boot handed over no session {name!r}")
    return row


# -- boot N ---------------------------------------------------------------------------------------
@atomic
def create_session(tx: Transaction, name: str) -> None:
    _check_name(name)
    exists = tx.conn.execute(
        select(LuoSession.id).where(
            LuoSession.machine_id == tx.machine.id, LuoSession.boot_id == tx.machine.boot_id, LuoSession.name == name
        )
    ).first()
    if exists is not None:
        raise AlreadyExists(f"session {name!r} already exists in this boot")
    tx.conn.execute(
        insert(LuoSession).values(machine_id=tx.machine.id, boot_id=tx.machine.boot_id, name=name, state="open")
    )


@atomic
def preserve_domain_in_session(tx: Transaction, name: str, domain_id: int, token: int) -> Any:
    session = _outgoing(tx, name)
    if session["state"] != "open":
        raise NotPermitted(f"session {name!r} is {session['state']}")
    return preserve_domain(tx, domain_id, token, session_id=session["id"])


@atomic
def preserve_device(tx: Transaction, name: str, bdf: str, token: int) -> Any:
    """Preserve a device's attachment in a session; its domain must be preserved in the same session."""
    session = _outgoing(tx, name)
    if session["state"] != "open":
        raise NotPermitted(f"session {name!r} is {session['state']}")
    dev = get_device(tx, bdf)
    if dev["domain_id"] is None or dev["boot_id"] != tx.machine.boot_id:
        raise InvalidArgument(f"device {dev['bdf']} is not attached to a domain of this boot")
    h = HandoverEntry
    dom_entry = tx.conn.execute(
        select(h.token, h.session_id).where(
            h.boot_id == tx.machine.boot_id, h.kind == "domain", h.domain_id == dev["domain_id"], LIVE
        )
    ).first()
    if dom_entry is None or dom_entry.session_id != session["id"]:
        raise InvalidArgument(
            f"device {dev['bdf']}'s domain {dev['domain_id']} is not preserved in session {name!r}: preserve it first"
        )
    if tx.conn.execute(select(h.id).where(h.boot_id == tx.machine.boot_id, h.device_id == dev["id"], LIVE)).first():
        raise AlreadyExists(f"device {dev['bdf']} is already preserved")
    if tx.conn.execute(select(h.id).where(h.boot_id == tx.machine.boot_id, h.token == token)).first():
        raise AlreadyExists(f"token {token:#x} is already used in this boot's handover")
    segment, bus, devfn = bdf_fields(dev["bdf"])
    version = tx.machine.profile.writes
    desc = _device_descriptor(
        version,
        segment=segment,
        bus=bus,
        devfn=devfn,
        did=dev["did"],
        domain_token=dom_entry.token,
        owner=dev["owner"] or "",
    )
    fields: dict[str, Any] = {
        "machine_id": tx.machine.id,
        "boot_id": tx.machine.boot_id,
        "token": token,
        "compatible": catalogue.compatible_of("device", version),
        "descriptor": dump_descriptor(desc),
        "kind": "device",
        "device_id": dev["id"],
        "session_id": session["id"],
        "abi_version": version,
    }
    tx.conn.execute(insert(HandoverEntry).values(**fields, **compute_digests(tx.conn, **fields)))
    return desc


def _device_descriptor(version: int, **fields: Any) -> Any:
    """The device descriptor of catalogue ``version`` (a user's version through converters from 2)."""
    if version == 1:
        return DeviceDescriptorV1(**fields)
    return catalogue.written_as(
        "device", version, DeviceDescriptorV2(**fields, dma_owner_token=dma_owner_token(fields["owner"]))
    )


def incoming_device_descriptor(tx: Transaction, raw: Any, version: int, token: int) -> Any:
    """A device descriptor of the previous boot as this boot's profile reads it (converted if need be)."""
    what = f"descriptor of device entry {token:#x}"
    path = read_path(tx.machine.profile, "device", version)
    if path is None:
        raise BadData(f"{what}: version {version}, which kernel profile {tx.machine.profile_name!r} cannot read")
    return catalogue.read_along("device", path, raw, what)


@atomic
def close_session(tx: Transaction, name: str) -> int:
    """Close an outgoing session before the seal: everything in it is unpreserved."""
    session = _outgoing(tx, name)
    if session["state"] != "open":
        raise NotPermitted(f"session {name!r} is {session['state']} and can no longer be closed")
    h = HandoverEntry
    entries = sorted(
        tx.conn.execute(select(h.id, h.token, h.kind).where(h.session_id == session["id"], LIVE)).all(),
        key=lambda e: (e.kind != "device", e.token),
    )
    for entry_id, token, kind in entries:  # devices first, then their domains
        if kind == "device":
            drop_entry(tx, entry_id)
        else:
            unpreserve_domain(tx, token)
    crashpoint("session_close")
    tx.conn.execute(delete(LuoSession).where(LuoSession.id == session["id"]))
    return len(entries)


def seal_sessions(tx: Transaction, entries: list[StoredEntry]) -> None:
    """At the seal: every open session is frozen and handed over; device attachments must be intact.

    ``entries``: the boot's handover entries, as ``read_entries`` gives them."""
    live = {e.token: e for e in entries if not e.deleted}
    for e in live.values():
        if e.kind != "device":
            continue
        desc = catalogue.parse_descriptor("device", e.abi_version, e.descriptor, f"descriptor of token {e.token:#x}")
        dev = tx.conn.execute(select(Device.domain_id, Device.did).where(Device.id == e.device_id)).first()
        dom_entry = live.get(desc.domain_token)
        if dev is None or dom_entry is None or (dev.domain_id, dev.did) != (dom_entry.domain_id, desc.did):
            from .boots import SealRefused

            raise SealRefused(f"token {e.token:#x}: the preserved device attachment changed")
    sessions: Table = LuoSession.__table__  # type: ignore[assignment]  # Core: compiled without the ORM layer
    tx.conn.execute(
        update(sessions)
        .where(sessions.c.boot_id == tx.machine.boot_id, sessions.c.state == "open")
        .values(state="sealed")
    )


# -- boot N+1 -----------------------------------------------------------------------------------
@atomic
@reads_stored_rows
def retrieve_session(tx: Transaction, name: str) -> SessionInfo:
    session = _incoming(tx, name)
    if session["state"] != "sealed":
        raise InvalidArgument(f"session {name!r} has already been retrieved ({session['state']})")
    tx.conn.execute(
        update(LuoSession)
        .where(LuoSession.id == session["id"])
        .values(state="retrieved", retrieved_boot_id=tx.machine.boot_id)
    )
    crashpoint("session_retrieve")
    return session_info(tx, session["id"])


def require_retrieved(tx: Transaction, session_id: int) -> None:
    """Objects of a session can be restored only once the session was retrieved in this boot."""
    s = LuoSession
    row = required(
        tx.conn.execute(
            select(s.name, s.state, s.retrieved_boot_id, s.finished_at.is_(None).label("unfinished")).where(
                s.id == session_id
            )
        ).first(),
        f"luo_session row {session_id}",
    )
    if not _possible_state(row.state, row.retrieved_boot_id is not None, not row.unfinished):
        retrieved = (
            "never retrieved" if row.retrieved_boot_id is None else f"retrieved in boot row {row.retrieved_boot_id}"
        )
        raise BadData(
            f"luo_session row {session_id} ({row.name!r}) is {row.state!r}, {retrieved} and "
            f"with{'out' if row.unfinished else ''} a finish time: that is not a possible state"
        )
    if row.state != "retrieved" or row.retrieved_boot_id != tx.machine.boot_id:
        raise NotPermitted(f"session {row.name!r} is {row.state}: retrieve it before restoring its objects")


def _possible_state(state: str, retrieved: bool, finished: bool) -> bool:
    """Retrieval is recorded exactly for retrieved and finished sessions, a finish time for finished ones."""
    if state not in SESSION_STATES or finished != (state == "finished"):
        return False
    return state == "discarded" or retrieved == (state in ("retrieved", "finished"))


def reattach_devices(tx: Transaction, session_id: int, domain_token: int, domain_id: int) -> list[str]:
    """After a domain's restore: its preserved devices now go through the restored domain."""
    h = HandoverEntry
    done = []
    for entry_id, token, desc_raw, device_id, old_domain, version in tx.conn.execute(
        select(
            h.id,
            h.token,
            h.descriptor,
            h.device_id,
            dom_entry_domain(h.boot_id, h.session_id, domain_token),
            h.abi_version,
        ).where(h.session_id == session_id, h.kind == "device", LIVE)
    ).all():
        desc = incoming_device_descriptor(tx, desc_raw, version, token)
        if desc.domain_token != domain_token:
            continue
        problems = preserved_device_mismatches(tx.conn, tx.machine.id, device_id, desc, old_domain)
        if problems:
            raise BadData(f"device entry {token:#x}: {problems[0]}")
        reattach_restored(tx, device_id, domain_id)
        tx.conn.execute(update(h).where(h.id == entry_id).values(restored_boot_id=tx.machine.boot_id))
        done.append(desc.bdf)
    return done


def dom_entry_domain(boot_id: Any, session_id: Any, token: int) -> Any:
    """SQL: the domain of the domain entry under ``token`` in the same boot and session."""
    d = HandoverEntry.__table__.alias("dom_entry")
    return (
        select(d.c.domain_id)
        .where(
            d.c.boot_id == boot_id,
            d.c.session_id == session_id,
            d.c.token == token,
            d.c.kind == "domain",
            d.c.flags.bitwise_and(catalogue.FLAG_DELETED) == 0,
        )
        .scalar_subquery()
    )


def preserved_device_mismatches(
    conn: Connection, machine_id: int, device_id: int | None, desc: Any, old_domain: int | None
) -> list[str]:
    """How a device row differs from the attachment its (not yet re-made) preserved entry describes:
    the same PCI address and owner, still on the preserved domain with the preserved DID."""
    dev = conn.execute(
        select(Device.bdf, Device.owner, Device.domain_id, Device.did).where(
            Device.id == device_id, Device.machine_id == machine_id
        )
    ).first()
    if dev is None:
        return [f"it names device row {device_id}, which does not exist"]
    if old_domain is None:
        return [f"its domain token {desc.domain_token:#x} names no domain entry of its session"]
    stored = {"bdf": dev.bdf, "owner": dev.owner or "", "domain": dev.domain_id, "did": dev.did}
    wanted = {"bdf": desc.bdf, "owner": desc.owner, "domain": old_domain, "did": desc.did}
    return [
        f"the device row's {k} is {stored[k]!r}, preserved as {wanted[k]!r}" for k in stored if stored[k] != wanted[k]
    ]


@atomic
@reads_stored_rows
def finish_session(tx: Transaction, name: str) -> FinishReport:
    """Complete a retrieved session: all objects must be able to finish, else EBUSY and nothing changes."""
    session = _incoming(tx, name)
    if session["state"] == "sealed":
        raise InvalidArgument(f"session {name!r} has not been retrieved")
    if session["state"] != "retrieved":
        raise InvalidArgument(f"session {name!r} is already {session['state']}")
    h = HandoverEntry
    entries = tx.conn.execute(
        select(h.token, h.kind, h.domain_id, h.device_id, h.restored_domain_id).where(h.session_id == session["id"])
    ).all()
    blocked = []
    for _token, kind, _domain_id, device_id, _restored in entries:
        if kind != "device":
            continue  # a domain can always finish: restored, or reported as never reclaimed
        dev = required(
            tx.conn.execute(select(Device.bdf, Device.boot_id, Device.domain_id).where(Device.id == device_id)).first(),
            f"device row {device_id}",
        )
        if dev.domain_id is not None and dev.boot_id != tx.machine.boot_id:
            blocked.append(dev.bdf)
    if blocked:
        raise Busy(
            f"session {name!r} cannot finish: device(s) {', '.join(blocked)} still DMA through the preserved "
            "tables (restore their domains first)"
        )
    reclaimed, never, devices, frames = [], [], [], 0
    prev = session["boot_id"]
    for token, kind, domain_id, device_id, restored in entries:
        if kind == "device":
            devices.append(
                required(
                    tx.conn.execute(select(Device.bdf).where(Device.id == device_id)).scalar(),
                    f"device row {device_id}",
                )
            )
        elif restored is not None:
            reclaimed.append(token)
        else:
            never.append(token)
            if domain_id is not None:
                frames += len(kho.preserved_by(tx, owner_tag(domain_id), prev))
    crashpoint("session_finish")
    tx.conn.execute(
        update(LuoSession)
        .where(LuoSession.id == session["id"])
        .values(state="finished", finished_at=dt.datetime.now(dt.UTC))
    )
    return FinishReport(
        session=name,
        domains_reclaimed=sorted(reclaimed),
        devices_reattached=sorted(devices),
        never_reclaimed=sorted(never),
        frames_never_reclaimed=frames,
    )


@reads_stored_rows
def session_info(tx: Transaction, session_id: int) -> SessionInfo:
    row = required(
        tx.conn.execute(
            select(LuoSession.name, LuoSession.state, Boot.number, LuoSession.retrieved_boot_id)
            .join(Boot, Boot.id == LuoSession.boot_id)
            .where(LuoSession.id == session_id)
        ).first(),
        f"luo_session row {session_id} or its boot",
    )
    objects = len(tx.conn.execute(select(HandoverEntry.id).where(HandoverEntry.session_id == session_id)).all())
    retrieved = None
    if row.retrieved_boot_id is not None:
        retrieved = required(
            tx.conn.execute(select(Boot.number).where(Boot.id == row.retrieved_boot_id)).scalar(),
            f"boot row {row.retrieved_boot_id} (luo_session row {session_id} was retrieved in it)",
        )
    return SessionInfo(name=row.name, boot=row.number, state=row.state, objects=objects, retrieved_in_boot=retrieved)


@reads_stored_rows
def list_sessions(tx: Transaction) -> list[SessionInfo]:
    ids = tx.conn.execute(
        select(LuoSession.id).where(LuoSession.machine_id == tx.machine.id).order_by(LuoSession.id)
    ).scalars()
    return [session_info(tx, i) for i in ids]


def on_boot_start(tx: Transaction, end_kind: str, prev_id: int) -> None:
    """Sessions older than the previous boot are gone; devices not handed over are detached."""
    mid = tx.machine.id
    keep_sessions = [prev_id] if end_kind == "liveupdate" else []
    tx.conn.execute(
        update(LuoSession)
        .where(
            LuoSession.machine_id == mid,
            LuoSession.state.in_(("open", "sealed", "retrieved")),
            LuoSession.boot_id.not_in(keep_sessions),
        )
        .values(state="discarded")
    )
    preserved_devices = select(HandoverEntry.device_id).where(
        HandoverEntry.boot_id == prev_id, HandoverEntry.device_id.is_not(None), LIVE
    )
    q = update(Device).where(Device.machine_id == mid)
    if end_kind == "liveupdate":
        q = q.where(Device.id.not_in(preserved_devices))
    tx.conn.execute(q.values(domain_id=None, did=None, boot_id=None))


__all__ = [
    "close_session",
    "create_session",
    "finish_session",
    "list_sessions",
    "preserve_device",
    "preserve_domain_in_session",
    "retrieve_session",
]
