"""LUO sessions with preserved devices, across two real processes (process exit is the kexec).

Process A (boot N) builds, for every format, a domain with a mix of mappings and
a device attached to it (x86_64 has two devices sharing one domain id), a live
domain whose device is not preserved, and one more domain preserved but never
restored. It preserves the domains and devices in one session, snapshots what
each device's DMA sees (every leaf, the first and last byte of each) and seals.
Process B (boot N+1) checks DMA continuity before touching anything, that the
unpreserved device is detached and that the preserved domain ids are reserved,
then retrieves the session, restores, replaces, frees and finishes it. The
assertions run here, on what the two children reported and on the database.

Then the session semantics in one process: names, close before the seal,
retrieve once, finish all or nothing, restore only after retrieve, sessions of
two boots ago; and the demo.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from iommupt_store.descriptors import FORMAT_NAMES
from iommupt_store.devices import attach, dma_walker, list_devices, replace, reserved_dids
from iommupt_store.domains import domain_alloc, frame_counts, get_domain
from iommupt_store.errors import Busy, IommuptError
from iommupt_store.liveupdate import liveupdate, restore_domain
from iommupt_store.liveupdate.sessions import (
    close_session,
    create_session,
    finish_session,
    list_sessions,
    preserve_device,
    preserve_domain_in_session,
    retrieve_session,
)
from iommupt_store.store import Store
from tests.conftest import (
    SW_DEV_A0,
    SW_DEV_A1,
    SW_DEV_B,
    SW_DEV_L,
    SW_OWNER,
    SW_SESSION,
    SW_SESSION2,
    SW_TOKEN_A,
    SW_TOKEN_B,
    SW_TOKEN_O,
    SW_TOKEN_U,
    RunCli,
    SessionWorld,
    integrity,
    run_python_ok,
    sqlite_dump,
)

MACHINE = "lu"
SESSION = "vmm-1"
OWNER = "vfio-vmm"
SMALL = (0x40000000, 0x80001000, 1 << 20)  # 256 4K pages, paddr only 4K aligned
MIXED = (0x3FE400000, 0x3FE400000, 0xC2200000)  # test_mixed: 14x2M + 3x1G + 3x2M
UPPER = 0xFFFF800000000000
#: one preserved domain (and device) per format; x86_64 has a second device on the same domain
FLOW: list[dict[str, Any]] = [
    {
        "format": "amdv1",
        "maps": [SMALL, MIXED, (0x10000, 0x10000, 0x30000), (1 << 40, 0x40000000, 2 << 20)],
        "bdfs": ["0000:10:00.0"],
    },
    {"format": "x86_64", "maps": [SMALL, MIXED, (UPPER, 0x200000, 4 << 20)], "bdfs": ["0000:11:00.0", "0000:11:00.1"]},
    {"format": "vtdss", "maps": [SMALL, MIXED], "bdfs": ["0000:12:00.0"]},
    {"format": "riscv", "maps": [SMALL, MIXED, (UPPER, 0x10000000, 2 << 20)], "bdfs": ["0000:13:00.0"]},
]
for _i, _e in enumerate(FLOW):
    _e["token"] = 0x100 + _i
    _e["dev_tokens"] = [0x200 + 0x10 * _i + j for j in range(len(_e["bdfs"]))]
BDFS = [(e["format"], bdf) for e in FLOW for bdf in e["bdfs"]]
LOOSE = "0000:20:00.0"  # attached in boot N, not preserved
UNRECLAIMED_TOKEN = 0x1FF  # preserved in the session, never restored
NEWCOMER, NEWCOMER2 = "0000:30:00.0", "0000:30:00.1"  # first attached in boot N+1
HOLE = 0x1000  # mapped by no plan

_PRELUDE = r"""
import json, sys
from iommupt_store.devices import attach, detach, dma_walker, list_devices, replace, reserved_dids
from iommupt_store.domains import domain_alloc, frame_counts, get_domain
from iommupt_store.errors import IommuptError
from iommupt_store.liveupdate import handover_report, liveupdate, restore_domain
from iommupt_store.liveupdate.sessions import (
    create_session, finish_session, list_sessions, preserve_device, preserve_domain_in_session, retrieve_session,
)
from iommupt_store.store import Store

