"""Ending a boot with a live update, and starting the next one.

``liveupdate`` seals the current boot's handover after checking every
preserved domain, then ends the boot: the process's Machine object refuses
everything afterwards. The next process to open the machine starts boot N+1,
where memory boot N did not preserve is free again and the handover lists what
can be restored.
"""

from __future__ import annotations

from sqlalchemy import delete, select, update

from .. import mappings
from ..abi import catalogue
from ..abi.profiles import get_profile
from ..abi.records import records_json
from ..crash import crashpoint
from ..db.models import Boot, HandoverEntry, Page, Preservation
from ..db.models import Domain as DomainRow
from ..db.rows import reads_stored_rows
from ..domains import get_domain
from ..errors import BadData
from ..machine import BOOT_START_HOOKS, Machine, Transaction
from ..memory import PAGE_SHIFT
from ..reports import HandoverEntryInfo, HandoverReport, SealReport
from . import kho
from .digests import owner_tag
from .handover_abi import PreflightRefused, judge_incoming, preflight, write_seal_records
from .integrity import LIVE, StoredEntry, frames_by_owner, handover_problems, read_entries, seal_handover
from .iommu import descriptor_mismatches, incoming_entries, preservation_problems
from .sessions import on_boot_start as on_session_boot_start
from .sessions import seal_sessions


class SealRefused(BadData):
    """A preserved domain is inconsistent: the live update is cancelled, nothing changed."""


def check_preserved(tx: Transaction) -> tuple[int, int]:
    """Check every domain preserved in this boot; returns (domains, frames).

    Frames reachable from the top must be exactly the frames preserved for the
    domain, with the bytes they had when preserved.
    """
    mid, boot_id = tx.machine.id, tx.machine.boot_id
    return _check_preserved(tx, read_entries(tx.conn, mid, boot_id), frames_by_owner(tx.conn, mid, boot_id))


def _check_preserved(
    tx: Transaction, entries: list[StoredEntry], kept: dict[str, list[tuple[int, int, str]]]
) -> tuple[int, int]:
    """``check_preserved`` over the boot's handover ``entries`` and preservation records ``kept``, as read."""
    domain_entries = [e for e in entries if e.kind == "domain" and not e.deleted]
    frames = 0
    for e in domain_entries:
        where, domain_id = f"token {e.token:#x}", e.domain_id
        desc = catalogue.parse_descriptor("domain", e.abi_version, e.descriptor, f"descriptor of {where}")
        if domain_id is None:
            raise SealRefused(f"{where}: the entry names no domain")
        dom = get_domain(tx, domain_id)
        if dom.state != "preserved":
            raise SealRefused(f"{where}: domain {domain_id} is {dom.state}, not preserved")
        pt = dom.pt
        mismatches = descriptor_mismatches(tx.conn, tx.machine.id, desc, domain_id)
        if mismatches:
            raise SealRefused(f"{where}: the descriptor no longer matches domain {domain_id}: {mismatches[0]}")
        try:
            reachable = {phys >> PAGE_SHIFT for phys in pt.collect_tables()}
        except BadData as e:
            raise SealRefused(f"{where}: domain {domain_id}: {e}") from e
        problems = preservation_problems(tx, domain_id, reachable, tx.machine.boot_id, kept)
        if problems:
            raise SealRefused(f"{where}: {problems[0]}")
        frames += len(reachable)
    # what no check above looks at (tokens, sessions, devices, preservation records) must be as written
    problems = handover_problems(tx.conn, tx.machine.id, tx.machine.boot_id, sealed=False, entries=entries, frames=kept)
    if problems:
        raise SealRefused(problems[0])
    return len(domain_entries), frames


def liveupdate(machine: Machine, next_profile: str | None = None) -> SealReport:
    """Seal the handover and end the boot (the kexec). A failed check changes nothing.

    With ``next_profile``, first check that a kernel of that profile could read what is preserved
    (``preflight``): if it could not, ``PreflightRefused`` (carrying the report) and nothing changes."""
    with machine.transaction() as tx:
        report = None
        if next_profile is not None:
            report = preflight(tx, get_profile(next_profile))
            if not report.readable:
                raise PreflightRefused(report)
        # read once: the checks, the records and the seal see the same rows (sealing sessions changes neither)
        entries = read_entries(tx.conn, machine.id, machine.boot_id)
        kept = frames_by_owner(tx.conn, machine.id, machine.boot_id)
        domains, frames = _check_preserved(tx, entries, kept)
        seal_sessions(tx, entries)
        records = write_seal_records(tx, live_entries=sum(not e.deleted for e in entries))
        seal_handover(tx.conn, machine.boot_id, entries, kept, records)
        crashpoint("seal")
        machine.end_boot(tx, "liveupdate")
    return SealReport(
        boot=machine.boot_number,
        domains=domains,
        frames=frames,
        pages_preserved=sum(len(own) for own in kept.values()),
        kernel_profile=machine.profile_name,
        kexec_count=records.kexec.kexec_count if records is not None and records.kexec is not None else None,
        next=report,
    )


