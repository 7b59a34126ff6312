"""A live update across two real processes: process exit is the kexec.

Process A (a child of pytest) builds one domain per KUnit configuration and
per format default, maps a mix (a 4K run whose paddr is only 4K aligned, the
``test_mixed`` identity range, an upper-half range and the last page when
sign-extended, a contiguous size on amdv1 and riscv with Svnapot), snapshots
what the hardware walker sees (every leaf, and the translation of the first
and last byte of each), preserves every domain and seals the boot. Process B
opens the machine (boot N+1), snapshots the walker through the *old* domain id
before restoring anything, restores, snapshots again, tries map/unmap/
iova_to_phys on the restored domain, frees it and counts the frames left.
Nothing crosses between A and B but database rows. The assertions run here,
on what the two children reported.

The same two processes also run the seed's ``test_restore_free`` through the
real restore path (the identity ``test_mixed`` range on every configuration
the kernel runs it on) and a grown amdv1 tree (dynamic top at level 4 and 5).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from iommupt_store.descriptors import FORMAT_NAMES
from iommupt_store.domains import DEFAULTS
from iommupt_store.formats import Feature, get_format
from iommupt_store.pagetable.engine import PageTable
from iommupt_store.pagetable.frames import DictFrames
from iommupt_store.store import Store
from tests.conftest import RunCli, run_python_ok
from tests.kunit_configs import KUNIT_CONFIGS, KunitConfig

MACHINE = "lu"
SZ_4K, SZ_64K, SZ_2M, SZ_1G = 1 << 12, 1 << 16, 1 << 21, 1 << 30
U64 = (1 << 64) - 1
#: 1024 4K pages; the paddr is 4K aligned only, so nothing larger fits
SMALL = (0x40000000, 0x80001000, 4 << 20)
#: test_mixed / test_restore_free: identity [0x3fe400000, 0x4c0600000) = 14x2M + 3x1G + 3x2M
MIXED_START, MIXED_END = 0x3FE400 << 12, 0x4C0600 << 12
MIXED = (MIXED_START, MIXED_START, MIXED_END - MIXED_START)
#: 0x10000..0x40000 -> a 64K and a 128K contiguous run on amdv1, three 64K NAPOT leaves on riscv
CONTIG = (0x10000, 0x10000, 0x30000)
#: a hole in every plan: the restored domain must refuse to map it
HOLE = 0x0


# =========================================================================== the plan


def _features(cfg: KunitConfig) -> list[str]:
    # in the KUnit (debug) build every feature is supported; FLUSH_RANGE_NO_GAPS is gather-only
    return sorted(f.value for f in cfg.features & get_format(cfg.format).supported)


def _probe(fmt_name: str, options: dict[str, Any]) -> PageTable:
    """The same configuration, built off-database to decide what to map."""
    return PageTable.create(
        get_format(fmt_name),
        DictFrames(),
        top_level=options.get("top_level"),
        hw_max_vasz_lg2=options.get("vasz"),
        hw_max_oasz_lg2=options.get("oasz"),
        features=frozenset(Feature(f) for f in options.get("features", ())),
    )


def _restart_maps(pt: PageTable) -> list[tuple[int, int, int]]:
    maps = [SMALL]
    if pt.dynamic_top or pt.top_range()[1] >= MIXED_END - 1:
        maps.append(MIXED)
    if pt.sign_extend:
        lo, hi = pt.upper_range()
        maps += [(lo, 0x200000, 8 << 20), (hi - (SZ_4K - 1), 0x5000, SZ_4K)]
    elif not pt.dynamic_top:
        maps.append((pt.top_range()[1] - (SZ_4K - 1), 0x6000, SZ_4K))
    if _has_contig(pt):
        maps.append(CONTIG)
    return maps


def _has_contig(pt: PageTable) -> bool:
    return pt.fmt.name == "amdv1" or (pt.fmt.name == "riscv" and bool(pt.pgsize_bitmap & SZ_64K))


def _runs_restore_free(pt: PageTable) -> bool:
    """The kernel's skip conditions of test_restore_free (= test_mixed)."""
    genmask_30_21 = ((1 << 31) - 1) & ~((1 << 21) - 1)
    return pt.top_range()[1] > MIXED_START and (pt.pgsize_bitmap & genmask_30_21) == SZ_1G | SZ_2M


