"""What the API returns for display: pydantic models, dumped as-is by ``--json``."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainSerializer


class Report(BaseModel):
    model_config = ConfigDict(frozen=True)


class BootInfo(Report):
    number: int
    started_at: dt.datetime
    ended_at: dt.datetime | None = None
    end_kind: str | None = None
    #: the kernel profile the boot ran
    kernel_profile: str = "lu-v3"
    #: why the boot discarded the previous boot's handover (it booted as if cold)
    handover_discarded: str | None = None


class MachineStatus(Report):
    name: str
    mem_bytes: int
    page_size: int
    pages_allocated: int
    bytes_allocated: int
    boots: list[BootInfo]

    @property
    def current_boot(self) -> BootInfo | None:
        return self.boots[-1] if self.boots else None


class StoreStatus(Report):
    url: str
    revision: str
    machines: list[MachineStatus]


def _hex(v: int) -> str:
    return f"{v:#x}"


#: an address or bitmap: an int in Python, a "0x..." string in JSON
HexInt = Annotated[int, PlainSerializer(_hex, return_type=str, when_used="json")]


class DomainInfo(Report):
    id: int
    format: str
    state: str
    boot: int
    top_phys: HexInt | None
    top_level: int
    max_vasz_lg2: int
    #: VA width the current top decodes (grows with amdv1's dynamic top)
    range_vasz_lg2: int
    max_oasz_lg2: int
    sign_extend: bool
    features: list[str]
    pgsize_bitmap: HexInt
    frames: int


class TranslationInfo(Report):
    iova: HexInt
    phys: HexInt | None
    page_size: int
    level: int
    fault: str | None = None
    #: the leaf's permissions and attribute bits (None when the walk faulted or the engine answered)
    readable: bool | None = None
    writable: bool | None = None
    flags: list[str] | None = None


class SealReport(Report):
    boot: int
    domains: int
    frames: int
    pages_preserved: int
    #: the kernel profile that wrote the handover, and the kexec count it recorded
    kernel_profile: str = "lu-v5"
    kexec_count: int | None = 1
    #: the pre-flight against the next kernel's profile (``liveupdate --next``)
    next: Any = None


class HandoverEntryInfo(Report):
    token: HexInt
    compatible: str
    descriptor: dict[str, object]
    #: the domain in the boot that preserved it
    domain: int | None
    #: the domain it was restored as, in the next boot
    restored_domain: int | None
    #: 'domain' or 'device'
    kind: str = "domain"
    state: str
    frames: int
    unclaimed_frames: int


class HandoverReport(Report):
    boot: int
    incoming: list[HandoverEntryInfo]
    outgoing: list[HandoverEntryInfo]
    #: frames the previous boot preserved that this boot has not re-claimed
    leaked_frames: int
    #: this boot's kernel profile
    kernel_profile: str = "lu-v5"
    #: why this boot discarded the previous boot's handover (a KHO mismatch: it booted as if cold)
    discarded: str | None = None
    #: the previous boot's handover records (KHO root, kexec-metadata, LUO header, FLBs), as JSON
    incoming_records: dict[str, Any] | None = None


class DeviceInfo(Report):
    bdf: str
    owner: str | None
    domain: int | None
    did: int | None
    #: detached, attached, preserved, or preserved (previous boot)
    attachment: str
    domain_state: str | None


class SessionInfo(Report):
    name: str
    boot: int
    state: str
    objects: int
    retrieved_in_boot: int | None = None


class FinishReport(Report):
    session: str
    domains_reclaimed: list[HexInt]
    devices_reattached: list[str]
    #: tokens of domains never restored: their frames stay reserved until the next boot
    never_reclaimed: list[HexInt]
    frames_never_reclaimed: int


class FsckReport(Report):
    machine: str
    boot: int
    domains_checked: int
    problems: list[str]
    ok: bool


class MigrationReport(BaseModel):
    """What ``db upgrade``/``downgrade`` did (or, offline, the SQL it would run)."""

    url: str
    action: str
    from_revision: str | None
    to_revision: str | None
    #: the revisions run, in the order they ran
    revisions: list[str]
    #: the backup copy written before, if any
    backup: str | None = None
    #: why no backup was taken, when one could not be
    backup_note: str | None = None
    #: what the downgrade dropped (forced), one line per kind
    dropped: list[str] = []
    #: offline mode: the SQL script
    sql: str | None = None
