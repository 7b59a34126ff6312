"""The main job: a full live update across two real processes.

Process A builds a domain of every format and configuration, maps a mix of
page sizes, snapshots what the hardware walker sees, preserves every domain
and seals the boot (``liveupdate``), then exits: the kexec. Process B opens
the machine (boot N+1), checks DMA continuity through the preserved tables
before restoring anything, restores every domain, verifies every translation
of it (``verify_domain``) against what A mapped, frees them and checks that no
frame is left. Nothing crosses between the two but
database rows (and the snapshot A took, which only the checker reads).

Run as ``iommupt-store demo``; the children are ``python -m iommupt_store.demo``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from .db.models import (
    Boot,
    Device,
    Domain,
    HandoverEntry,
    KhoRoot,
    KhoSubnode,
    LuoFile,
    LuoFlb,
    LuoSession,
    Page,
    Preservation,
)
from .db.models import Machine as MachineRow
from .devices import attach, detach, dma_walker, replace
from .domains import domain_alloc, frame_counts, get_domain, hardware_walker
from .errors import IommuptError
from .liveupdate import handover_report, liveupdate, restore_domain
from .liveupdate.sessions import (
    create_session,
    finish_session,
    preserve_device,
    preserve_domain_in_session,
    retrieve_session,
)
from .machine import Transaction
from .pagetable.walker import HardwareWalker
from .reports import Report
from .store import Store
from .verify import ExpectedRun, verify_domain

DEMO_MACHINE = "demo"
MEM_BYTES = 64 << 30
SESSION = "demo-vmm"
OWNER = "vfio-demo"


@dataclass(frozen=True)
class DemoDomain:
    label: str
    format: str
    options: dict[str, Any]
    #: (iova, paddr, length)
    maps: tuple[tuple[int, int, int], ...]


_MIXED = (0x3FE400000, 0x3FE400000, 0xC2200000)  # 14x2M + 3x1G + 3x2M, as KUnit test_mixed
_SMALL = (0x40000000, 0x80001000, 4 << 20)  # 1024 4K pages (paddr only 4K aligned)
PLAN: tuple[DemoDomain, ...] = (
    DemoDomain(
        "x86_64 4-level, sign-extended",
        "x86_64",
        {"top_level": 3, "vasz": 48},
        (_SMALL, _MIXED, (0xFFFF800000000000, 0x200000, 8 << 20)),
    ),
    DemoDomain("x86_64 5-level", "x86_64", {"top_level": 4, "vasz": 57, "features": []}, (_SMALL, _MIXED)),
    DemoDomain(
        "amdv1, dynamic top grown to 6 levels",
        "amdv1",
        {"top_level": 2},
        (_SMALL, (0x10000, 0x10000, 0x30000), (1 << 60, 0x40000000, 1 << 30)),
    ),
    DemoDomain(
        "vtdss 3-level, DMA-incoherent",
        "vtdss",
        {"top_level": 2, "vasz": 39, "features": ["DMA_INCOHERENT", "VTDSS_FORCE_COHERENCE"]},
        (_SMALL, _MIXED),
    ),
    DemoDomain(
        "riscv Sv39 with Svnapot 64K",
        "riscv",
        {"vasz": 39, "features": ["SIGN_EXTEND", "RISCV_SVNAPOT_64K"]},
        (_SMALL, (0x50000000, 0x90000000, 1 << 20), (0xFFFFFFC000000000, 0x10000000, 2 << 20)),
    ),
    DemoDomain("riscv Sv48", "riscv", {"vasz": 48}, (_SMALL, _MIXED)),
)


class PhaseResult(Report):
    phase: str
    boot: int
    seconds: float
    domains: int
    frames: int
    translations_checked: int
    details: dict[str, Any]


class DemoSummary(Report):
    db: str
    machine: str
    formats: list[str]
    frames_preserved: int
    frames_reclaimed: int
    frames_leaked: int
    frames_left_after_free: int
    translations_checked: int
    session: str
    devices_preserved: int
    devices_reattached: int
    seconds: dict[str, float]
    ok: bool


def _leaves(w: HardwareWalker) -> list[list[int]]:
    return [[leaf.iova, leaf.phys, leaf.size] for leaf in w.leaves()]


def _check(w: HardwareWalker, expected: list[list[int]], where: str) -> int:
    """Leaves must be identical; then translate each leaf's first and last byte."""
    got = _leaves(w)
    if got != expected:
        raise AssertionError(f"{where}: the hardware walker sees {len(got)} leaves, expected {len(expected)}")
    checked = 0
    for iova, phys, size in expected:
        for off in (0, size - 1):
            t = w.translate(iova + off)
            if t.phys != phys + off:
                raise AssertionError(f"{where}: {iova + off:#x} -> {t.phys}, expected {phys + off:#x}")
            checked += 1
    return checked