def _build_plan() -> list[dict[str, Any]]:
    plan: list[dict[str, Any]] = []
    token = 0x1000

    def add(group: str, label: str, fmt: str, options: dict[str, Any], maps: list[tuple[int, int, int]]) -> None:
        nonlocal token
        token += 1
        plan.append({"group": group, "label": label, "format": fmt, "options": options, "maps": maps, "token": token})

    for cfg in KUNIT_CONFIGS:
        opts = {
            "top_level": cfg.top_level,
            "vasz": cfg.hw_max_vasz_lg2,
            "oasz": cfg.hw_max_oasz_lg2,
            "features": _features(cfg),
        }
        pt = _probe(cfg.format, opts)
        add("restart", cfg.id, cfg.format, opts, _restart_maps(pt))
        if _runs_restore_free(pt):
            add("restore_free", f"restore_free-{cfg.id}", cfg.format, opts, [MIXED])
    for fmt in FORMAT_NAMES:
        d = DEFAULTS[fmt]
        pt = _probe(fmt, {"top_level": d["top_level"], "vasz": d["vasz"], "features": [f.value for f in d["features"]]})
        add("restart", f"{fmt}-default", fmt, {}, _restart_maps(pt))
    amd = next(c for c in KUNIT_CONFIGS if c.format == "amdv1")
    amd_opts = {"top_level": amd.top_level, "vasz": amd.hw_max_vasz_lg2, "oasz": amd.hw_max_oasz_lg2}
    amd_opts["features"] = _features(amd)
    for level, high in ((4, 1 << 48), (5, 1 << 57)):
        maps = [MIXED, (0x1000, 0x2000, 0x3000), (high, 0x1000, SZ_4K)]
        add("amdv1_grown", f"amdv1-grown-to-{level}", "amdv1", amd_opts, maps)
    return plan


PLAN = _build_plan()
BY_LABEL = {e["label"]: e for e in PLAN}
RESTART = [e["label"] for e in PLAN if e["group"] == "restart"]
RESTORE_FREE = [e["label"] for e in PLAN if e["group"] == "restore_free"]
GROWN = [e["label"] for e in PLAN if e["group"] == "amdv1_grown"]
ALL = [e["label"] for e in PLAN]


# =========================================================================== the two processes

_PRELUDE = r"""
import json, sys
from iommupt_store.domains import domain_alloc, frame_counts, get_domain, hardware_walker
from iommupt_store.errors import IommuptError
from iommupt_store.liveupdate import handover_report, liveupdate, preserve_domain, restore_domain
from iommupt_store.store import Store

def view(w):
    leaves = [[lf.iova, lf.phys, lf.size, lf.level] for lf in w.leaves()]
    trans = []
    for iova, _, size, _ in leaves:
        for off in (0, size - 1):
            trans.append([iova + off, w.translate(iova + off).phys])
    return {"leaves": leaves, "translations": trans}

def err(fn):
    try:
        fn()
    except IommuptError as e:
        return [type(e).__name__, e.errno_name]
    return None

db, machine_name, in_path, out_path = sys.argv[1:5]
store = Store(db)
m = store.machine(machine_name)
"""

BUILD = (
    _PRELUDE
    + r"""
plan = json.loads(open(in_path).read())
out = {"boot": m.boot_number, "domains": {}}
with m.transaction() as tx:
    for e in plan:
        dom = domain_alloc(tx, e["format"], **e["options"])
        for iova, pa, length in e["maps"]:
            dom.map_range(iova, pa, length)
        before = view(hardware_walker(tx, dom.id))
        frames = frame_counts(tx)[dom.id]
        desc = preserve_domain(tx, dom.id, e["token"])
        after = view(hardware_walker(tx, dom.id))
        engine = [dom.iova_to_phys(iova) for iova, _ in after["translations"]]
        out["domains"][e["label"]] = {
            "domain": dom.id, "token": e["token"], "frames": frames,
            "top_level": dom.pt.top_level, "sign_extend": dom.pt.sign_extend,
            "descriptor": desc.model_dump(mode="json"),
            "before_preserve": before, "after_preserve": after, "engine_after_preserve": engine,
            "map_preserved": err(lambda: dom.map_range(0, 0x1000, 0x1000)),
        }
out["seal"] = liveupdate(m).model_dump(mode="json")
open(out_path, "w").write(json.dumps(out))
"""
)