def view(w):
    leaves = [[lf.iova, lf.phys, lf.size, lf.level] for lf in w.leaves()]
    trans = [[iova + off, w.translate(iova + off).phys] for iova, _, size, _ in leaves for off in (0, size - 1)]
    return {"leaves": leaves, "translations": trans, "hole": w.translate(HOLE).fault}

def err(fn):
    try:
        fn()
    except IommuptError as e:
        return [type(e).__name__, e.errno_name]
    return None

def devices(tx):
    return {d.bdf: d.model_dump(mode="json") for d in list_devices(tx)}

db, machine_name, plan_path, out_path = sys.argv[1:5]
P = json.loads(open(plan_path).read())
FLOW, SESSION, OWNER, HOLE = P["flow"], P["session"], P["owner"], P["hole"]
m = Store(db).machine(machine_name)
out = {"boot": m.boot_number}
"""

BOOT_N = (
    _PRELUDE
    + r"""
with m.transaction() as tx:
    create_session(tx, SESSION)
    for e in FLOW:
        dom = domain_alloc(tx, e["format"])
        for iova, pa, length in e["maps"]:
            dom.map_range(iova, pa, length)
        e["domain"] = dom.id
        for bdf in e["bdfs"]:
            attach(tx, bdf, dom.id, owner=OWNER)
    loose = domain_alloc(tx, "riscv")
    loose.map_range(0x40000000, 0x80001000, 1 << 20)
    attach(tx, P["loose"], loose.id, owner="someone-else")
    unrec = domain_alloc(tx, "amdv1")
    unrec.map_range(0x40000000, 0x80001000, 2 << 20)
    unrec.map_range(1 << 40, 0x40000000, 2 << 20)
with m.transaction() as tx:
    for e in FLOW:
        preserve_domain_in_session(tx, SESSION, e["domain"], e["token"])
        for bdf, token in zip(e["bdfs"], e["dev_tokens"]):
            preserve_device(tx, SESSION, bdf, token)
    preserve_domain_in_session(tx, SESSION, unrec.id, P["unreclaimed_token"])
with m.transaction() as tx:  # the snapshot, after preserve and before the seal
    out["views"] = {bdf: view(dma_walker(tx, bdf)) for e in FLOW for bdf in e["bdfs"]}
    out["loose_view"] = view(dma_walker(tx, P["loose"]))
    out["devices"] = devices(tx)
    out["frames"] = {str(k): v for k, v in frame_counts(tx).items()}
    out["domains"] = {e["format"]: e["domain"] for e in FLOW}
    out["unreclaimed"] = unrec.id
    out["sessions"] = [s.model_dump(mode="json") for s in list_sessions(tx)]
out["seal"] = liveupdate(m).model_dump(mode="json")
open(out_path, "w").write(json.dumps(out))
"""
)

BOOT_N1 = (
    _PRELUDE
    + r"""
a = json.loads(open(sys.argv[5]).read())
bdfs = [bdf for e in FLOW for bdf in e["bdfs"]]
with m.transaction() as tx:  # before anything: DMA never stopped
    out["before"] = {bdf: view(dma_walker(tx, bdf)) for bdf in bdfs}
    out["loose_dma"] = err(lambda: dma_walker(tx, P["loose"]))
    out["devices_before"] = devices(tx)
    out["reserved"] = sorted(reserved_dids(tx))
    out["sessions_before"] = [s.model_dump(mode="json") for s in list_sessions(tx)]
with m.transaction() as tx:  # a new domain never gets a preserved DID
    new = domain_alloc(tx, "x86_64")
    new.map_range(0x1000000, 0x1000000, 1 << 21)
    out["with_reserved_did"] = {str(d): err(lambda: attach(tx, P["newcomer"], new.id, did=d)) for d in out["reserved"]}
    attach(tx, P["newcomer"], new.id, owner="newcomer")
    new2 = domain_alloc(tx, "vtdss")
    attach(tx, P["newcomer2"], new2.id, owner="newcomer")
    loose_new = domain_alloc(tx, "riscv")
    attach(tx, P["loose"], loose_new.id, owner="someone-else")
    out["new_domains"] = [new.id, new2.id, loose_new.id]
    out["devices_new"] = devices(tx)
with m.transaction() as tx:
    token0 = FLOW[0]["token"]
    out["restore_before_retrieve"] = err(lambda: restore_domain(tx, token0))
    out["finish_before_retrieve"] = err(lambda: finish_session(tx, SESSION))