def _verified(tx: Transaction, domain_id: int, maps: Iterable[tuple[int, int, int] | list[int]], where: str) -> int:
    """Every translation of the domain must be exactly the planned maps; returns how many (4 KiB) there are."""
    expect = [ExpectedRun(iova=iova, phys=pa, length=length) for iova, pa, length in sorted(map(tuple, maps))]
    report = verify_domain(tx, domain_id, expect)
    if not report.ok:
        d = report.differences[0]
        raise AssertionError(
            f"{where}: {report.differences_total} differing run(s), the first {d.kind} at {d.iova:#x} (+{d.length:#x})"
        )
    return report.summary.translations


def reset_machine(store: Store, name: str) -> None:
    """Drop the machine and everything it holds, then create it again."""
    with store.writer.begin() as conn:
        mid = conn.execute(select(MachineRow.id).where(MachineRow.name == name)).scalar()
        if mid is not None:
            records = (LuoFile, LuoFlb, KhoSubnode, KhoRoot)
            for table in (*records, HandoverEntry, Device, LuoSession, Preservation, Page, Domain, Boot):
                conn.execute(delete(table).where(table.machine_id == mid))
            conn.execute(delete(MachineRow).where(MachineRow.id == mid))
    store.create_machine(name, MEM_BYTES)


def build_and_preserve(db: str, machine_name: str, snapshot: Path) -> PhaseResult:
    """Process A: build, snapshot, preserve, seal."""
    t0 = time.perf_counter()
    store = Store(db)
    machine = store.machine(machine_name)
    snap: dict[str, Any] = {}
    frames = checked = 0
    with machine.transaction() as tx:
        create_session(tx, SESSION)
        for i, plan in enumerate(PLAN):
            dom = domain_alloc(tx, plan.format, **plan.options)
            for iova, pa, length in plan.maps:
                dom.map_range(iova, pa, length)
            token = 0x1000 + i
            bdf = f"0000:{i + 1:02x}:00.0"
            attach(tx, bdf, dom.id, owner=OWNER)
            preserve_domain_in_session(tx, SESSION, dom.id, token)
            preserve_device(tx, SESSION, bdf, 0x2000 + i)
            checked += _verified(tx, dom.id, plan.maps, f"{plan.label}, before the seal")
            leaves = _leaves(hardware_walker(tx, dom.id))
            n = frame_counts(tx)[dom.id]
            frames += n
            snap[str(token)] = {
                "label": plan.label,
                "domain": dom.id,
                "frames": n,
                "leaves": leaves,
                "maps": plan.maps,
                "bdf": bdf,
            }
    boot = machine.boot_number
    report = liveupdate(machine)
    snapshot.write_text(json.dumps(snap))
    return PhaseResult(
        phase="build+preserve+seal",
        boot=boot,
        seconds=time.perf_counter() - t0,
        domains=report.domains,
        frames=report.frames,
        translations_checked=checked,
        details={"domains": {k: v["label"] for k, v in snap.items()}, "session": SESSION, "devices": len(snap)},
    )