RESTORE = (
    _PRELUDE
    + r"""
snap = json.loads(open(in_path).read())["domains"]
out = {"boot": m.boot_number, "domains": {k: {} for k in snap}}
with m.transaction() as tx:  # DMA never stopped: the old tables, through the old domain id
    for label, d in snap.items():
        out["domains"][label]["before_restore"] = view(hardware_walker(tx, d["domain"]))
        out["domains"][label]["frames_before_restore"] = frame_counts(tx).get(d["domain"], 0)
with m.transaction() as tx:
    for label, d in snap.items():
        out["domains"][label]["restored"] = restore_domain(tx, d["token"]).id
with m.transaction() as tx:
    for label, d in snap.items():
        r = out["domains"][label]
        dom = get_domain(tx, r["restored"])
        r["after_restore"] = view(hardware_walker(tx, dom.id))
        r["info"] = dom.info().model_dump(mode="json")
        r["pt"] = {"features": sorted(f.value for f in dom.pt.features), "max_vasz": dom.pt.max_vasz_lg2,
                   "top_phys": dom.pt.top_phys, "top_level": dom.pt.top_level}
        r["old_walker"] = err(lambda: hardware_walker(tx, d["domain"]))
        first = r["after_restore"]["leaves"][0]
        r["refused"] = {
            "map": err(lambda: dom.map_range(0, 0x1000, 0x1000)),
            "unmap": err(lambda: dom.unmap_range(first[0], first[2])),
            "iova_to_phys": err(lambda: dom.iova_to_phys(first[0])),
        }
        r["after_refused"] = view(hardware_walker(tx, dom.id))
        r["frames_restored"] = frame_counts(tx).get(dom.id, 0)
        r["frames_old_id"] = frame_counts(tx).get(d["domain"], 0)
    out["leaked_before_free"] = handover_report(tx).leaked_frames
with m.transaction() as tx:
    for label in snap:
        r = out["domains"][label]
        r["freed"] = get_domain(tx, r["restored"]).free()
with m.transaction() as tx:
    counts = frame_counts(tx)
    for label, d in snap.items():
        r = out["domains"][label]
        r["frames_after_free"] = counts.get(r["restored"], 0) + counts.get(d["domain"], 0)
        r["state_after_free"] = get_domain(tx, r["restored"]).state
    out["frames_left"] = sum(counts.values())
open(out_path, "w").write(json.dumps(out))
"""
)


@pytest.fixture(scope="module")
def lu_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run A (build, preserve, seal) and B (restore, verify, free) once for the whole plan."""
    tmp = tmp_path_factory.mktemp("restart")
    db = tmp / "lu.db"
    with Store.init(db) as s:
        s.create_machine(MACHINE, 64 << 20)
    (tmp / "plan.json").write_text(json.dumps(PLAN))
    run_python_ok(BUILD, str(db), MACHINE, str(tmp / "plan.json"), str(tmp / "a.json"))
    run_python_ok(RESTORE, str(db), MACHINE, str(tmp / "a.json"), str(tmp / "b.json"))
    return {"a": json.loads((tmp / "a.json").read_text()), "b": json.loads((tmp / "b.json").read_text())}


def _a(run: dict[str, Any], label: str) -> dict[str, Any]:
    domains: dict[str, dict[str, Any]] = run["a"]["domains"]
    return domains[label]


def _b(run: dict[str, Any], label: str) -> dict[str, Any]:
    domains: dict[str, dict[str, Any]] = run["b"]["domains"]
    return domains[label]


def _check_view(view: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Page by page: identical leaf lists, and each leaf's first and last byte translated exactly."""
    assert view["leaves"] == expected["leaves"], f"{where}: the walker sees different leaves"
    assert view["translations"] == expected["translations"], f"{where}: different translations"
    want = [[iova + off, phys + off] for iova, phys, size, _ in expected["leaves"] for off in (0, size - 1)]
    assert view["translations"] == want, f"{where}: a leaf does not translate linearly"


