"""The handover's ABI in a running machine: what the seal records, what the next boot makes of it.

The seal records the KHO root (the writer's KHO compatible and profile), the
kexec-metadata the real kernel writes (previous release = the writer's
release, kexec count = the previous count + 1) and the LUO header with the
IOMMU FLB. At the start of the next boot, the attaching profile judges that
handover (``abi/compat.py``): a KHO mismatch discards it (a cold boot), a LUO
or IOMMU mismatch is the kernel's panic, which we model as a refusal to start
the boot that changes nothing.
"""

from __future__ import annotations

import errno as _errno

from sqlalchemy import Connection, func, select

from ..abi.compat import CompatReport, WrittenAbi, judge
from ..abi.profiles import KernelProfile, get_profile
from ..abi.records import KexecMetadata, KhoRootRecord, LuoFlbRecord, LuoHeader, read_records, write_records
from ..db.models import Boot, HandoverEntry
from ..errors import BadData, IommuptError
from ..machine import Transaction
from .integrity import LIVE, verify_handover


class HandoverPanic(BadData):
    """The next kernel cannot read the handover (LUO or IOMMU mismatch): the real kernel panics.
    Boot N+1 is not started and nothing changes."""


class PreflightRefused(IommuptError):
    """``liveupdate --next``: the next kernel could not read this handover; nothing was sealed."""

    errno = _errno.ENOEXEC  # the next kernel's exec would lose or panic on it

    def __init__(self, report: CompatReport) -> None:
        super().__init__(
            f"refusing to seal: a {report.to_profile} kernel could not read this handover "
            f"({report.outcome}; {report.problem})"
        )
        self.report = report


def written_abi(conn: Connection, boot_id: int) -> WrittenAbi:
    """The ABI of the handover ``boot_id`` wrote (or is writing): its KHO root as recorded at the seal
    (for a boot sealed before the records existed, its profile's), and its live entries' versions."""
    profile_name = str(conn.execute(select(Boot.kernel_profile).where(Boot.id == boot_id)).scalar())
    rec = read_records(conn, boot_id)
    if rec is not None:
        kho, luo = rec.compatible, rec.luo.compatible if rec.luo else ""
        writer = rec.writer_profile or profile_name
    else:
        p = get_profile(profile_name)
        kho, luo, writer = p.kho, p.luo, p.name
    h = HandoverEntry
    versions: dict[str, dict[int, int | None]] = {}
    for kind, version, n in conn.execute(
        select(h.kind, h.abi_version, func.count()).where(h.boot_id == boot_id, LIVE).group_by(h.kind, h.abi_version)
    ):
        versions.setdefault(kind, {})[version] = n
    return WrittenAbi(writer, kho, luo, versions, counted=True)


def preflight(tx: Transaction, to: KernelProfile) -> CompatReport:
    """What a kernel of profile ``to`` would make of what this boot has preserved so far, once sealed."""
    p = tx.machine.profile
    w = written_abi(tx.conn, tx.machine.boot_id)
    w.kho, w.luo, w.writer = p.kho, p.luo, p.name  # what the seal will write
    return judge(w, to)


def kexec_count_before(tx: Transaction) -> int:
    """The kexec count this boot inherited: the previous handover's, if this boot read it; else 0."""
    b, n = Boot.__table__.c, tx.machine.boot_number  # Core columns: compiled without the ORM layer
    boots = {
        r.number: r
        for r in tx.conn.execute(
            select(b.id, b.number, b.end_kind, b.handover_discarded).where(
                b.machine_id == tx.machine.id, b.number.between(n - 1, n)
            )
        ).all()
    }
    prev = boots.get(n - 1)
    if prev is None or prev.end_kind != "liveupdate" or boots[n].handover_discarded is not None:
        return 0
    rec = read_records(tx.conn, prev.id)
    return rec.kexec.kexec_count if rec is not None and rec.kexec is not None else 0


def write_seal_records(tx: Transaction, live_entries: int) -> KhoRootRecord | None:
    """Record this boot's KHO root, kexec-metadata, LUO header and IOMMU FLB (counting the boot's
    ``live_entries`` handover entries); returns what was written (None for a profile whose kernel writes
    no kexec-metadata: its handover is stored as before)."""
    p = tx.machine.profile
    if not p.kexec_metadata:
        return None
    count = kexec_count_before(tx) + 1
    rec = KhoRootRecord(
        compatible=p.kho,
        writer_profile=p.name,
        kexec=KexecMetadata(previous_release=p.release, kexec_count=count),
        luo=LuoHeader(compatible=p.luo, liveupdate_num=count),
        flbs=[LuoFlbRecord(name=p.iommu, data=0, count=live_entries)],
    )
    write_records(tx.conn, tx.machine.id, tx.machine.boot_id, rec)
    return rec


def judge_incoming(tx: Transaction, prev_id: int, prev_number: int) -> str | None:
    """At the start of boot N+1: the reason to discard the previous handover (a KHO mismatch), or None
    when it is readable. A LUO or IOMMU mismatch raises ``HandoverPanic``."""
    report = judge(written_abi(tx.conn, prev_id), tx.machine.profile)
    if not report.readable:
        # act on a verdict only if the records it rests on are the ones sealed (an edit is bad data)
        verify_handover(tx.conn, tx.machine.id, prev_id)
    if report.outcome == "cold boot":
        return report.problem
    if report.outcome == "panic":
        raise HandoverPanic(
            f"kernel profile {report.to_profile!r} cannot read the handover of boot {prev_number} "
            f"(written by {report.from_profile!r}): {report.problem}; boot {prev_number + 1} was not started and "
            f"nothing changed: attach with a profile that reads it (see 'iommupt-store compat "
            f"{report.from_profile} PROFILE')"
        )
    return None