with m.transaction() as tx:
    out["retrieved"] = retrieve_session(tx, SESSION).model_dump(mode="json")
with m.transaction() as tx:
    out["retrieve_again"] = err(lambda: retrieve_session(tx, SESSION))
    out["finish_early"] = err(lambda: finish_session(tx, SESSION))
with m.transaction() as tx:
    out["restored"] = {e["format"]: restore_domain(tx, e["token"]).id for e in FLOW}
with m.transaction() as tx:
    out["after_restore"] = {bdf: view(dma_walker(tx, bdf)) for bdf in bdfs}
    out["devices_restored"] = devices(tx)
    out["reserved_after_restore"] = sorted(reserved_dids(tx))
    out["frames_restored"] = {str(k): v for k, v in frame_counts(tx).items()}
    out["leaked"] = handover_report(tx).leaked_frames
with m.transaction() as tx:  # the VMM moves every device to a new domain of its own
    out["replaced"] = {}
    for e in FLOW:
        target = domain_alloc(tx, e["format"])
        target.map_range(0x2000000, 0x3000000, 1 << 21)
        for bdf in e["bdfs"]:
            freed = replace(tx, bdf, target.id, owner=OWNER)
            out["replaced"][bdf] = {"target": target.id, "freed": freed, "view": view(dma_walker(tx, bdf))}
        out["replaced"][e["format"]] = {
            "target_view": view(target.walker()),
            "restored_state": get_domain(tx, out["restored"][e["format"]]).state,
        }
    out["devices_replaced"] = devices(tx)
with m.transaction() as tx:
    targets = {out["replaced"][bdf]["target"] for bdf in bdfs}
    for bdf in bdfs:
        detach(tx, bdf, owner=OWNER)
    for dev, owner in ((P["newcomer"], "newcomer"), (P["newcomer2"], "newcomer"), (P["loose"], "someone-else")):
        detach(tx, dev, owner=owner)
    out["freed_new"] = sum(get_domain(tx, d).free() for d in sorted(targets) + out["new_domains"])
with m.transaction() as tx:
    out["finish"] = finish_session(tx, SESSION).model_dump(mode="json")
with m.transaction() as tx:
    out["finish_again"] = err(lambda: finish_session(tx, SESSION))
    out["frames_end"] = {str(k): v for k, v in frame_counts(tx).items()}
    out["sessions_end"] = [s.model_dump(mode="json") for s in list_sessions(tx)]
    out["devices_end"] = devices(tx)