# =========================================================================== the plan itself


def test_plan_covers_every_format_and_kunit_configuration() -> None:
    assert {c.id for c in KUNIT_CONFIGS} <= set(RESTART)
    assert {BY_LABEL[label]["format"] for label in RESTART} == set(FORMAT_NAMES)
    # the kernel runs test_restore_free on x86_64 x4, vtdss x3, riscv x3, and skips amdv1
    ran = Counter(BY_LABEL[label]["format"] for label in RESTORE_FREE)
    assert ran == Counter({"x86_64": 4, "vtdss": 3, "riscv": 3})


def test_two_boots(lu_run: dict[str, Any]) -> None:
    a, b = lu_run["a"], lu_run["b"]
    assert b["boot"] == a["boot"] + 1
    assert a["seal"]["domains"] == len(PLAN)
    assert a["seal"]["frames"] == sum(d["frames"] for d in a["domains"].values())
    assert b["leaked_before_free"] == 0
    assert b["frames_left"] == 0


@pytest.mark.parametrize("label", RESTART)
def test_built_as_planned(lu_run: dict[str, Any], label: str) -> None:
    """The mix really is a mix: 1024 4K pages, mixed sizes, upper half, contiguous leaves."""
    leaves = _a(lu_run, label)["before_preserve"]["leaves"]
    sizes = Counter(size for _, _, size, _ in leaves)
    assert sizes[SZ_4K] >= 1024
    small = [lf for lf in leaves if SMALL[0] <= lf[0] < SMALL[0] + SMALL[2]]
    assert small == [[SMALL[0] + i * SZ_4K, SMALL[1] + i * SZ_4K, SZ_4K, 0] for i in range(SMALL[2] // SZ_4K)]
    entry = BY_LABEL[label]
    if list(MIXED) in [list(m) for m in entry["maps"]]:
        assert sizes[SZ_1G] + sizes.get(2 * SZ_1G, 0) >= 1
    if _a(lu_run, label)["sign_extend"]:
        assert any(iova >> 63 for iova, *_ in leaves), "no upper-half leaf"
        assert leaves[-1][0] == U64 - (SZ_4K - 1)
    if list(CONTIG) in [list(m) for m in entry["maps"]]:
        assert sizes[SZ_64K] >= 1, "no contiguous 64K leaf"


@pytest.mark.parametrize("label", ALL)
def test_walker_identical_after_preserve(lu_run: dict[str, Any], label: str) -> None:
    a = _a(lu_run, label)
    _check_view(a["after_preserve"], a["before_preserve"], f"{label}, boot N after preserve")
    assert a["engine_after_preserve"] == [phys for _, phys in a["before_preserve"]["translations"]]
    assert a["map_preserved"] == ["NotPermitted", "EPERM"]


@pytest.mark.parametrize("label", ALL)
def test_walker_identical_in_new_boot_before_restore(lu_run: dict[str, Any], label: str) -> None:
    a, b = _a(lu_run, label), _b(lu_run, label)
    _check_view(b["before_restore"], a["before_preserve"], f"{label}, boot N+1 before restore")
    assert b["frames_before_restore"] == a["frames"]


@pytest.mark.parametrize("label", ALL)
def test_walker_identical_after_restore(lu_run: dict[str, Any], label: str) -> None:
    a, b = _a(lu_run, label), _b(lu_run, label)
    assert b["restored"] != a["domain"]
    _check_view(b["after_restore"], a["before_preserve"], f"{label}, boot N+1 after restore")
    # the frames changed hands: the old id has none and the walker no longer finds its top
    assert b["frames_restored"] == a["frames"]
    assert b["frames_old_id"] == 0
    assert b["old_walker"] == ["NotFound", "ENOENT"]


@pytest.mark.parametrize("label", ALL)
def test_restored_domain_is_immutable(lu_run: dict[str, Any], label: str) -> None:
    a, b = _a(lu_run, label), _b(lu_run, label)
    assert b["info"]["state"] == "restored"
    assert b["refused"] == {
        "map": ["NotPermitted", "EPERM"],
        "unmap": ["NotPermitted", "EPERM"],
        "iova_to_phys": ["NotPermitted", "EPERM"],
    }
    _check_view(b["after_refused"], a["before_preserve"], f"{label}, after the refused operations")


@pytest.mark.parametrize("label", ALL)
def test_restored_geometry_comes_from_the_descriptor(lu_run: dict[str, Any], label: str) -> None:
    a, b = _a(lu_run, label), _b(lu_run, label)
    desc = a["descriptor"]
    assert b["pt"]["top_phys"] == int(desc["top_table_phys"], 16)
    assert b["pt"]["top_level"] == desc["top_level"] == a["top_level"]
    assert b["pt"]["max_vasz"] == desc["vasz"]
    # the kernel zeroes the features and sets back only SIGN_EXTEND
    want = ["SIGN_EXTEND"] if desc["sign_extend"] else []
    assert b["pt"]["features"] == want
    assert b["info"]["features"] == want
    assert b["info"]["sign_extend"] == desc["sign_extend"]
    assert desc["sign_extend"] == a["sign_extend"]
    assert b["info"]["frames"] == a["frames"]


@pytest.mark.parametrize("label", ALL)
def test_free_after_restore_releases_every_frame(lu_run: dict[str, Any], label: str) -> None:
    a, b = _a(lu_run, label), _b(lu_run, label)
    assert b["freed"] == a["frames"]
    assert b["frames_after_free"] == 0
    assert b["state_after_free"] == "freed"


# =========================================================================== the seed's test_restore_free


@pytest.mark.parametrize("label", RESTORE_FREE)
def test_restore_free_through_real_restore(lu_run: dict[str, Any], label: str) -> None:
    """Identity test_mixed range, preserved, sealed, restored in a new process, freed: zero frames."""
    a, b = _a(lu_run, label), _b(lu_run, label)
    leaves = a["before_preserve"]["leaves"]
    assert Counter(size for _, _, size, _ in leaves) == Counter({SZ_2M: 17, SZ_1G: 3})
    assert all(iova == phys for iova, phys, _, _ in leaves)
    assert leaves[0][0] == MIXED_START and leaves[-1][0] + leaves[-1][2] == MIXED_END
    assert 3 <= a["frames"] <= 5
    _check_view(b["after_restore"], a["before_preserve"], label)
    assert b["pt"]["features"] == (["SIGN_EXTEND"] if a["sign_extend"] else [])
    assert b["freed"] == a["frames"]
    assert b["frames_after_free"] == 0


@pytest.mark.parametrize("label", GROWN)
def test_restore_free_amdv1_grown(lu_run: dict[str, Any], label: str) -> None:
    """Not in the kernel (it skips amdv1): a dynamic top grown to level 4/5, restored and freed."""
    a, b = _a(lu_run, label), _b(lu_run, label)
    level = int(label.rsplit("-", 1)[1])
    assert a["top_level"] == level
    assert a["descriptor"]["top_level"] == level
    assert a["descriptor"]["vasz"] == {4: 57, 5: 64}[level]
    assert a["frames"] >= level + 3
    _check_view(b["after_restore"], a["before_preserve"], label)
    assert b["pt"]["top_level"] == level
    assert b["freed"] == a["frames"]
    assert b["frames_after_free"] == 0


# =========================================================================== the demo


def test_demo_cli_end_to_end(run_cli: RunCli, tmp_path: Path) -> None:
    proc = run_cli("demo", "--json", db=tmp_path / "demo.db", timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    summary = doc["summary"]
    assert summary["ok"] is True
    assert summary["frames_left_after_free"] == 0
    assert summary["frames_leaked"] == 0
    assert summary["frames_preserved"] == summary["frames_reclaimed"] > 0
    assert set(summary["formats"]) == set(FORMAT_NAMES)
    assert [p["boot"] for p in doc["phases"]] == [1, 2]
