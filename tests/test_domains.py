"""Domains in the database: allocation, frames as page rows, errors, show, two processes, reboot."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from iommupt_store.domains import DEFAULTS, domain_alloc, frame_counts, get_domain, hardware_walker, list_domains
from iommupt_store.errors import (
    AddressInUse,
    BadData,
    InvalidArgument,
    KernelGone,
    NoSuchAddress,
    NotFound,
    OutOfRange,
)
from iommupt_store.formats.base import Prot
from iommupt_store.machine import Machine
from iommupt_store.store import Store
from tests.conftest import RunCli, RunPy, one_error_line, sqlite_dump

K4, M2, G1 = 1 << 12, 1 << 21, 1 << 30
UPPER48 = 0xFFFF_8000_0000_0000
UPPER39 = 0xFFFF_FFC0_0000_0000

#: what each format's defaults give: (top level, VA width decoded by the top, sign extension, pgsize_bitmap)
EXPECTED_DEFAULTS = {
    "amdv1": (2, 39, False, sum(1 << s for s in range(12, 52) if s != 39)),
    "x86_64": (3, 48, True, K4 | M2 | G1),
    "vtdss": (3, 48, False, K4 | M2 | G1),
    "riscv": (3, 48, True, K4 | M2 | G1 | (1 << 39)),
}


def page_rows(db_path: Path) -> list[tuple[int, str, int | None, int | None, bytes]]:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute("SELECT pfn, owner, domain_id, level, contents FROM page ORDER BY pfn").fetchall()
    finally:
        conn.close()


# -- allocation and frames ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(DEFAULTS))
def test_domain_alloc_defaults(machine: Machine, db_path: Path, fmt: str) -> None:
    with machine.transaction() as tx:
        dom = domain_alloc(tx, fmt)
        info = dom.info()
    top_level, vasz, sign_extend, bitmap = EXPECTED_DEFAULTS[fmt]
    assert (info.format, info.state, info.boot) == (fmt, "live", 1)
    assert (info.top_level, info.range_vasz_lg2, info.sign_extend, info.pgsize_bitmap) == (
        top_level,
        vasz,
        sign_extend,
        bitmap,
    )
    assert info.frames == 1
    ((pfn, owner, domain_id, level, contents),) = page_rows(db_path)
    assert (pfn << 12, owner, domain_id, level) == (info.top_phys, "iommupt", info.id, top_level)
    assert contents == bytes(4096)
    with machine.transaction(write=False) as tx:
        assert [i.id for i in list_domains(tx)] == [info.id]
        assert frame_counts(tx) == {info.id: 1}


def test_frame_rows_carry_domain_and_level(machine: Machine, db_path: Path) -> None:
    with machine.transaction() as tx:
        a = domain_alloc(tx, "x86_64")
        a.map_range(0, 0x8000_0000, 2 * M2 + K4)
        a.map_range(UPPER48, 0x4000_0000, G1)
        b = domain_alloc(tx, "amdv1")
        b.map_range(1 << 40, 0x1_0000, 0x1_0000)  # grows the top from level 2 to 3
    with machine.transaction(write=False) as tx:
        levels = {}
        for d in (a.id, b.id):
            todo = [hardware_walker(tx, d).tables()]
            while todo:
                t = todo.pop()
                levels[t.phys >> 12] = (d, t.level)
                todo.extend(t.children)
        assert frame_counts(tx) == {a.id: 5, b.id: 5}  # x86: top, 2 x L2, L1, L0; amdv1: 2 tops, L2, L1, L0
    rows = page_rows(db_path)
    assert {pfn: (domain_id, level) for pfn, _, domain_id, level, _ in rows} == levels
    assert {owner for _, owner, *_ in rows} == {"iommupt"}


def test_free_releases_every_frame(machine: Machine, db_path: Path) -> None:
    with machine.transaction() as tx:
        keep = domain_alloc(tx, "vtdss")
        keep.map_range(0, 0, M2)
        gone = domain_alloc(tx, "riscv")
        gone.map_range(0, 0, 4 * K4)
        gone.map_range(UPPER48, 0, M2)
        assert frame_counts(tx)[gone.id] == 6
    with machine.transaction() as tx:
        assert get_domain(tx, gone.id).free() == 6
        assert gone.id not in frame_counts(tx)
    with machine.transaction(write=False) as tx:
        counts = frame_counts(tx)
        assert gone.id not in counts and counts[keep.id] == 3  # top, L2, L1 holding the 2M page
        infos = {i.id: i for i in list_domains(tx, include_freed=True)}
        assert (infos[gone.id].state, infos[gone.id].top_phys, infos[gone.id].frames) == ("freed", None, 0)
        assert [i.id for i in list_domains(tx)] == [keep.id]
        with pytest.raises(NotFound):
            hardware_walker(tx, gone.id)
        with pytest.raises(NotFound):
            get_domain(tx, gone.id).iova_to_phys(0)
    assert {d for _, _, d, _, _ in page_rows(db_path)} == {keep.id}


def test_freed_domain_info_keeps_its_configuration(machine: Machine) -> None:
    """A freed domain has no tables, but its row (and so its report) keeps what it was."""
    with machine.transaction() as tx:
        dom = domain_alloc(tx, "x86_64")
        live = dom.info()
        dom.free()
    with machine.transaction(write=False) as tx:
        (freed,) = list_domains(tx, include_freed=True)
    assert (freed.state, freed.top_phys, freed.frames) == ("freed", None, 0)
    assert (freed.features, freed.sign_extend) == (live.features, live.sign_extend)


def test_api_errors_leave_the_database_unchanged(machine: Machine, db_path: Path) -> None:
    with machine.transaction() as tx:
        dom = domain_alloc(tx, "x86_64")
        dom.map_range(K4, 0x5000, K4)
    before = sqlite_dump(db_path)
    cases: list[tuple[type[Exception], Any]] = [
        (InvalidArgument, lambda d: d.map_range(0x10_0000, 0, 0)),  # zero length
        (InvalidArgument, lambda d: d.map_range(0x10_0000, 0, K4, Prot.CACHE)),  # neither READ nor WRITE
        (NoSuchAddress, lambda d: d.map_range(0x10_0800, 0, K4)),
        (AddressInUse, lambda d: d.map_range(0, 0x1000_0000, 2 * K4)),  # 0 placed, then 0x1000 collides
        (OutOfRange, lambda d: d.map_range(1 << 47, 0, K4)),
        (OutOfRange, lambda d: d.map_range(0x10_0000, 1 << 52, K4)),
    ]
    for exc, op in cases:
        with pytest.raises(exc), machine.transaction() as tx:
            op(get_domain(tx, dom.id))
        assert sqlite_dump(db_path) == before, exc


# -- the CLI: errors ------------------------------------------------------------------------------------------


@pytest.fixture
def cli_world(machine: Machine, db_path: Path) -> dict[str, str]:
    """Domain ids (as CLI arguments) of: an x86_64 domain with a 4K page at 0x1000 and a 2M page
    at 2M, a 39-bit vtdss domain, and a freed domain."""
    with machine.transaction() as tx:
        x86 = domain_alloc(tx, "x86_64")
        x86.map_range(K4, 0x7000, K4)
        x86.map_range(M2, 0x20_0000, M2)
        vtd = domain_alloc(tx, "vtdss", top_level=2, vasz=39)
        freed = domain_alloc(tx, "amdv1")
        freed.map_range(0, 0, K4)
        freed.free()
    return {"x86": str(x86.id), "vtd": str(vtd.id), "freed": str(freed.id)}


CLI_ERRORS = [
    ("unaligned-iova", "ENXIO", ["map", "x86", "0x10800", "0x5000", "4K"]),
    ("unaligned-length", "ENXIO", ["map", "x86", "0x10000", "0x5000", "0x800"]),
    ("unaligned-paddr", "ENXIO", ["map", "x86", "0x10000", "0x5800", "4K"]),
    ("overlap-after-partial-map", "EADDRINUSE", ["map", "x86", "0", "0x9000", "8K"]),
    ("inside-large-page", "EADDRINUSE", ["map", "x86", "0x201000", "0", "4K"]),
    ("large-over-small", "EADDRINUSE", ["map", "x86", "0", "0", "2M"]),
    ("non-canonical", "ERANGE", ["map", "x86", "0x800000000000", "0", "4K"]),
    ("beyond-39-bits", "ERANGE", ["map", "vtd", "0x8000000000", "0", "4K"]),
    ("paddr-too-big", "ERANGE", ["map", "x86", "0x10000", str(1 << 52), "4K"]),
    ("zero-length", "EINVAL", ["map", "x86", "0x10000", "0", "0"]),
    ("wraps", "EOVERFLOW", ["map", "x86", "0xfffffffffffff000", "0", "8K"]),
    ("unknown-map", "ENOENT", ["map", "99", "0", "0", "4K"]),
    ("unknown-unmap", "ENOENT", ["unmap", "99", "0", "4K"]),
    ("unknown-translate", "ENOENT", ["translate", "99", "0"]),
    ("unknown-show", "ENOENT", ["show", "99"]),
    ("unknown-free", "ENOENT", ["domain", "free", "99"]),
    ("freed-translate", "ENOENT", ["translate", "freed", "0"]),
    ("freed-translate-engine", "ENOENT", ["translate", "--engine", "freed", "0"]),
    ("freed-map", "ENOENT", ["map", "freed", "0", "0", "4K"]),
    ("freed-unmap", "ENOENT", ["unmap", "freed", "0", "4K"]),
    ("freed-free", "ENOENT", ["domain", "free", "freed"]),
]


@pytest.mark.parametrize(("errname", "args"), [c[1:] for c in CLI_ERRORS], ids=[c[0] for c in CLI_ERRORS])
def test_cli_error_paths(
    cli_world: dict[str, str], run_cli: RunCli, db_path: Path, errname: str, args: list[str]
) -> None:
    before = sqlite_dump(db_path)
    argv = [cli_world.get(a, a) for a in args]
    r = run_cli("-m", "test", *argv)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert errname in one_error_line(r.stderr).split(":")[1], r.stderr
    assert r.stdout == ""
    assert sqlite_dump(db_path) == before


# -- the CLI: output ----------------------------------------------------------------------------------------


def test_show_1g_of_4k_pages(machine: Machine, run_cli: RunCli) -> None:
    with machine.transaction() as tx:
        dom = domain_alloc(tx, "x86_64")
        dom.map_range(0, 0x8000_1000, G1)  # paddr only 4K aligned: 262144 4K pages
    r = run_cli("-m", "test", "show", str(dom.id))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) < 40, r.stdout
    assert "515 frame(s)" in lines[0]
    for level in ("L3", "L2", "L1", "L0"):
        assert any(level in ln for ln in lines), level
    assert sum("L0" in ln for ln in lines) == 4  # --max-children default
    summary = [ln for ln in lines if "more level-0 tables" in ln]
    assert len(summary) == 1 and "508 more level-0 tables" in summary[0] and "260096x4K" in summary[0]

    r = run_cli("-m", "test", "show", "--json", str(dom.id))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["domain"]["frames"] == 515

    def walk(t: dict[str, Any]) -> list[dict[str, Any]]:
        return [t, *(x for c in t["children"] for x in walk(c))]

    tables = walk(doc["tree"])
    assert len(tables) == 515
    assert sorted(t["level"] for t in tables) == [0] * 512 + [1, 2, 3]
    level0 = [t for t in tables if t["level"] == 0]
    assert all(t["entries_used"] == 512 and t["leaves"] == {"4K": 512} for t in level0)
    assert len({t["pfn"] for t in tables}) == 515


def test_domains_and_translate_json(machine: Machine, run_cli: RunCli) -> None:
    with machine.transaction() as tx:
        a = domain_alloc(tx, "riscv", vasz=39)
        a.map_range(UPPER39, 0x4000_0000, G1)
        a.map_range(0x1000, 0x3000, K4)
        b = domain_alloc(tx, "vtdss")
        b.free()
    r = run_cli("-m", "test", "domains", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [(d["id"], d["format"], d["state"], d["frames"]) for d in doc] == [(a.id, "riscv", "live", 3)]
    r = run_cli("-m", "test", "domains", "--all", "--json")
    assert [d["state"] for d in json.loads(r.stdout)] == ["live", "freed"]

    r = run_cli("-m", "test", "translate", "--json", str(a.id), hex(UPPER39 + 0x1234), "0x1fff", "0x2000", "1T")
    assert r.returncode == 0, r.stderr
    got = [(t["iova"], t["phys"], t["page_size"], t["level"], t["fault"]) for t in json.loads(r.stdout)]
    assert got[0] == (hex(UPPER39 + 0x1234), "0x40001234", G1, 2, None)
    assert got[1] == ("0x1fff", "0x3fff", K4, 0, None)
    assert got[2][1] is None and got[2][4] == "not present"
    assert got[3][1] is None and "canonical" in got[3][4]  # 1T is past the 39-bit lower half


# -- two processes ------------------------------------------------------------------------------------------

WRITER = r"""
import json, sys
from iommupt_store.store import Store
from iommupt_store.domains import domain_alloc, hardware_walker
store = Store(sys.argv[1])
machine = store.machine("test")
maps = json.loads(sys.argv[2])
out = {}
with machine.transaction() as tx:
    for fmt, ranges in maps.items():
        d = domain_alloc(tx, fmt)
        for iova, pa, length in ranges:
            d.map_range(iova, pa, length)
        d.unmap_range(ranges[0][0], 4096)
        w = hardware_walker(tx, d.id)
        out[d.id] = {
            "frames": {str(p): b.hex() for p, b in w.frames.items()},
            "leaves": [[lf.iova, lf.phys, lf.size] for lf in w.leaves()],
        }
