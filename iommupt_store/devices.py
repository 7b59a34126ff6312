"""PCI devices and their attachments: which domain a device's DMA goes through.

A device is attached to a domain with a hardware domain id (VT-d's DID; one
per domain, shared by the devices attached to it) and has a DMA owner (the
VFIO/iommufd user), the only one allowed to attach or replace it. After a live
update a preserved device keeps translating through the preserved tables with
its preserved DID, which stays reserved: no new domain gets it.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import and_, insert, select, update

from .crash import crashpoint
from .db.models import Device, HandoverEntry
from .db.models import Domain as DomainRow
from .db.rows import reads_stored_rows
from .domains import get_domain, hardware_walker
from .errors import Busy, InvalidArgument, NotFound, NotPermitted
from .machine import Transaction, atomic
from .names import check_owner, describe_owner
from .pagetable.walker import HardwareWalker
from .reports import DeviceInfo

MAX_DID = 65535
_BDF = re.compile(r"^(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


def bdf_fields(text: str) -> tuple[int, int, int]:
    """``[segment:]bus:device.function`` as (segment, bus, devfn), devfn = device << 3 | function."""
    m = _BDF.match(text.strip())
    if not m or int(m.group(3), 16) > 0x1F:
        raise InvalidArgument(f"{text!r} is not a PCI address (segment:bus:device.function, e.g. 0000:3b:00.1)")
    return int(m.group(1) or "0", 16), int(m.group(2), 16), int(m.group(3), 16) << 3 | int(m.group(4))


def parse_bdf(text: str) -> str:
    """Normalise ``[segment:]bus:device.function`` to ``ssss:bb:dd.f``."""
    seg, bus, devfn = bdf_fields(text)
    return f"{seg:04x}:{bus:02x}:{devfn >> 3:02x}.{devfn & 7}"


def _row(tx: Transaction, bdf: str) -> Any:
    return (
        tx.conn.execute(select(Device.__table__).where(Device.machine_id == tx.machine.id, Device.bdf == bdf))
        .mappings()
        .first()
    )


@reads_stored_rows
def get_device(tx: Transaction, bdf: str) -> Any:
    row = _row(tx, parse_bdf(bdf))
    if row is None:
        raise NotFound(f"no device {parse_bdf(bdf)} on machine {tx.machine.name!r}")
    return row


def preserved_in_this_boot(tx: Transaction, device_id: int) -> bool:
    return (
        tx.conn.execute(
            select(HandoverEntry.id).where(
                HandoverEntry.boot_id == tx.machine.boot_id,
                HandoverEntry.device_id == device_id,
                HandoverEntry.flags.bitwise_and(1) == 0,  # not a DELETED slot
            )
        ).first()
        is not None
    )


def reserved_dids(tx: Transaction) -> set[int]:
    """DIDs of attachments an earlier boot preserved and this boot has not yet re-made."""
    rows = tx.conn.execute(
        select(Device.did).where(
            Device.machine_id == tx.machine.id, Device.did.is_not(None), Device.boot_id != tx.machine.boot_id
        )
    )
    return {d for (d,) in rows if d is not None}


def _did_owner(tx: Transaction, did: int) -> int | None:
    row = tx.conn.execute(
        select(Device.domain_id).where(Device.machine_id == tx.machine.id, Device.did == did).limit(1)
    ).first()
    return None if row is None else row[0]


def _domain_did(tx: Transaction, domain_id: int) -> int | None:
    row = tx.conn.execute(
        select(Device.did).where(Device.machine_id == tx.machine.id, Device.domain_id == domain_id).limit(1)
    ).first()
    return None if row is None else row[0]


def _pick_did(tx: Transaction, domain_id: int, did: int | None) -> int:
    current = _domain_did(tx, domain_id)
    reserved = reserved_dids(tx)
    if did is not None:
        if not 1 <= did <= MAX_DID:
            raise InvalidArgument(f"domain id {did} is outside 1..{MAX_DID}")
        if did in reserved:
            raise Busy(f"domain id {did} is reserved for a device preserved across the live update")
        if current is not None and current != did:
            raise InvalidArgument(f"domain {domain_id} already has domain id {current}")
        user = _did_owner(tx, did)
        if user is not None and user != domain_id:
            raise Busy(f"domain id {did} is in use by domain {user}")
        return did
    if current is not None:
        return current
    used = {d for (d,) in tx.conn.execute(select(Device.did).where(Device.machine_id == tx.machine.id))}
    for candidate in range(1, MAX_DID + 1):
        if candidate not in used:
            return candidate
    raise Busy("every domain id is in use")


@atomic
def attach(tx: Transaction, bdf: str, domain_id: int, *, owner: str | None = None, did: int | None = None) -> None:
    """Attach the device (created on first use) to a live domain."""
    bdf = parse_bdf(bdf)
    if owner is not None:
        check_owner(owner)
    row = _row(tx, bdf)
    if row is not None:
        if row["owner"] and owner != row["owner"]:
            raise NotPermitted(f"device {bdf} is owned by {row['owner']!r}, not {describe_owner(owner)}")
        if preserved_in_this_boot(tx, row["id"]):
            raise Busy(f"device {bdf} is preserved for a live update: its attachment cannot change")
        if row["domain_id"] is not None and row["boot_id"] != tx.machine.boot_id:
            raise Busy(f"device {bdf} still DMAs through its preserved attachment: restore, then 'device replace'")
        if row["domain_id"] is not None and get_domain(tx, row["domain_id"]).state == "restored":
            # moving off a restored domain is the replace flow, which also frees that domain
            raise Busy(f"device {bdf} is on restored domain {row['domain_id']}: use 'device replace'")
    _attach_row(tx, bdf, row, domain_id, owner, did)


def _attach_row(tx: Transaction, bdf: str, row: Any, domain_id: int, owner: str | None, did: int | None) -> None:
    """Point the device (``row``, or a new one) at a live domain of this boot with a DID."""
    dom = get_domain(tx, domain_id)
    if dom.state != "live" or dom.boot_id != tx.machine.boot_id:
        raise NotPermitted(f"domain {domain_id} is {dom.state}: devices attach only to live domains of this boot")
    chosen = _pick_did(tx, domain_id, did)
    values = {"domain_id": domain_id, "did": chosen, "boot_id": tx.machine.boot_id}
    if row is None:
        tx.conn.execute(insert(Device).values(machine_id=tx.machine.id, bdf=bdf, owner=owner, **values))
    else:
        tx.conn.execute(update(Device).where(Device.id == row["id"]).values(owner=row["owner"] or owner, **values))


@atomic
def replace(tx: Transaction, bdf: str, domain_id: int, *, owner: str | None) -> int | None:
    """Move a device from its restored domain to a new one (the "replace" flow).

    Only the device's preserving owner may; the restored domain is freed once
    no device is attached to it. Returns the freed domain's id, if any.
    """
    row = get_device(tx, bdf)
    bdf = row["bdf"]
    if owner != row["owner"]:
        who = describe_owner(owner)
        raise NotPermitted(f"device {bdf} is owned by {row['owner']!r}: {who} may not replace its domain")
    old_id = row["domain_id"]
    if old_id is None:
        raise InvalidArgument(f"device {bdf} is not attached: use 'device attach'")
    old = get_domain(tx, old_id)
    if old.state != "restored" or row["boot_id"] != tx.machine.boot_id:
        raise InvalidArgument(
            f"device {bdf} is attached to domain {old_id} ({old.state}); replace moves a device off a restored "
            "domain after it was re-attached"
        )
    # attach while the restored domain's DID is still held, so the new domain gets another one
    _attach_row(tx, bdf, row, domain_id, owner, None)
    crashpoint("device_replace")
    if _domain_did(tx, old_id) is None:
        old.free()
        return int(old_id)
    return None


@atomic
def detach(tx: Transaction, bdf: str, *, owner: str | None) -> None:
    """Detach the device (its DMA is blocked); only its owner may, and not while preserved."""
    row = get_device(tx, bdf)
    if row["owner"] and owner != row["owner"]:
        raise NotPermitted(f"device {row['bdf']} is owned by {row['owner']!r}, not {describe_owner(owner)}")
    if preserved_in_this_boot(tx, row["id"]):
        raise Busy(f"device {row['bdf']} is preserved for a live update: its attachment cannot change")
    if row["domain_id"] is not None and row["boot_id"] != tx.machine.boot_id:
        raise Busy(f"device {row['bdf']} still DMAs through its preserved attachment: restore its domain first")
    tx.conn.execute(update(Device).where(Device.id == row["id"]).values(domain_id=None, did=None, boot_id=None))


def reattach_restored(tx: Transaction, device_id: int, domain_id: int) -> None:
    """Point a preserved device at its restored domain, keeping the preserved DID."""
    tx.conn.execute(
        update(Device).where(Device.id == device_id).values(domain_id=domain_id, boot_id=tx.machine.boot_id)
    )


@reads_stored_rows
def dma_walker(tx: Transaction, bdf: str) -> HardwareWalker:
    """What the device's DMA sees: a hardware walker over its current attachment."""
    row = get_device(tx, bdf)
    if row["domain_id"] is None:
        raise NotFound(f"device {row['bdf']} is not attached: its DMA is blocked")
    return hardware_walker(tx, row["domain_id"])


@reads_stored_rows
def list_devices(tx: Transaction) -> list[DeviceInfo]:
    tx.flush()  # domain states changed in this transaction
    d, dom = Device, DomainRow
    rows = tx.conn.execute(
        select(d.bdf, d.owner, d.domain_id, d.did, d.boot_id, d.id, dom.state)
        .select_from(d.__table__.outerjoin(dom.__table__, and_(dom.id == d.domain_id)))
        .where(d.machine_id == tx.machine.id)
        .order_by(d.bdf)
    )
    out = []
    for bdf, owner, domain_id, did, boot_id, dev_id, state in rows:
        if domain_id is None:
            attachment = "detached"
        elif boot_id != tx.machine.boot_id:
            attachment = "preserved (previous boot)"
        elif preserved_in_this_boot(tx, dev_id):
            attachment = "preserved"
        else:
            attachment = "attached"
        out.append(
            DeviceInfo(bdf=bdf, owner=owner, domain=domain_id, did=did, attachment=attachment, domain_state=state)
        )
    return out