def restore_and_verify(db: str, machine_name: str, snapshot: Path) -> PhaseResult:
    """Process B: continuity before restore, restore, verify, free, leak check."""
    t0 = time.perf_counter()
    snap = json.loads(snapshot.read_text())
    store = Store(db)
    machine = store.machine(machine_name)
    checked = reclaimed = 0
    with machine.transaction() as tx:
        for entry in snap.values():
            # DMA never stopped: each device still translates through the preserved tables
            checked += _check(dma_walker(tx, entry["bdf"]), entry["leaves"], f"{entry['label']}, before restore")
        retrieve_session(tx, SESSION)
        for token, entry in snap.items():
            dom = restore_domain(tx, int(token))  # re-attaches the device, with its preserved domain id
            checked += _verified(tx, dom.id, entry["maps"], f"{entry['label']}, after restore")
            entry["restored"] = dom.id
            reclaimed += len(dom.pt.collect_tables())
        leaked = handover_report(tx).leaked_frames
        for entry in snap.values():
            # the VMM moves each device to a new domain; the restored one is freed on the way
            new = domain_alloc(tx, get_domain(tx, entry["restored"]).format)
            replace(tx, entry["bdf"], new.id, owner=OWNER)
            detach(tx, entry["bdf"], owner=OWNER)
            new.free()
        finish = finish_session(tx, SESSION)
        left = sum(frame_counts(tx).values())
    return PhaseResult(
        phase="restore+verify+free",
        boot=machine.boot_number,
        seconds=time.perf_counter() - t0,
        domains=len(snap),
        frames=reclaimed,
        translations_checked=checked,
        details={
            "leaked_frames": leaked,
            "frames_left_after_free": left,
            "session": finish.session,
            "devices_reattached": len(finish.devices_reattached),
            "never_reclaimed": len(finish.never_reclaimed),
        },
    )


def _child(phase: str, db: str, machine: str, snapshot: Path) -> PhaseResult:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "iommupt_store.demo",
            phase,
            "--db",
            db,
            "--machine",
            machine,
            "--snapshot",
            str(snapshot),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        raise DemoFailed(f"the {phase} process failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return PhaseResult.model_validate_json(proc.stdout)


class DemoFailed(IommuptError):
    pass


def run_demo(db: str | None, machine: str = DEMO_MACHINE) -> tuple[DemoSummary, list[PhaseResult]]:
    """Reset ``machine`` in ``db``, then run A and B as separate processes."""
    t0 = time.perf_counter()
    store = Store.init(db)
    reset_machine(store, machine)
    url = store.url
    store.close()
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = Path(tmp) / "snapshot.json"
        a = _child("build", url, machine, snapshot)
        b = _child("restore", url, machine, snapshot)
    total = time.perf_counter() - t0
    summary = DemoSummary(
        db=url,
        machine=machine,
        formats=sorted({p.format for p in PLAN}),
        frames_preserved=a.frames,
        frames_reclaimed=b.frames,
        frames_leaked=int(b.details["leaked_frames"]),
        frames_left_after_free=int(b.details["frames_left_after_free"]),
        translations_checked=a.translations_checked + b.translations_checked,
        session=SESSION,
        devices_preserved=int(a.details["devices"]),
        devices_reattached=int(b.details["devices_reattached"]),
        seconds={
            "build_preserve_seal": round(a.seconds, 3),
            "restore_verify_free": round(b.seconds, 3),
            "total": round(total, 3),
        },
        ok=a.frames == b.frames
        and b.details["frames_left_after_free"] == 0
        and b.details["leaked_frames"] == 0
        and b.details["devices_reattached"] == a.details["devices"],
    )
    return summary, [a, b]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m iommupt_store.demo", description="one phase of the demo")
    ap.add_argument("phase", choices=["build", "restore"])
    ap.add_argument("--db", required=True)
    ap.add_argument("--machine", default=DEMO_MACHINE)
    ap.add_argument("--snapshot", type=Path, required=True)
    args = ap.parse_args()
    fn = build_and_preserve if args.phase == "build" else restore_and_verify
    try:
        result = fn(args.db, args.machine, args.snapshot)
    except (IommuptError, AssertionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(result.model_dump_json())


if __name__ == "__main__":
    main()