def _on_boot_start(tx: Transaction, prev_number: int, end_kind: str) -> None:
    """Boot N+1 after a live update: what boot N did not preserve is free memory.

    The handover is first judged by this boot's kernel profile: one it cannot read panics (nothing
    starts), one whose KHO root it does not read is discarded and the boot starts as if cold."""
    prev_id, _, _ = kho.previous_boot(tx)
    mid = tx.machine.id
    if end_kind == "liveupdate":
        discarded = judge_incoming(tx, prev_id, prev_number)
        if discarded is not None:
            tx.conn.execute(update(Boot).where(Boot.id == tx.machine.boot_id).values(handover_discarded=discarded))
            _as_if_cold(tx)
            on_session_boot_start(tx, "cold", prev_id)
            return
    on_session_boot_start(tx, end_kind, prev_id)
    if end_kind != "liveupdate":
        return  # a cold reboot freed all memory when it happened
    kept = select(Preservation.pfn).where(Preservation.machine_id == mid, Preservation.boot_id == prev_id)
    tx.conn.execute(delete(Page).where(Page.machine_id == mid, Page.pfn.not_in(kept)))
    handed_over = select(HandoverEntry.domain_id).where(
        HandoverEntry.boot_id == prev_id, HandoverEntry.domain_id.is_not(None), LIVE
    )
    tx.conn.execute(
        update(DomainRow)
        .where(DomainRow.machine_id == mid, DomainRow.state != "freed", DomainRow.id.not_in(handed_over))
        .values(state="freed", top_phys=None)
    )
    mappings.drop_freed(tx)
    crashpoint("boot_start_hook")


def _as_if_cold(tx: Transaction) -> None:
    """A discarded handover: all memory is free and every domain is gone, as after a cold reboot."""
    mid = tx.machine.id
    tx.conn.execute(delete(Page).where(Page.machine_id == mid))
    tx.conn.execute(
        update(DomainRow)
        .where(DomainRow.machine_id == mid, DomainRow.state != "freed")
        .values(state="freed", top_phys=None)
    )
    mappings.drop_freed(tx)


BOOT_START_HOOKS.append(_on_boot_start)


def _json_object(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise BadData(f"{where}: the stored descriptor is not a JSON object")
    return value


@reads_stored_rows
def handover_report(tx: Transaction) -> HandoverReport:
    """What the previous boot handed over (and what became of it), and what this boot hands over so far."""
    incoming = []
    leaked_frames = 0
    try:
        prev = kho.incoming_boot_id(tx)
    except Exception:
        prev = None
    for e in incoming_entries(tx):
        frames = (
            kho.preserved_by(tx, owner_tag(e.domain_id), prev)
            if e.kind == "domain" and e.domain_id is not None and prev
            else {}
        )
        unclaimed = sum(1 for r in frames.values() if r.restored_boot_id is None)
        leaked_frames += unclaimed
        incoming.append(
            HandoverEntryInfo(
                token=e.token,
                compatible=e.compatible,
                descriptor=_json_object(e.descriptor, e.where),
                domain=e.domain_id,
                restored_domain=e.restored_domain_id,
                kind=e.kind,
                state=("restored" if e.kind == "domain" else "re-attached")
                if e.restored_boot_id is not None
                else "restorable",
                frames=len(frames),
                unclaimed_frames=unclaimed,
            )
        )
    h = HandoverEntry
    outgoing = []
    for entry_id, token, compatible, desc, domain_id, kind in tx.conn.execute(
        select(h.id, h.token, h.compatible, h.descriptor, h.domain_id, h.kind)
        .where(h.boot_id == tx.machine.boot_id, LIVE)
        .order_by(h.token)
    ):
        frames = kho.preserved_by(tx, owner_tag(domain_id)) if kind == "domain" and domain_id is not None else {}
        outgoing.append(
            HandoverEntryInfo(
                token=token,
                compatible=compatible,
                descriptor=_json_object(desc, f"handover entry {token:#x} (handover_entry row {entry_id})"),
                domain=domain_id,
                restored_domain=None,
                kind=kind,
                state="preserved",
                frames=len(frames),
                unclaimed_frames=0,
            )
        )
    discarded = tx.conn.execute(select(Boot.handover_discarded).where(Boot.id == tx.machine.boot_id)).scalar()
    return HandoverReport(
        boot=tx.machine.boot_number,
        incoming=incoming,
        outgoing=outgoing,
        leaked_frames=leaked_frames,
        kernel_profile=tx.machine.profile_name,
        discarded=discarded,
        incoming_records=records_json(tx.conn, prev) if prev else None,
    )