print(json.dumps(out))
"""

TWO_PROCESS_MAPS = {
    "amdv1": [(0x1000, 0x9000, 0x2F000), (1 << 40, 1 << 41, 8 * M2), (0x4000_0000, 0x1_0000_0000, G1)],
    "x86_64": [(0x1000, 0x9000, 3 * K4 + M2), (UPPER48 + G1, 0x4000_0000, G1 + M2), (0xFFFF_FFFF_FFFF_F000, 0, K4)],
    "vtdss": [(0x20_0000, 0x20_0000, 3 * M2), (0x7F_0000_0000, 0x1000, 64 * K4)],
    "riscv": [(0x10_0000, 0x30_0000, 2 * M2), (UPPER48, 0x8000_0000, G1 + 5 * K4)],
}


def test_mapped_in_one_process_read_in_another(
    machine: Machine, store: Store, db_path: Path, run_py: RunPy, run_cli: RunCli
) -> None:
    r = run_py(WRITER, str(db_path), json.dumps(TWO_PROCESS_MAPS))
    assert r.returncode == 0, r.stderr
    written = {int(k): v for k, v in json.loads(r.stdout).items()}
    assert len(written) == 4
    fresh = Store(db_path)  # a new engine: nothing cached from before the writer ran
    try:
        m = fresh.machine("test")
        assert m.boot_number == 1
        with m.transaction(write=False) as tx:
            for dom_id, seen in written.items():
                w = hardware_walker(tx, dom_id)
                assert {str(p): b.hex() for p, b in w.frames.items()} == seen["frames"]
                leaves = [[lf.iova, lf.phys, lf.size] for lf in w.leaves()]
                assert leaves == seen["leaves"]
                dom = get_domain(tx, dom_id)
                for iova, pa, size in leaves:
                    for off in (0, size - 1):
                        assert w.translate(iova + off).phys == pa + off
                        assert dom.iova_to_phys(iova + off) == pa + off
    finally:
        fresh.close()
    # a third process: the CLI's hardware walker gives the same answers
    for dom_id, seen in written.items():
        probes = [iova + size - 1 for iova, _, size in seen["leaves"]]
        r = run_cli("-m", "test", "translate", "--json", str(dom_id), *map(hex, probes))
        assert r.returncode == 0, r.stderr
        got = [int(t["phys"], 16) for t in json.loads(r.stdout)]
        assert got == [pa + size - 1 for _, pa, size in seen["leaves"]]
    # byte-identical rows, as the test process reads them with plain SQL
    rows = {pfn << 12: (d, contents.hex()) for pfn, _, d, _, contents in page_rows(db_path)}
    for dom_id, seen in written.items():
        assert {str(p): h for p, (d, h) in rows.items() if d == dom_id} == seen["frames"]


# -- cold reboot --------------------------------------------------------------------------------------------


def test_cold_reboot_frees_domains_and_pages(store: Store, machine: Machine, db_path: Path) -> None:
    with machine.transaction() as tx:
        a = domain_alloc(tx, "x86_64")
        a.map_range(0, 0, 2 * M2 + K4)
        b = domain_alloc(tx, "amdv1")
        b.map_range(0, 0, K4)
        c = domain_alloc(tx, "vtdss")
        c.free()
    assert len(page_rows(db_path)) == 4 + 3  # x86: top, L2, L1, L0; amdv1: top, L1, L0
    machine.reboot()
    assert page_rows(db_path) == []
    with pytest.raises(KernelGone):
        machine.transaction().__enter__()
    m2 = store.machine("test")
    assert m2.boot_number == 2
    with m2.transaction() as tx:
        infos = list_domains(tx, include_freed=True)
        assert [(i.id, i.state, i.top_phys, i.frames) for i in infos] == [
            (a.id, "freed", None, 0),
            (b.id, "freed", None, 0),
            (c.id, "freed", None, 0),
        ]
        assert list_domains(tx) == []
        assert frame_counts(tx) == {}
        with pytest.raises(NotFound):
            get_domain(tx, a.id).map_range(0, 0, K4)
        with pytest.raises(NotFound):
            hardware_walker(tx, b.id)
        # the new boot allocates from the bottom again
        d = domain_alloc(tx, "x86_64")
        assert d.info().top_phys == 0x10_0000


def test_a_shortened_frame_is_bad_data_when_a_walk_reaches_it(machine: Machine, db_path: Path) -> None:
    """Opening a domain reads no frames; the walk that reaches a hand-shortened one refuses it."""
    with machine.transaction() as tx:
        dom = domain_alloc(tx, "x86_64")
        dom.map_range(0, 0x200000, 4 * K4)
        dom.map_range(UPPER48, 0x200000, 4 * K4)
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("PRAGMA ignore_check_constraints = ON")
        leaf = conn.execute("SELECT max(pfn) FROM page WHERE domain_id = ? AND level = 0", (dom.id,)).fetchone()[0]
        conn.execute("UPDATE page SET contents = zeroblob(100) WHERE pfn = ?", (leaf,))
    conn.close()
    with machine.transaction(write=False) as tx:
        opened = get_domain(tx, dom.id)
        assert opened.iova_to_phys(0) == 0x200000  # the other half of the tree is intact
        with pytest.raises(BadData, match=f"pfn {leaf:#x}.*not one whole page"):
            opened.iova_to_phys(UPPER48)
    with machine.transaction() as tx:
        assert get_domain(tx, dom.id).free() == 7  # free reads no leaf bytes: the frame goes with the rest