open(out_path, "w").write(json.dumps(out))
"""
)


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("sessions")
    db = tmp / "lu.db"
    with Store.init(db) as s:
        s.create_machine(MACHINE, 64 << 20)
    plan = {
        "flow": FLOW,
        "session": SESSION,
        "owner": OWNER,
        "hole": HOLE,
        "loose": LOOSE,
        "unreclaimed_token": UNRECLAIMED_TOKEN,
        "newcomer": NEWCOMER,
        "newcomer2": NEWCOMER2,
    }
    (tmp / "plan.json").write_text(json.dumps(plan))
    args = [str(db), MACHINE, str(tmp / "plan.json")]
    run_python_ok(BOOT_N, *args, str(tmp / "a.json"))
    run_python_ok(BOOT_N1, *args, str(tmp / "b.json"), str(tmp / "a.json"))
    return {"a": json.loads((tmp / "a.json").read_text()), "b": json.loads((tmp / "b.json").read_text()), "db": db}


def _check_view(view: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    assert view["leaves"] == expected["leaves"], f"{where}: the device's DMA sees different leaves"
    assert view["translations"] == expected["translations"], f"{where}: different translations"
    assert view["hole"] == expected["hole"] is not None, f"{where}: the hole translates"


def test_flow_covers_every_format() -> None:
    assert sorted(e["format"] for e in FLOW) == sorted(FORMAT_NAMES)


def test_flow_boots_and_seal(flow: dict[str, Any]) -> None:
    a, b = flow["a"], flow["b"]
    assert (a["boot"], b["boot"]) == (1, 2)
    assert a["seal"]["domains"] == len(FLOW) + 1
    preserved = [*a["domains"].values(), a["unreclaimed"]]
    assert a["seal"]["frames"] == sum(a["frames"][str(d)] for d in preserved)
    assert a["sessions"] == [{"name": SESSION, "boot": 1, "state": "open", "objects": 10, "retrieved_in_boot": None}]
    assert [(s["name"], s["state"]) for s in b["sessions_before"]] == [(SESSION, "sealed")]
    assert integrity(flow["db"]) == ("ok", [])


@pytest.mark.parametrize(("fmt", "bdf"), BDFS)
def test_snapshot_is_a_real_mix(flow: dict[str, Any], fmt: str, bdf: str) -> None:
    leaves = flow["a"]["views"][bdf]["leaves"]
    sizes = {size for _, _, size, _ in leaves}
    assert {1 << 12, 1 << 21, 1 << 30} <= sizes
    assert sum(1 for lf in leaves if lf[2] == 1 << 12) >= 256
    want = [[iova + off, phys + off] for iova, phys, size, _ in leaves for off in (0, size - 1)]
    assert flow["a"]["views"][bdf]["translations"] == want
    if fmt in ("x86_64", "riscv"):
        assert any(lf[0] >> 63 for lf in leaves), "no upper-half leaf"
    assert flow["a"]["devices"][bdf]["attachment"] == "preserved"


@pytest.mark.parametrize(("fmt", "bdf"), BDFS)
def test_dma_continues_before_anything_is_restored(flow: dict[str, Any], fmt: str, bdf: str) -> None:
    a, b = flow["a"], flow["b"]
    _check_view(b["before"][bdf], a["views"][bdf], f"{fmt} {bdf}, boot N+1 before restore")
    dev = b["devices_before"][bdf]
    assert dev["attachment"] == "preserved (previous boot)"
    assert (dev["domain"], dev["did"], dev["owner"]) == (a["domains"][fmt], a["devices"][bdf]["did"], OWNER)


def test_unpreserved_device_is_detached(flow: dict[str, Any]) -> None:
    a, b = flow["a"], flow["b"]
    assert a["loose_view"]["leaves"], "the loose device translated in boot N"
    assert b["loose_dma"] == ["NotFound", "ENOENT"]
    dev = b["devices_before"][LOOSE]
    assert (dev["attachment"], dev["domain"], dev["did"]) == ("detached", None, None)


def test_preserved_dids_are_reserved(flow: dict[str, Any]) -> None:
    a, b = flow["a"], flow["b"]
    preserved = {a["devices"][bdf]["did"] for _, bdf in BDFS}
    assert len(preserved) == len(FLOW)  # one per domain: the two x86_64 devices share theirs
    x86 = next(e for e in FLOW if e["format"] == "x86_64")["bdfs"]
    assert a["devices"][x86[0]]["did"] == a["devices"][x86[1]]["did"]
    assert set(b["reserved"]) == preserved
    # with --did = a reserved one: EBUSY; without: another one, never a reserved one
    assert b["with_reserved_did"] == {str(d): ["Busy", "EBUSY"] for d in sorted(preserved)}
    got = {b["devices_new"][bdf]["did"] for bdf in (NEWCOMER, NEWCOMER2, LOOSE)}
    assert len(got) == 3
    assert not got & preserved
    # the loose device's old DID was not preserved: it is free again
    assert a["devices"][LOOSE]["did"] not in preserved


def test_session_must_be_retrieved_once(flow: dict[str, Any]) -> None:
    b = flow["b"]
    assert b["restore_before_retrieve"] == ["NotPermitted", "EPERM"]
    assert b["finish_before_retrieve"] == ["InvalidArgument", "EINVAL"]
    assert b["retrieved"] == {"name": SESSION, "boot": 1, "state": "retrieved", "objects": 10, "retrieved_in_boot": 2}
    assert b["retrieve_again"] == ["InvalidArgument", "EINVAL"]
    assert b["finish_early"] == ["Busy", "EBUSY"]


@pytest.mark.parametrize(("fmt", "bdf"), BDFS)
def test_restore_reattaches_with_the_same_did(flow: dict[str, Any], fmt: str, bdf: str) -> None:
    a, b = flow["a"], flow["b"]
    restored = b["restored"][fmt]
    assert restored != a["domains"][fmt]
    dev = b["devices_restored"][bdf]
    assert dev == {
        "bdf": bdf,
        "owner": OWNER,
        "domain": restored,
        "did": a["devices"][bdf]["did"],
        "attachment": "attached",
        "domain_state": "restored",
    }
    _check_view(b["after_restore"][bdf], a["views"][bdf], f"{fmt} {bdf}, after restore")
    assert b["frames_restored"][str(restored)] == a["frames"][str(a["domains"][fmt])]


def test_after_restore_only_the_unreclaimed_domain_is_left(flow: dict[str, Any]) -> None:
    a, b = flow["a"], flow["b"]
    assert b["reserved_after_restore"] == []  # every preserved attachment was re-made
    assert b["leaked"] == a["frames"][str(a["unreclaimed"])]


@pytest.mark.parametrize(("fmt", "bdf"), BDFS)
def test_replace_moves_to_a_new_did_and_frees_the_restored_domain(flow: dict[str, Any], fmt: str, bdf: str) -> None:
    a, b = flow["a"], flow["b"]
    rep = b["replaced"][bdf]
    dev = b["devices_replaced"][bdf]
    assert (dev["domain"], dev["attachment"], dev["domain_state"], dev["owner"]) == (
        rep["target"],
        "attached",
        "live",
        OWNER,
    )
    assert dev["did"] != a["devices"][bdf]["did"]
    e = next(e for e in FLOW if e["format"] == fmt)
    # the restored domain is freed with its last device
    assert rep["freed"] == (b["restored"][fmt] if bdf == e["bdfs"][-1] else None)
    assert b["replaced"][fmt]["restored_state"] == "freed"
    # the device now sees the new domain, and only it
    assert rep["view"] == b["replaced"][fmt]["target_view"]
    assert [lf[:2] for lf in rep["view"]["leaves"]] == [[0x2000000, 0x3000000]]


def test_shared_did_moves_together(flow: dict[str, Any]) -> None:
    b = flow["b"]
    x86 = next(e for e in FLOW if e["format"] == "x86_64")["bdfs"]
    assert b["devices_replaced"][x86[0]]["did"] == b["devices_replaced"][x86[1]]["did"]
    dids = [b["devices_replaced"][bdf]["did"] for _, bdf in BDFS]
    assert len(set(dids)) == len(FLOW)


def test_finish_reports_the_unreclaimed_domain(flow: dict[str, Any]) -> None:
    a, b = flow["a"], flow["b"]
    unrec_frames = a["frames"][str(a["unreclaimed"])]
    assert unrec_frames >= 3
    assert b["finish"] == {
        "session": SESSION,
        "domains_reclaimed": sorted(f"{e['token']:#x}" for e in FLOW),
        "devices_reattached": sorted(bdf for _, bdf in BDFS),
        "never_reclaimed": [f"{UNRECLAIMED_TOKEN:#x}"],
        "frames_never_reclaimed": unrec_frames,
    }
    assert b["finish_again"] == ["InvalidArgument", "EINVAL"]
    # the frame count is back to zero but for the domain deliberately left unreclaimed
    assert b["frames_end"] == {str(a["unreclaimed"]): unrec_frames}
    assert [(s["name"], s["state"]) for s in b["sessions_end"]] == [(SESSION, "finished")]
    assert all(d["attachment"] == "detached" for d in b["devices_end"].values())
    assert b["freed_new"] > 0


def _sql(db: Path, query: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()


def test_database_after_the_flow(flow: dict[str, Any]) -> None:
    db, a = flow["db"], flow["a"]
    assert _sql(db, "SELECT state FROM luo_session") == [("finished",)]
    assert _sql(db, "SELECT count(*) FROM page WHERE domain_id IS NOT NULL") == [(a["frames"][str(a["unreclaimed"])],)]
    assert _sql(db, "SELECT state FROM domain WHERE id = ?", a["unreclaimed"]) == [("preserved",)]
    assert _sql(db, "SELECT count(*) FROM device WHERE domain_id IS NOT NULL") == [(0,)]


# =========================================================================== session semantics (one process)


def _err(fn: Any) -> tuple[str, str] | None:
    try:
        fn()
    except IommuptError as e:
        return type(e).__name__, e.errno_name
    return None


def test_session_names(lu_db: Path) -> None:
    with Store(lu_db) as s:
        m = s.machine(MACHINE)
        for ok in ("a" * 63, "é" * 31 + "x", "vm 1"):
            with m.transaction() as tx:
                create_session(tx, ok)
        before = sqlite_dump(lu_db)
        for bad in ("a" * 64, "é" * 32, "", "tab\there"):
            with m.transaction() as tx:
                assert _err(lambda: create_session(tx, bad)) == ("InvalidArgument", "EINVAL"), bad  # noqa: B023
        with m.transaction() as tx:
            assert _err(lambda: create_session(tx, "vm 1")) == ("AlreadyExists", "EEXIST")
        assert sqlite_dump(lu_db) == before
        with m.transaction() as tx:
            assert [i.name for i in list_sessions(tx)] == ["a" * 63, "é" * 31 + "x", "vm 1"]
        liveupdate(m)
        with s.machine(MACHINE).transaction() as tx:  # a new boot may reuse a name
            create_session(tx, "vm 1")
            assert [(i.name, i.boot, i.state) for i in list_sessions(tx)][2:] == [
                ("vm 1", 1, "sealed"),
                ("vm 1", 2, "open"),
            ]


@pytest.mark.parametrize("kernel", ["lu-v3", "lu-v5"])
def test_close_before_the_seal_unpreserves_everything(lu_db: Path, kernel: str) -> None:
    """lu-v3 (series v3) removes the entries; lu-v5 keeps each slot, flagged DELETED, out of any session."""
    with Store(lu_db) as s:
        m = s.machine(MACHINE, kernel=kernel)
        with m.transaction() as tx:
            doms = []
            for i, fmt in enumerate(FORMAT_NAMES):
                dom = domain_alloc(tx, fmt)
                dom.map_range(0x40000000, 0x80001000, 1 << 20)
                attach(tx, f"0000:4{i}:00.0", dom.id, owner=OWNER)
                doms.append(dom.id)
        before_session = sqlite_dump(lu_db)
        with m.transaction() as tx:
            create_session(tx, SESSION)
        before_preserve = sqlite_dump(lu_db)
        with m.transaction() as tx:
            for i, d in enumerate(doms):
                preserve_domain_in_session(tx, SESSION, d, 0x100 + i)
                if i % 2 == 0:
                    preserve_device(tx, SESSION, f"0000:4{i}:00.0", 0x200 + i)
        assert _sql(lu_db, "SELECT count(*) FROM preservation")[0][0] > 0
        with m.transaction() as tx:
            assert close_session(tx, SESSION) == len(doms) + 2
        after = sqlite_dump(lu_db)
        if kernel == "lu-v5":
            slots = _sql(lu_db, "SELECT flags, session_id FROM handover_entry")
            assert slots == [(1, None)] * (len(doms) + 2)
            after["handover_entry"] = []
        assert after == before_session
        assert {k: v for k, v in before_preserve.items() if k != "luo_session"} == {
            k: v for k, v in after.items() if k != "luo_session"
        }
        with m.transaction() as tx:
            assert _err(lambda: close_session(tx, SESSION)) == ("NotFound", "ENOENT")
            if kernel == "lu-v5":  # a DELETED slot's token is never reused in this boot
                create_session(tx, SESSION)
                assert _err(lambda: preserve_domain_in_session(tx, SESSION, doms[0], 0x100)) == (
                    "AlreadyExists",
                    "EEXIST",
                )
                close_session(tx, SESSION)
            for d in doms:  # live again: mutable, and its device can move
                assert get_domain(tx, d).state == "live"
                get_domain(tx, d).map_range(0x1000, 0x1000, 0x1000)
            assert {d.attachment for d in list_devices(tx)} == {"attached"}
        report = liveupdate(m)
        assert (report.domains, report.frames) == (0, 0)


def test_close_one_session_keeps_the_other(session_world: SessionWorld) -> None:
    w = session_world
    w.tx(lambda tx: close_session(tx, SW_SESSION2))
    assert w.sql("SELECT state FROM domain WHERE id = ?", w.o) == [("live",)]
    assert w.sql("SELECT token FROM handover_entry WHERE flags & 1 = 0 ORDER BY token") == [
        (t,) for t in sorted([SW_TOKEN_A, SW_TOKEN_B, SW_TOKEN_U, 0xD0, 0xD1, 0xD2])
    ]
    w.seal()
    assert w.tx(lambda tx: [(i.name, i.state) for i in list_sessions(tx)]) == [(SW_SESSION, "sealed")]
    # a sealed session can no longer be closed, nor an incoming one
    assert w.tx(lambda tx: _err(lambda: close_session(tx, SW_SESSION))) == ("NotFound", "ENOENT")


def test_retrieve_once(session_world: SessionWorld) -> None:
    w = session_world
    w.seal()
    before = sqlite_dump(w.db)
    assert w.tx(lambda tx: _err(lambda: retrieve_session(tx, "nope"))) == ("NotFound", "ENOENT")
    assert w.tx(lambda tx: _err(lambda: restore_domain(tx, 0x999))) == ("NotFound", "ENOENT")
    assert sqlite_dump(w.db) == before
    info = w.tx(lambda tx: retrieve_session(tx, SW_SESSION))
    assert (info.name, info.state, info.objects, info.retrieved_in_boot) == (SW_SESSION, "retrieved", 6, 2)
    after = sqlite_dump(w.db)
    assert w.tx(lambda tx: _err(lambda: retrieve_session(tx, SW_SESSION))) == ("InvalidArgument", "EINVAL")
    assert sqlite_dump(w.db) == after


def test_restore_before_retrieve_is_refused(session_world: SessionWorld) -> None:
    w = session_world
    w.seal()
    before = sqlite_dump(w.db)
    for token in (SW_TOKEN_A, SW_TOKEN_B, SW_TOKEN_U, SW_TOKEN_O):
        assert w.tx(lambda tx: _err(lambda: restore_domain(tx, token))) == ("NotPermitted", "EPERM")  # noqa: B023
    assert sqlite_dump(w.db) == before
    w.retrieve(SW_SESSION)
    # retrieving one session does not open the other
    assert w.tx(lambda tx: _err(lambda: restore_domain(tx, SW_TOKEN_O))) == ("NotPermitted", "EPERM")
    dom = w.restore(SW_TOKEN_A)
    assert w.sql("SELECT domain_id, did FROM device WHERE bdf IN (?, ?)", SW_DEV_A0, SW_DEV_A1) == [(dom, 1)] * 2


def test_finish_is_all_or_nothing_and_can_be_retried(session_world: SessionWorld) -> None:
    w = session_world
    u_frames = w.tx(lambda tx: frame_counts(tx)[w.u])
    w.seal()
    w.retrieve()
    w.restore(SW_TOKEN_A)
    before = sqlite_dump(w.db)
    with pytest.raises(Busy, match=SW_DEV_B) as info:
        w.tx(lambda tx: finish_session(tx, SW_SESSION))
    assert info.value.errno_name == "EBUSY"
    assert sqlite_dump(w.db) == before  # nothing finished
    w.restore(SW_TOKEN_B)
    report = w.tx(lambda tx: finish_session(tx, SW_SESSION))
    assert report.session == SW_SESSION
    assert report.domains_reclaimed == [SW_TOKEN_A, SW_TOKEN_B]
    assert report.devices_reattached == sorted([SW_DEV_A0, SW_DEV_A1, SW_DEV_B])
    assert report.never_reclaimed == [SW_TOKEN_U]
    assert report.frames_never_reclaimed == u_frames
    assert w.sql("SELECT state FROM luo_session WHERE name = ?", SW_SESSION) == [("finished",)]
    # the other session held no device: it finishes with nothing restored
    w.retrieve(SW_SESSION2)
    other = w.tx(lambda tx: finish_session(tx, SW_SESSION2))
    assert (other.domains_reclaimed, other.devices_reattached, other.never_reclaimed) == ([], [], [SW_TOKEN_O])
    assert other.frames_never_reclaimed > 0
    assert integrity(w.db) == ("ok", [])


def test_sessions_of_two_boots_ago_are_discarded(session_world: SessionWorld) -> None:
    w = session_world
    w.seal()  # boot 2
    w.retrieve(SW_SESSION2)  # retrieved, never finished
    w.tx(lambda tx: create_session(tx, "next"))
    w.seal()  # boot 3
    sessions = w.tx(lambda tx: [(i.name, i.boot, i.state) for i in list_sessions(tx)])
    assert sessions == [(SW_SESSION, 1, "discarded"), (SW_SESSION2, 1, "discarded"), ("next", 2, "sealed")]
    assert w.tx(lambda tx: _err(lambda: retrieve_session(tx, SW_SESSION))) == ("NotFound", "ENOENT")
    assert w.tx(lambda tx: _err(lambda: restore_domain(tx, SW_TOKEN_A))) == ("NotFound", "ENOENT")
    # boot 2 preserved nothing of boot 1: its devices are detached, its DIDs free, its frames gone
    assert w.tx(lambda tx: {d.attachment for d in list_devices(tx)}) == {"detached"}
    assert w.tx(lambda tx: reserved_dids(tx)) == set()
    assert w.tx(frame_counts) == {}
    w.retrieve("next")
    assert w.tx(lambda tx: finish_session(tx, "next")).never_reclaimed == []


def test_objects_of_a_sealed_session_cannot_be_changed_by_the_next_boot(session_world: SessionWorld) -> None:
    w = session_world
    w.seal()
    new = w.new_domain()
    before = sqlite_dump(w.db)
    for bdf in (SW_DEV_A0, SW_DEV_B):
        assert w.tx(lambda tx: _err(lambda: attach(tx, bdf, new, owner=SW_OWNER))) == ("Busy", "EBUSY")  # noqa: B023
        assert w.tx(lambda tx: _err(lambda: replace(tx, bdf, new, owner=SW_OWNER))) == (  # noqa: B023
            "InvalidArgument",
            "EINVAL",
        )
    assert w.tx(lambda tx: _err(lambda: get_domain(tx, w.a).free())) == ("NotPermitted", "EPERM")
    assert sqlite_dump(w.db) == before
    # the unpreserved device is free to go anywhere (by its owner)
    w.tx(lambda tx: attach(tx, SW_DEV_L, new, owner="other"))
    assert w.tx(lambda tx: len(dma_walker(tx, SW_DEV_L).leaves())) == 0


# =========================================================================== the CLI and the demo


def _json(proc: Any) -> Any:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_cli_flow(run_cli: RunCli, db_path: Path) -> None:
    """One device through the whole flow, command by command (each command is a process)."""
    with Store.init(db_path) as s:
        s.create_machine("default", 64 << 20)
        with s.machine("default").transaction() as tx:
            d = domain_alloc(tx, "vtdss")
            d.map_range(0x40000000, 0x80000000, 4 << 20)
            dom = d.id
    _json(run_cli("session", "create", "vm", "--json"))
    dev = _json(run_cli("device", "attach", "3b:0.1", str(dom), "--owner", "vfio", "--json"))
    assert (dev["bdf"], dev["did"], dev["attachment"]) == ("0000:3b:00.1", 1, "attached")
    _json(run_cli("preserve", str(dom), "--token", "0x10", "--session", "vm", "--json"))
    desc = _json(run_cli("device", "preserve", "0000:3b:00.1", "--session", "vm", "--token", "0x11", "--json"))
    assert desc["token"] == "0x11"
    assert _json(run_cli("liveupdate", "--json"))["domains"] == 1
    t = _json(run_cli("device", "translate", "0000:3b:00.1", "0x40201234", "--json"))
    assert (t["phys"], t["fault"]) == ("0x80201234", None)
    assert _json(run_cli("session", "retrieve", "vm", "--json"))["state"] == "retrieved"
    restored = _json(run_cli("restore", "--token", "0x10", "--json"))["id"]
    new = _json(run_cli("domain", "create", "vtdss", "--json"))["id"]
    rep = _json(run_cli("device", "replace", "0000:3b:00.1", str(new), "--owner", "vfio", "--json"))
    assert rep == {"device": "0000:3b:00.1", "domain": new, "freed_domain": restored}
    devs = _json(run_cli("devices", "--json"))
    assert [(d["bdf"], d["domain"], d["did"]) for d in devs] == [("0000:3b:00.1", new, 2)]
    fin = _json(run_cli("session", "finish", "vm", "--json"))
    assert fin == {
        "session": "vm",
        "domains_reclaimed": ["0x10"],
        "devices_reattached": ["0000:3b:00.1"],
        "never_reclaimed": [],
        "frames_never_reclaimed": 0,
    }
    assert _sql(db_path, "SELECT state FROM luo_session") == [("finished",)]
    assert integrity(db_path) == ("ok", [])


def test_demo(run_cli: RunCli, tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    doc = _json(run_cli("demo", "--json", db=db))
    summary = doc["summary"]
    assert summary["ok"] is True
    assert summary["devices_preserved"] == summary["devices_reattached"] == 6
    assert summary["frames_preserved"] == summary["frames_reclaimed"] > 0
    assert (summary["frames_leaked"], summary["frames_left_after_free"]) == (0, 0)
    assert summary["formats"] == sorted(FORMAT_NAMES)
    assert integrity(db) == ("ok", [])
